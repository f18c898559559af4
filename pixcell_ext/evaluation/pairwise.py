"""Within-set diversity: a caller's distance (e.g. LPIPS) averaged over distinct pairs of one set's items.

Apart from metrics.py because it scores items through any distance function rather than comparing two feature
matrices, and a collapsed generator (near-identical images of a class) shows up here and not in a set distance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["mean_pairwise", "pairwise_values"]


def pairwise_values(
    distance_fn: Callable[[Any, Any], Tensor | np.ndarray | Sequence[float]],
    items: Tensor | Sequence[Any],
    *,
    max_pairs: int = 1000,
    batch_size: int = 64,
    seed: int = 0,
) -> np.ndarray:
    """``distance_fn`` over distinct pairs of ``items``: one float64 value per pair.

    Used for within-set diversity (mean LPIPS between pairs of generated images of one class: a collapsed generator
    scores near 0). ``distance_fn(a, b)`` receives two equally long batches (tensors stacked from ``items`` when
    ``items`` is a tensor, lists otherwise) and returns one distance per pair. If there are at most ``max_pairs``
    distinct unordered pairs, all of them are used (exact); otherwise ``max_pairs`` distinct pairs are sampled
    uniformly without replacement with a seeded generator, so the estimate is unbiased and reproducible. Identical
    pairs (i, i) are never used, because they would pull the diversity towards zero.
    """
    n = len(items)
    if n < 2:
        raise ValueError(f"need at least 2 items for pairwise distances, got {n}")
    if max_pairs < 1:
        raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
    total = n * (n - 1) // 2
    if total <= max_pairs:
        ii, jj = np.triu_indices(n, k=1)
    else:
        rng = np.random.default_rng(seed)
        # Sample linear indices of the strict upper triangle, then map them back to (i, j).
        lin = np.sort(rng.choice(total, size=max_pairs, replace=False))
        # Row i starts at offset i*n - i*(i+1)/2 in the row-major strict upper triangle.
        ii = (n - 2 - np.floor(np.sqrt(-8 * lin + 4 * n * (n - 1) - 7) / 2.0 - 0.5)).astype(np.int64)
        jj = (lin + ii + 1 - n * (n - 1) // 2 + (n - ii) * ((n - ii) - 1) // 2).astype(np.int64)

    values: list[np.ndarray] = []
    for start in range(0, len(ii), batch_size):
        bi, bj = ii[start : start + batch_size], jj[start : start + batch_size]
        if isinstance(items, Tensor):
            a, b = items[torch.from_numpy(bi)], items[torch.from_numpy(bj)]
        else:
            a, b = [items[i] for i in bi], [items[j] for j in bj]
        out = distance_fn(a, b)
        if isinstance(out, Tensor):
            out = out.detach().to("cpu", torch.float64).numpy()
        out = np.asarray(out, dtype=np.float64).reshape(-1)
        if out.shape[0] != len(bi):
            raise ValueError(f"distance_fn returned {out.shape[0]} values for {len(bi)} pairs")
        values.append(out)
    return np.concatenate(values)


def mean_pairwise(
    distance_fn: Callable[[Any, Any], Tensor | np.ndarray | Sequence[float]],
    items: Tensor | Sequence[Any],
    *,
    max_pairs: int = 1000,
    batch_size: int = 64,
    seed: int = 0,
) -> tuple[float, float]:
    """Mean and standard deviation of `pairwise_values`; returns (mean, std)."""
    values = pairwise_values(distance_fn, items, max_pairs=max_pairs, batch_size=batch_size, seed=seed)
    return float(values.mean()), float(values.std())
