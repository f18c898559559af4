"""FD, KID, precision/recall and density/coverage at matched sample sizes, each with a bootstrap interval.

Why matched: FD is biased upwards by an amount that depends on n (two samples of one distribution give FD 3931 at
n = 50 but 104 at n = 3000 in 256-d), and precision/recall move with the ratio of the set sizes. Comparing 50
synthetic tiles of a class with 10 000 real ones mixes those effects into the number. Here each class is compared at
n = min(real, synthetic) on both sides: the larger side is subsampled with a seeded draw, repeated ``draws`` times,
and the value is the mean over the draws. The pooled ``overall`` group keeps each class at its matched count, so
the real and synthetic class proportions are equal too.

Intervals cover E[metric at this matched n] (FD's is above the population FD; precision/recall move with n too), not
the population value. Their standard errors were chosen by measuring coverage on simulated data with a known answer
(tests/evaluation/test_calibration.py; Gaussians, d = 4-8, n = 50-200), and neither resamples with replacement:
repeated tiles shrink k-NN radii, lose distinct fakes and inflate FD (a two-sample bootstrap covered 0.99-1.00, or
0.07-0.87 as percentile intervals).
- FD and KID (smooth in the sample moments): a delete-a-group jackknife on each side, variances added (the sides are
  independent samples).
- Precision, recall, density, coverage (counts of points inside k-NN balls, not smooth: a group jackknife's SE is
  1.2-1.8x their SD): half-sampling, i.e. the variance over `half_samples` draws of half of each side without
  replacement, which equals Var(metric at n) for a statistic linear in the tiles and stays close for these.
- The reported value is the mean over ``draws`` subsamples of the larger side; its variance is a single draw's
  (estimated on draw 0, itself an ordinary sample at n) minus (1 - 1/draws) times the spread between the draws
  (the part that averaging removes), so a large real pool gives the narrower interval it deserves.
The interval is value ± z·SE, clipped to the metric's range.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.stats

from pixcell_ext.evaluation.intervals import estimate
from pixcell_ext.evaluation.metrics import (
    density_coverage,
    fast_frechet_distance,
    kernel_inception_distance,
    mmd2_unbiased,
    precision_recall,
)
from pixcell_ext.seeding import derived_seed

OVERALL = "overall"
METRICS = ("fd", "kid", "precision", "recall", "density", "coverage")
KID_WHOLE_SET_MAX = 1000  # larger sets: KID averaged over subsets of this size (O(n²) memory otherwise)


@dataclass(frozen=True)
class DistributionSettings:
    """How the distribution metrics are sampled: k of the k-NN metrics, matched draws, jackknife groups per side
    (FD, KID) and half-samples (k-NN metrics)."""

    pr_k: int = 3
    dc_k: int = 5
    kid_subsets: int = 100
    draws: int = 5
    groups: int = 10
    half_samples: int = 20
    confidence: float = 0.95
    seed: int = 0


def matched_rows(
    real_labels: Sequence[str], synthetic_labels: Sequence[str], classes: Sequence[str], *, seed: int, draw: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of an equal number of real and synthetic tiles per class: n_c = min of the two counts, each side a seeded
    draw without replacement (keyed by seed, class and draw, so a class's tiles do not depend on other classes)."""
    real_labels, synthetic_labels = np.asarray(real_labels), np.asarray(synthetic_labels)
    real_rows, synthetic_rows = [], []
    for name in classes:
        real_of, syn_of = np.flatnonzero(real_labels == name), np.flatnonzero(synthetic_labels == name)
        n = min(real_of.size, syn_of.size)
        rng = np.random.default_rng(derived_seed(seed, "matched", name, draw))
        real_rows.append(np.sort(rng.permutation(real_of)[:n]))
        synthetic_rows.append(np.sort(rng.permutation(syn_of)[:n]))
    return np.concatenate(real_rows).astype(np.int64), np.concatenate(synthetic_rows).astype(np.int64)


SMOOTH = ("fd", "kid")  # jackknife
KNN = ("precision", "recall", "density", "coverage")  # half-sampling


