"""Does the generator copy its training tiles? Nearest-training-tile distances of generated vs held-out real tiles.

For every generated tile, the distance to its nearest *training* tile in a feature space the generator never saw;
the same statistic for real tiles that were not trained on gives the scale of "as close as a new tile of this
distribution gets". A generated tile closer to a training tile than about 1 % of held-out real tiles of its class is
a possible copy; a generator that reproduces training tiles has many more than a fresh sampler. The worst pairs are
written side by side so a person can look.

The test accounts for the threshold being estimated. τ is the k-th smallest of n held-out distances (k = ⌊0.01
(n + 1)⌋, at least 1). Under "no copying" a generated tile's distance is exchangeable with the held-out ones, so
    P(fresh distance < τ | τ) = F(τ), and F(τ) is the k-th order statistic of n uniforms: F(τ) ~ Beta(k, n − k + 1);
    the count below τ among m generated tiles is Binomial(m, F(τ)) given τ, hence Beta-Binomial(m, k, n − k + 1).
A Binomial(m, 0.01) test treats F(τ) as fixed and flags fresh generators more often as m grows. Thresholds are per
class: distances depend on the class, and held-out and generated class mixes differ (NCT's held-out set is
unbalanced, generated sets are balanced), which breaks exchangeability of a pooled threshold. The pooled count is the
sum of the classes' counts; the classes' thresholds come from disjoint held-out tiles, so under the null the counts
are independent Beta-Binomials and the pooled tail is exact by convolving their distributions. A sum test is chosen
over Bonferroni across classes because copying spread over all classes raises every count a little, which the sum
detects and a per-class minimum does not; the per-class p-values are reported too, Holm-adjusted across classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.signal
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


def threshold_rank(n_held_out: int) -> int:
    """k of the k-th smallest held-out distance used as threshold: about the 1 % quantile, and at least the minimum."""
    return max(1, int(np.floor(THRESHOLD_QUANTILE * (n_held_out + 1))))


def _null_distribution(n_generated: int, n_held_out: int) -> np.ndarray:
    """P(count = 0..m) of generated tiles below the k-th held-out distance when nothing is copied."""
    k = threshold_rank(n_held_out)
    return scipy.stats.betabinom.pmf(np.arange(n_generated + 1), n_generated, k, n_held_out - k + 1)


def _upper_tail(pmf: np.ndarray, count: int) -> float:
    return float(min(1.0, max(0.0, pmf[count:].sum())))


def class_memorisation(generated_d: np.ndarray, held_out_d: np.ndarray) -> dict[str, Any]:
    """One class: the threshold (k-th smallest held-out distance), the count below it and its Beta-Binomial p-value."""
    k = threshold_rank(held_out_d.size)
    threshold = float(np.partition(held_out_d, k - 1)[k - 1])
    copies = int((generated_d < threshold).sum())
    pmf = _null_distribution(generated_d.size, held_out_d.size)
    return {
        "copies": copies,
        "n_generated": int(generated_d.size),
        "n_held_out": int(held_out_d.size),
        "threshold_rank": k,
        "threshold": threshold,
        "expected_by_chance": k / (held_out_d.size + 1),
        "p_value": _upper_tail(pmf, copies),
        "null_pmf": pmf,
    }


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error over the classes)."""
    order = np.argsort(p_values)
    adjusted, running = np.empty(len(p_values)), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted.tolist()


def memorisation_check(
    generated: np.ndarray,
    training: np.ndarray,
    held_out: np.ndarray,
    *,
    generated_labels: Sequence[str] | None = None,
    held_out_labels: Sequence[str] | None = None,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Possible copies per class and pooled, with exact p-values under "no copying" (see the module docstring).

    ``flagged`` is the pooled test at p < `FLAG_P_VALUE`; ``per_class[c]["flagged"]`` uses the Holm-adjusted
    p-value, so "some class flagged" also errs at most at that rate. Classes without generated or held-out tiles
    are left out (listed in ``classes_skipped``). Without labels every tile is one class.
    """
    if len(held_out) < 1 or len(generated) < 1 or len(training) < 1:
        raise ValueError(
            f"the memorisation check needs held-out real, training and generated tiles, got {len(held_out)}, "
            f"{len(training)} and {len(generated)}"
        )
    generated_labels = np.asarray(generated_labels if generated_labels is not None else [""] * len(generated))
    held_out_labels = np.asarray(held_out_labels if held_out_labels is not None else [""] * len(held_out))
    generated_d, nearest = nearest_distances(generated, training)
    held_out_d, _ = nearest_distances(held_out, training)
    classes = sorted(set(generated_labels) & set(held_out_labels))
    if not classes:
        raise ValueError("the memorisation check needs a class with both generated and held-out tiles")
    per_class = {
        c: class_memorisation(generated_d[generated_labels == c], held_out_d[held_out_labels == c]) for c in classes
    }
    pooled_pmf = np.array([1.0])
    for entry in per_class.values():
        pooled_pmf = scipy.signal.fftconvolve(pooled_pmf, entry.pop("null_pmf")).clip(min=0.0)
    copies = sum(entry["copies"] for entry in per_class.values())
    n_tested = sum(entry["n_generated"] for entry in per_class.values())
    p_value = _upper_tail(pooled_pmf, copies)
    for entry, adjusted in zip(per_class.values(), holm([e["p_value"] for e in per_class.values()]), strict=True):
        entry["p_value_holm"] = adjusted
        entry["flagged"] = bool(adjusted < FLAG_P_VALUE)
    tail = (1 - confidence) / 2  # Clopper-Pearson, from its Beta form (binomtest's root finding is 30x slower)
    low = scipy.stats.beta.ppf(tail, copies, n_tested - copies + 1) if copies else 0.0
    high = scipy.stats.beta.ppf(1 - tail, copies + 1, n_tested - copies) if copies < n_tested else 1.0
    expected = sum(e["expected_by_chance"] * e["n_generated"] for e in per_class.values()) / n_tested
    return {
        "possible_copies": estimate(copies / n_tested, low, high, n_tested),
        "expected_by_chance": expected,
        "p_value": p_value,
        "flagged": bool(p_value < FLAG_P_VALUE),
        "test": "per-class threshold at the k-th held-out distance; sum of Beta-Binomial counts, exact tail",
        "per_class": per_class,
        "classes_skipped": sorted((set(generated_labels) | set(held_out_labels)) - set(classes)),
        "n_training": len(training),
        "n_held_out": int(sum(e["n_held_out"] for e in per_class.values())),
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
