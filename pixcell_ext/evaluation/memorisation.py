"""Does the generator copy its training tiles? Nearest-training-tile distances of generated vs held-out real tiles.

For every generated tile, the distance to its nearest *training* tile in a feature space the generator never saw;
the same statistic for real tiles that were not trained on gives the scale of "as close as a new tile of this
distribution gets". A generated tile closer to a training tile than the held-out tiles' 1st percentile is a
possible copy. A generator that samples its distribution afresh has about 1 % such tiles (by construction of the
threshold); a generator that reproduces training tiles has many more. The worst pairs are written side by side so a
person can look.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
import torch

from pixcell_ext.data import load_tile
from pixcell_ext.evaluation.intervals import estimate
from pixcell_ext.files import write_png_atomically
from pixcell_ext.training.validation import contact_sheet

THRESHOLD_QUANTILE = 0.01
FLAG_P_VALUE = 1e-3
PAIRS_SHOWN = 8


def nearest_distances(
    queries: np.ndarray, support: np.ndarray, *, batch_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance from each query row to its nearest support row, and that row's index."""
    support_t = torch.as_tensor(support, dtype=torch.float64)
    support_sq = (support_t * support_t).sum(dim=1)
    distances, indices = [], []
    for start in range(0, len(queries), batch_size):
        q = torch.as_tensor(queries[start : start + batch_size], dtype=torch.float64)
        d2 = ((q * q).sum(dim=1, keepdim=True) + support_sq.unsqueeze(0) - 2.0 * q @ support_t.T).clamp_min(0.0)
        best = d2.min(dim=1)
        distances.append(best.values.sqrt().numpy())
        indices.append(best.indices.numpy())
    return np.concatenate(distances), np.concatenate(indices)


def memorisation_check(
    generated: np.ndarray, training: np.ndarray, held_out: np.ndarray, *, confidence: float = 0.95
) -> dict[str, Any]:
    """The fraction of generated tiles closer to a training tile than 99 % of held-out real tiles are.

    ``flagged`` is True when that fraction is significantly above the 1 % a fresh sample would show (one-sided
    binomial test, p < `FLAG_P_VALUE`). The interval on the fraction is Clopper-Pearson.
    """
    if len(held_out) < 2 or len(generated) < 1 or len(training) < 1:
        raise ValueError(
            f"the memorisation check needs held-out real, training and generated tiles, got {len(held_out)}, "
            f"{len(training)} and {len(generated)}"
        )
    generated_d, nearest = nearest_distances(generated, training)
    held_out_d, _ = nearest_distances(held_out, training)
    threshold = float(np.quantile(held_out_d, THRESHOLD_QUANTILE))
    copies = int((generated_d < threshold).sum())
    test = scipy.stats.binomtest(copies, len(generated), THRESHOLD_QUANTILE, alternative="greater")
    ci = scipy.stats.binomtest(copies, len(generated)).proportion_ci(confidence_level=confidence, method="exact")
    return {
        "possible_copies": estimate(copies / len(generated), ci.low, ci.high, len(generated)),
        "expected_by_chance": THRESHOLD_QUANTILE,
        "p_value": float(test.pvalue),
        "flagged": bool(test.pvalue < FLAG_P_VALUE),
        "threshold": threshold,
        "n_training": len(training),
        "n_held_out": len(held_out),
        "generated_median_distance": float(np.median(generated_d)),
        "held_out_median_distance": float(np.median(held_out_d)),
        "generated_distances": generated_d,
        "nearest_training_rows": nearest,
    }


def write_closest_pairs(
    path: Path, generated: Sequence[Path], training: Sequence[Path], distances: np.ndarray, nearest: np.ndarray
) -> Path:
    """The generated tiles nearest to a training tile (top row) above that training tile (bottom row)."""
    order = np.argsort(distances)[:PAIRS_SHOWN]
    size = 96
    top = [load_tile(generated[i], size).permute(1, 2, 0).numpy() for i in order]
    bottom = [load_tile(training[nearest[i]], size).permute(1, 2, 0).numpy() for i in order]
    sheet = contact_sheet([top, bottom], [f"d={distances[i]:.3g}" for i in order], ["generated", "training"])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png_atomically(path, sheet)
    return path
