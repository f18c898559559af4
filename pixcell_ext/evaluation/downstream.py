"""What a synthetic set is worth to a classifier: TSTR vs TRTR at equal counts, a colour-jittered TSTR, low-data gains.

- TSTR and TRTR train the same linear probe on the same number of tiles per class (n_c = min of the real-train and
  synthetic counts), so their gap is about quality, not quantity; TRTR on every real training tile is reported
  beside as the ceiling.
- NCT classes are separable by colour alone, so a probe can ride the colour shortcut. ``TSTR_colour_jitter`` trains
  on features of colour-jittered synthetic tiles (`extractors.colour_jittered`) and tests on untouched real tiles:
  a set whose TSTR survives the jitter carries more than class colours.
- The low-data curve answers the question users ask: with k real tiles per class, does adding the synthetic set
  help? The probe trains on k real tiles per class (``draws`` seeded draws per k), with and without every synthetic
  tile added, and is tested on the held-out real tiles.
Every balanced accuracy comes with an interval from resampling the test tiles (`intervals.balanced_accuracy_estimate`);
the low-data points add the variance over which real tiles were drawn (`intervals.draw_averaged_accuracy`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pixcell_ext.evaluation.intervals import balanced_accuracy_estimate, draw_averaged_accuracy, draw_averaged_gain
from pixcell_ext.evaluation.probe import linear_probe
from pixcell_ext.seeding import derived_seed

LOW_DATA_KS = (10, 50, 100, 500)


@dataclass(frozen=True)
class ProbeSettings:
    """Low-data k values, draws per k, bootstrap replicates over test tiles, interval level and seed."""

    low_data_ks: tuple[int, ...] = LOW_DATA_KS
    draws: int = 5
    replicates: int = 200
    confidence: float = 0.95
    seed: int = 0


def per_class_counts(labels: np.ndarray, rows: Sequence[int]) -> dict[str, int]:
    names, counts = np.unique(labels[np.asarray(rows, dtype=np.int64)], return_counts=True)
    return {str(n): int(c) for n, c in zip(names, counts, strict=True)}


def _probe(
    features: np.ndarray, labels: np.ndarray, train: Sequence[int], test: Sequence[int], settings: ProbeSettings
) -> dict[str, Any]:
    train, test = np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64)
    result = linear_probe(
        features[train], labels[train], features[test], labels[test], seed=settings.seed, return_predictions=True
    )
    predictions = result.pop("predictions")
    result["balanced_accuracy_ci"] = balanced_accuracy_estimate(
        labels[test], [predictions], replicates=settings.replicates, seed=settings.seed, confidence=settings.confidence
    )
    result["n_train_per_class"] = per_class_counts(labels, train)
    return result


def probe_results(
    features: np.ndarray,
    labels: Sequence[str],
    rows: dict[str, Sequence[int]],
    settings: ProbeSettings,
    *,
    jittered_synthetic: np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    """``TSTR``, ``TRTR`` (matched counts), ``TRTR_full`` (ceiling) and, with jittered features, ``TSTR_colour_jitter``.

    ``rows`` holds ``real_train`` and ``synthetic`` (matched), ``real_train_full`` and ``real_test``, as rows of
    ``features``; ``jittered_synthetic`` has one row per row of ``features`` (only the synthetic rows are read).
    """
    labels = np.asarray(labels)
    results = {
        "TSTR": _probe(features, labels, rows["synthetic"], rows["real_test"], settings),
        "TRTR": _probe(features, labels, rows["real_train"], rows["real_test"], settings),
        "TRTR_full": _probe(features, labels, rows["real_train_full"], rows["real_test"], settings),
    }
    if jittered_synthetic is not None:
        mixed = features.copy()
        synthetic = np.asarray(rows["synthetic"], dtype=np.int64)
        mixed[synthetic] = jittered_synthetic[synthetic]
        results["TSTR_colour_jitter"] = _probe(mixed, labels, synthetic, rows["real_test"], settings)
    return results


def low_data_ks(available: int, ks: Sequence[int]) -> list[int]:
    """The k values a training set with ``available`` tiles in its smallest class supports (at least one)."""
    usable = [k for k in ks if k <= available]
    return usable or ([available] if available >= 1 else [])


def low_data_curve(
    features: np.ndarray, labels: Sequence[str], rows: dict[str, Sequence[int]], settings: ProbeSettings
) -> dict[str, Any]:
    """Balanced accuracy on ``real_test`` after training on k real tiles per class, alone and with every synthetic
    tile of ``rows["synthetic_all"]`` added, and the paired gain; one entry per k, each averaged over ``draws`` seeded
    draws, its interval covering the expected value over draws of k tiles and over test sets."""
    labels = np.asarray(labels)
    train = np.asarray(rows["real_train_full"], dtype=np.int64)
    test = np.asarray(rows["real_test"], dtype=np.int64)
    synthetic = np.asarray(rows["synthetic_all"], dtype=np.int64)
    classes = sorted(set(labels[train]))
    available = min(int((labels[train] == c).sum()) for c in classes)
    points = []
    for k in low_data_ks(available, settings.low_data_ks):
        alone, added = [], []
        for draw in range(settings.draws):
            picked = []
            for name in classes:
                of = train[labels[train] == name]
                rng = np.random.default_rng(derived_seed(settings.seed, "low-data", k, draw, name))
                picked.extend(rng.permutation(of)[:k])
            for bucket, rows_used in ((alone, picked), (added, [*picked, *synthetic])):
                result = linear_probe(
                    features[rows_used],
                    labels[rows_used],
                    features[test],
                    labels[test],
                    seed=settings.seed,
                    return_predictions=True,
                )
                bucket.append(result["predictions"])
        common = {"replicates": settings.replicates, "seed": settings.seed, "confidence": settings.confidence}
        points.append(
            {
                "k": k,
                "real": draw_averaged_accuracy(labels[test], alone, **common),
                "real_plus_synthetic": draw_averaged_accuracy(labels[test], added, **common),
                "gain": draw_averaged_gain(labels[test], added, alone, **common),
            }
        )
    return {
        "points": points,
        "draws": settings.draws,
        "n_synthetic_added": int(synthetic.size),
        "n_real_test": int(test.size),
        "max_k_available": available,
    }
