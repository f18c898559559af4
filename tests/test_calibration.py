"""Known-answer simulations of the evaluation's statistical claims: the memorisation test's false-flag rate and the
coverage of the intervals. Small dimensions and vectorised code, so the whole file runs in well under a minute.

Monte Carlo slack: a rate estimated from R repetitions has standard error sqrt(p (1 - p) / R); the bounds below
allow `Z_SLACK` such errors (one-sided 0.1 %), so a correct estimator fails them about once in a thousand runs.
"""

from __future__ import annotations

import numpy as np
import pytest

from pixcell_ext.memorisation import memorisation_check

pytestmark = pytest.mark.usefixtures("one_thread")

Z_SLACK = 3.09  # one-sided 0.1 % normal quantile


def slack(rate: float, repetitions: int) -> float:
    return Z_SLACK * (rate * (1 - rate) / repetitions) ** 0.5


# ------------------------------------------------------------------------------------------------ memorisation

MEMO_CLASSES = ("A", "B", "C")
MEMO_SCALES = (0.5, 1.0, 2.0)  # nearest-training distances differ by class, so a pooled threshold is wrong
MEMO_DIM = 8


def _class_sample(rng: np.random.Generator, counts: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    parts = [
        rng.normal(size=(n, MEMO_DIM)) * scale + 6.0 * i
        for i, (n, scale) in enumerate(zip(counts, MEMO_SCALES, strict=True))
    ]
    return np.concatenate(parts), np.repeat(MEMO_CLASSES, counts)


def _memorisation_run(seed: int, held_out_counts: tuple[int, ...], copy_share: float = 0.0) -> dict:
    rng = np.random.default_rng(seed)
    training, _ = _class_sample(rng, (100, 100, 100))
    held_out, held_out_labels = _class_sample(rng, held_out_counts)
    generated, generated_labels = _class_sample(rng, (200, 200, 200))
    copies = rng.random(len(generated)) < copy_share
    same_class = np.flatnonzero(copies)  # a copy of a training tile of the tile's own class, plus tiny noise
    sources = 100 * (same_class // 200) + rng.integers(0, 100, same_class.size)
    generated[same_class] = training[sources] + rng.normal(0, 1e-3, (same_class.size, MEMO_DIM))
    return memorisation_check(
        generated, training, held_out, generated_labels=generated_labels, held_out_labels=held_out_labels
    )


@pytest.mark.parametrize("held_out_counts", [(100, 100, 100), (40, 60, 200)], ids=["balanced", "unbalanced"])
def test_a_fresh_generator_is_flagged_at_most_at_the_nominal_rate(held_out_counts):
    repetitions = 200
    runs = [_memorisation_run(seed, held_out_counts) for seed in range(repetitions)]
    pooled = np.array([run["p_value"] for run in runs])
    per_class = np.array([[run["per_class"][c]["p_value"] for c in MEMO_CLASSES] for run in runs])
    any_class_holm = np.array([min(run["per_class"][c]["p_value_holm"] for c in MEMO_CLASSES) for run in runs])
    for alpha in (0.05, 1e-3):
        bound = alpha + slack(alpha, repetitions)
        assert (pooled < alpha).mean() <= bound, (alpha, (pooled < alpha).mean())
        assert (any_class_holm < alpha).mean() <= bound, (alpha, (any_class_holm < alpha).mean())
        rates = (per_class < alpha).mean(axis=0)
        assert (rates <= bound).all(), (alpha, rates)


def test_a_generator_that_copies_five_percent_of_its_tiles_is_flagged():
    runs = [_memorisation_run(seed, (300, 300, 300), copy_share=0.05) for seed in range(20)]
    assert all(run["flagged"] for run in runs), [run["p_value"] for run in runs]
    for run in runs:
        assert 0.04 < run["possible_copies"]["value"] < 0.1  # the copies and about 1 % chance ones


# ------------------------------------------------------------------------------------------------ KID


def test_adaptation_kid_reads_zero_for_two_draws_of_one_class_stratified_distribution():
    """bench_adaptation's KID on two independent class-stratified sets (9 classes x 20, as its tables): mean within
    Monte Carlo error of 0 (measured 17, SE 70, in its x1e3 units). The plain U-statistic it used before reads
    -12 000 (SE 80) here."""
    import torch

    from pixcell_ext.mini_eval import distribution_scores

    classes, per_class, dim, repetitions = 9, 20, 8, 200
    centres = 3.0 * np.random.default_rng(0).normal(size=(classes, dim))
    labels = torch.arange(classes).repeat_interleave(per_class)
    kids = []
    for seed in range(repetitions):
        rng = np.random.default_rng(seed)
        real, fake = (torch.as_tensor(centres[labels] + rng.normal(size=(len(labels), dim))) for _ in range(2))
        kids.append(distribution_scores(real, fake, "x", real_labels=labels, fake_labels=labels)["kid_x_x1000"])
    kids = np.array(kids)
    assert abs(kids.mean()) <= Z_SLACK * kids.std(ddof=1) / repetitions**0.5, (kids.mean(), kids.std())