def _statistics(
    real: np.ndarray,
    synthetic: np.ndarray,
    labels: tuple[np.ndarray, np.ndarray],
    settings: DistributionSettings,
    *,
    rng: np.random.Generator,
    device: Any,
    metrics: Sequence[str] = METRICS,
) -> dict[str, float | None]:
    n = min(len(real), len(synthetic))
    out: dict[str, float | None] = dict.fromkeys(metrics)
    if n >= 2 and "fd" in metrics:
        out["fd"] = fast_frechet_distance(real, synthetic, device=device)
        if n <= KID_WHOLE_SET_MAX:
            # class-stratified sets: see mmd2_unbiased on why same-class pairs are reweighted
            out["kid"] = mmd2_unbiased(real, synthetic, real_groups=labels[0], fake_groups=labels[1], device=device)
        else:
            out["kid"] = kernel_inception_distance(
                real,
                synthetic,
                subset_size=KID_WHOLE_SET_MAX,
                num_subsets=settings.kid_subsets,
                seed=int(rng.integers(2**31)),
                device=device,
            )[0]
    if n > settings.pr_k and "precision" in metrics:
        out["precision"], out["recall"] = precision_recall(real, synthetic, k=settings.pr_k, device=device)
    if len(real) > settings.dc_k and "density" in metrics:
        out["density"], out["coverage"] = density_coverage(real, synthetic, k=settings.dc_k, device=device)
    return out


BOUNDS = {
    "fd": (0.0, None),
    "precision": (0.0, 1.0),
    "recall": (0.0, 1.0),
    "density": (0.0, None),
    "coverage": (0.0, 1.0),
}


def _jackknife_groups(labels: np.ndarray, groups: int, rng: np.random.Generator) -> np.ndarray:
    """A group id per row, classes spread evenly over the groups (so leaving a group out keeps the proportions)."""
    ids = np.empty(labels.size, dtype=np.int64)
    offset = 0
    for name in np.unique(labels):
        of = np.flatnonzero(labels == name)
        ids[rng.permutation(of)] = (np.arange(of.size) + offset) % groups
        offset += of.size
    return ids


def _single_draw_variance(
    real: np.ndarray,
    real_labels: np.ndarray,
    synthetic: np.ndarray,
    synthetic_labels: np.ndarray,
    rows: tuple[np.ndarray, np.ndarray],
    settings: DistributionSettings,
    rng: np.random.Generator,
    device: Any,
) -> dict[str, float | None]:
    """Var(metric at n) from one matched draw: group jackknife for `SMOOTH`, half-sampling for `KNN` (module doc)."""
    real_rows, synthetic_rows = rows
    n = int(real_rows.size)
    variance: dict[str, float | None] = dict.fromkeys(METRICS)
    groups = min(settings.groups, n)
    if groups >= 2:
        sums = dict.fromkeys(SMOOTH, 0.0)
        for side in ("real", "synthetic"):  # the two sides are independent samples: their variances add
            rows_of, labels_of = (real_rows, real_labels) if side == "real" else (synthetic_rows, synthetic_labels)
            ids = _jackknife_groups(labels_of[rows_of], groups, rng)
            values = []
            for g in range(groups):
                kept = rows_of[ids != g]
                r, s = (kept, synthetic_rows) if side == "real" else (real_rows, kept)
                pair = (real_labels[r], synthetic_labels[s])
                values.append(
                    _statistics(real[r], synthetic[s], pair, settings, rng=rng, device=device, metrics=SMOOTH)
                )
            for metric in SMOOTH:
                jack = np.array([v[metric] for v in values if v[metric] is not None], dtype=np.float64)
                if jack.size >= 2 and sums[metric] is not None:
                    sums[metric] += (jack.size - 1) / jack.size * float(((jack - jack.mean()) ** 2).sum())
                else:
                    sums[metric] = None
        variance.update(sums)
    if n >= 4 and settings.half_samples >= 2:
        halves = []
        for _ in range(settings.half_samples):
            r = _stratified_half(real_rows, real_labels, rng)
            s = _stratified_half(synthetic_rows, synthetic_labels, rng)
            pair = (real_labels[r], synthetic_labels[s])
            halves.append(_statistics(real[r], synthetic[s], pair, settings, rng=rng, device=device, metrics=KNN))
        for metric in KNN:
            values = np.array([h[metric] for h in halves if h[metric] is not None], dtype=np.float64)
            variance[metric] = float(values.var(ddof=1)) if values.size >= 2 else None
    return variance


