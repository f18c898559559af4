"""Confidence intervals for the report: every headline number is stored as ``{value, low, high, n}``.

Means over items (LPIPS pairs) and balanced accuracies (test tiles) get percentile bootstraps: the statistic is
recomputed on resamples drawn with a seeded generator, and the interval is the central ``confidence`` share of those
values. The distribution metrics use a jackknife and half-sampling instead (`distribution`), because resampling
with replacement repeats tiles, which distorts k-NN radii and covariances. Either way an interval describes the
sampling spread at the sample size used: two runs differ meaningfully only where their intervals (at equal n) do not
overlap.
Where the value averages over seeded draws of training tiles (the low-data curve), the interval adds the
between-draw variance (`draw_averaged_accuracy`): it then covers the expected accuracy over which tiles are drawn
and over test sets, not the accuracy of these particular draws.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.stats

CONFIDENCE = 0.95


def percentile_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The central ``confidence`` share of ``values`` (NaNs ignored)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def estimate(value: float | None, low: float | None, high: float | None, n: int) -> dict[str, Any]:
    """One report entry; ``None`` where the number could not be computed."""

    def clean(x: float | None) -> float | None:
        return None if x is None or not np.isfinite(x) else float(x)

    return {"value": clean(value), "low": clean(low), "high": clean(high), "n": int(n)}


def bootstrap_mean(
    values: Sequence[float], *, replicates: int, seed: int, confidence: float = CONFIDENCE
) -> dict[str, Any]:
    """Mean of ``values`` with a bootstrap interval over its items (e.g. LPIPS pairs)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return estimate(None, None, None, 0)
    means = bootstrap_values(lambda rows: values[rows].mean(), values.size, replicates=replicates, seed=seed)
    return estimate(values.mean(), *percentile_interval(means, confidence), values.size)


def bootstrap_values(score: Callable[[np.ndarray], float], n: int, *, replicates: int, seed: int) -> list[float]:
    """``score(rows)`` on ``replicates`` resamples (with replacement) of ``n`` rows, drawn from a seeded generator."""
    rng = np.random.default_rng(seed)
    return [score(rng.integers(0, n, n)) for _ in range(replicates)]


def balanced_accuracy(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Mean recall over the classes present in ``truth`` (sklearn's definition), fast enough for bootstraps."""
    classes, inverse = np.unique(truth, return_inverse=True)
    hits = np.bincount(inverse, weights=(truth == predicted).astype(np.float64), minlength=classes.size)
    return float(np.mean(hits / np.bincount(inverse, minlength=classes.size)))


def balanced_accuracy_estimate(
    truth: np.ndarray,
    predictions: Sequence[np.ndarray],
    *,
    replicates: int,
    seed: int,
    confidence: float = CONFIDENCE,
) -> dict[str, Any]:
    """Balanced accuracy averaged over probes (one prediction vector each, same test tiles), with an interval
    from resampling the test tiles: the test set's own sampling error, which dominates on small held-out sets."""
    truth = np.asarray(truth)
    score = _mean_balanced_accuracy(truth, predictions)
    value = score(np.arange(truth.size))
    resampled = bootstrap_values(score, truth.size, replicates=replicates, seed=seed)
    return estimate(value, *percentile_interval(resampled, confidence), truth.size)


def _mean_balanced_accuracy(truth: np.ndarray, predictions: Sequence[np.ndarray]) -> Callable[[np.ndarray], float]:
    """rows -> balanced accuracy on those test rows, averaged over the probes."""

    def score(rows: np.ndarray) -> float:
        return float(np.mean([balanced_accuracy(truth[rows], p[rows]) for p in predictions]))

    return score


def draw_averaged_accuracy(
    truth: np.ndarray,
    predictions: Sequence[np.ndarray],
    *,
    replicates: int,
    seed: int,
    confidence: float = CONFIDENCE,
) -> dict[str, Any]:
    """Balanced accuracy averaged over probes trained on independent draws of training tiles (one prediction vector
    per draw, same test tiles), with an interval for E[balanced accuracy] over draws and test sets.

    Its variance is the test-set part (bootstrap over test tiles of the averaged accuracy) plus the between-draw
    part (the draws' sample variance / number of draws); the test-tile bootstrap alone covered the mean in 47 % of
    simulated runs at one tile per class, where which tile is drawn matters most. The interval is value ± z·SE,
    clipped to [0, 1]."""
    truth = np.asarray(truth)
    per_draw = np.array([balanced_accuracy(truth, p) for p in predictions])
    score = _mean_balanced_accuracy(truth, predictions)
    return _draw_averaged(per_draw, score, truth.size, (0.0, 1.0), replicates, seed, confidence)


def draw_averaged_gain(
    truth: np.ndarray,
    added: Sequence[np.ndarray],
    alone: Sequence[np.ndarray],
    *,
    replicates: int,
    seed: int,
    confidence: float = CONFIDENCE,
) -> dict[str, Any]:
    """E[accuracy with the synthetic set − accuracy without] over draws and test sets, paired: draw d's two probes
    share their real tiles and are scored on the same test tiles, so the gain's interval is much narrower than
    the two accuracies' intervals combined. Variance as in `draw_averaged_accuracy`, on the differences."""
    truth = np.asarray(truth)
    per_draw = np.array(
        [balanced_accuracy(truth, a) - balanced_accuracy(truth, b) for a, b in zip(added, alone, strict=True)]
    )
    with_synthetic, without = _mean_balanced_accuracy(truth, added), _mean_balanced_accuracy(truth, alone)
    return _draw_averaged(
        per_draw, lambda rows: with_synthetic(rows) - without(rows), truth.size, (-1.0, 1.0), replicates, seed,
        confidence,
    )  # fmt: skip


def _draw_averaged(
    per_draw: np.ndarray,
    score: Callable[[np.ndarray], float],
    n_test: int,
    bounds: tuple[float, float],
    replicates: int,
    seed: int,
    confidence: float,
) -> dict[str, Any]:
    resampled = bootstrap_values(score, n_test, replicates=replicates, seed=seed)
    between = float(per_draw.var(ddof=1)) / per_draw.size if per_draw.size > 1 else 0.0
    se = (float(np.var(resampled, ddof=1)) + between) ** 0.5
    z = float(scipy.stats.norm.ppf(0.5 + confidence / 2))
    value = float(per_draw.mean())
    return estimate(value, max(bounds[0], value - z * se), min(bounds[1], value + z * se), n_test)