def _stratified_half(rows: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Half of ``rows`` (rounded up) per class, without replacement: a half-sample that keeps the class mix."""
    kept = []
    for name in np.unique(labels[rows]):
        of = rows[labels[rows] == name]
        kept.append(rng.permutation(of)[: (of.size + 1) // 2])
    return np.sort(np.concatenate(kept))


def matched_metrics(
    real: np.ndarray,
    real_labels: Sequence[str],
    synthetic: np.ndarray,
    synthetic_labels: Sequence[str],
    classes: Sequence[str],
    settings: DistributionSettings,
    *,
    device: Any = None,
) -> dict[str, Any]:
    """Every metric of `METRICS` for the tiles of ``classes`` pooled, at matched size, as ``{value, low, high, n}``."""
    real_labels, synthetic_labels = np.asarray(real_labels), np.asarray(synthetic_labels)
    draws = [
        matched_rows(real_labels, synthetic_labels, classes, seed=settings.seed, draw=d) for d in range(settings.draws)
    ]
    n = int(draws[0][0].size)
    result: dict[str, Any] = {
        "n": n,
        "n_real_available": int(np.isin(real_labels, classes).sum()),
        "n_synthetic_available": int(np.isin(synthetic_labels, classes).sum()),
        "dim": int(real.shape[1]),
        "draws": settings.draws,
    }
    if len(classes) > 1:
        result["n_per_class"] = {c: int((real_labels[draws[0][0]] == c).sum()) for c in classes}
    rng = np.random.default_rng(derived_seed(settings.seed, "jackknife", *classes))
    points = [
        _statistics(real[r], synthetic[s], (real_labels[r], synthetic_labels[s]), settings, rng=rng, device=device)
        for r, s in draws
    ]
    groups = min(settings.groups, n)
    single = _single_draw_variance(real, real_labels, synthetic, synthetic_labels, draws[0], settings, rng, device)
    z = float(scipy.stats.norm.ppf(0.5 + settings.confidence / 2))
    for metric in METRICS:
        values = [p[metric] for p in points if p[metric] is not None]
        if not values:
            result[metric] = estimate(None, None, None, n)
            continue
        value = float(np.mean(values))
        low = high = None
        if single[metric] is not None:
            # averaging over the draws removes (1 - 1/D) of the between-draw spread from a single draw's variance
            between = float(np.var(values, ddof=1)) if len(values) > 1 else 0.0
            variance = max(single[metric] - (1 - 1 / len(values)) * between, single[metric] / len(values))
            low, high = value - z * variance**0.5, value + z * variance**0.5
            floor, ceiling = BOUNDS.get(metric, (None, None))
            low = low if floor is None else max(low, floor)
            high = high if ceiling is None else min(high, ceiling)
        result[metric] = estimate(value, low, high, n)
    result["jackknife_groups"] = groups
    result["half_samples"] = settings.half_samples
    return result


def per_class_matched_metrics(
    real: np.ndarray,
    real_labels: Sequence[str],
    synthetic: np.ndarray,
    synthetic_labels: Sequence[str],
    classes: Sequence[str],
    settings: DistributionSettings,
    *,
    device: Any = None,
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """`matched_metrics` per class and pooled (key ``"overall"``), with a note for each group too small to measure."""
    results, notes = {}, []
    for name in [*classes, OVERALL]:
        group = list(classes) if name == OVERALL else [name]
        results[name] = matched_metrics(real, real_labels, synthetic, synthetic_labels, group, settings, device=device)
        if results[name]["n"] <= settings.pr_k:
            notes.append(
                f"{name}: {results[name]['n']} matched tiles per side; FD/KID need 2 and precision/recall "
                f"{settings.pr_k + 1}, density/coverage {settings.dc_k + 1}: the missing ones are null."
            )
    return results, notes


def small_sample_warning(results: dict[str, dict[str, dict[str, Any]]]) -> str | None:
    """One warning for every (feature space, group) whose FD rests on fewer than 2 d tiles, pointing to KID."""
    short = [
        f"{space} {group} (n={entry['n']}, d={entry['dim']})"
        for space, groups in results.items()
        for group, entry in groups.items()
        if entry["fd"]["value"] is not None and entry["n"] < 2 * entry["dim"]
    ]
    if not short:
        return None
    return (
        f"FD rests on fewer than 2 d tiles per side for {len(short)} group(s): {', '.join(short)}. Below n = 2 d the "
        "covariance is poorly estimated (rank-deficient at n <= d) and FD is dominated by its finite-sample bias, "
        "which depends on n: read KID (unbiased at any n) for these groups, and compare FD only between runs at the "
        "same n."
    )
