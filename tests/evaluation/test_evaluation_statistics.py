"""Matched sizes, intervals, memorisation and the low-data curve, on synthetic features with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from pixcell_ext.evaluation.distribution import DistributionSettings, matched_metrics, matched_rows
from pixcell_ext.evaluation.downstream import ProbeSettings, low_data_curve, low_data_ks, probe_results
from pixcell_ext.evaluation.feature_store import TileSet
from pixcell_ext.evaluation.intervals import balanced_accuracy, balanced_accuracy_estimate
from pixcell_ext.evaluation.memorisation import memorisation_check
from pixcell_ext.evaluation.metrics import kernel_inception_distance
from pixcell_ext.evaluation.splits import select_probe_rows

CLASSES = ["A", "B", "C"]

pytestmark = pytest.mark.usefixtures("one_thread", "one_blas_thread")


@pytest.fixture
def one_blas_thread():
    """The probes' small logistic regressions lose more to BLAS threads on a busy machine than they gain."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


def test_matched_rows_are_seeded_and_exact_in_count():
    real_labels = ["A"] * 50 + ["B"] * 7 + ["C"] * 30
    synthetic_labels = ["A"] * 10 + ["B"] * 12 + ["C"] * 30
    real, synthetic = matched_rows(real_labels, synthetic_labels, CLASSES, seed=0, draw=0)
    for name, expected in (("A", 10), ("B", 7), ("C", 30)):
        assert sum(real_labels[i] == name for i in real) == expected
        assert sum(synthetic_labels[i] == name for i in synthetic) == expected
    assert len(set(real)) == len(real) and len(set(synthetic)) == len(synthetic)  # without replacement
    again = matched_rows(real_labels, synthetic_labels, CLASSES, seed=0, draw=0)
    assert all(np.array_equal(a, b) for a, b in zip(again, (real, synthetic), strict=True))
    other = matched_rows(real_labels, synthetic_labels, CLASSES, seed=0, draw=1)
    assert not np.array_equal(other[0], real)  # another draw of the 50 A tiles
    alone, _ = matched_rows(real_labels, synthetic_labels, ["A"], seed=0, draw=0)
    assert np.array_equal(alone, real[: alone.size])  # a class's draw does not depend on the other classes


def _gaussian(rng: np.random.Generator, n: int, shift: float) -> np.ndarray:
    return rng.normal(size=(n, 8)) + shift


@pytest.mark.parametrize("shift", [0.0, 0.5])
def test_kid_interval_covers_the_true_value_in_most_repeated_draws(shift):
    settings = DistributionSettings(draws=1, groups=10, seed=0)
    truth = 0.0
    if shift:  # MMD² between the two distributions, estimated once on a sample 50 times larger than each draw
        big = np.random.default_rng(99)
        truth, _ = kernel_inception_distance(
            _gaussian(big, 5000, 0.0), _gaussian(big, 5000, shift), subset_size=2500, num_subsets=4
        )
    covered, widths = 0, []
    for trial in range(10):
        rng = np.random.default_rng(trial)
        real, synthetic = _gaussian(rng, 100, 0.0), _gaussian(rng, 100, shift)
        kid = matched_metrics(real, ["A"] * 100, synthetic, ["A"] * 100, ["A"], settings)["kid"]
        assert kid["n"] == 100 and kid["low"] <= kid["value"] <= kid["high"]
        covered += kid["low"] <= truth <= kid["high"]
        widths.append(kid["high"] - kid["low"])
    assert covered >= 8, covered
    if shift:
        assert truth > np.median(widths)  # the shift is resolved: intervals are narrower than the effect


def test_every_distribution_metric_has_value_interval_and_n():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(90, 6))
    synthetic = rng.normal(size=(45, 6))
    labels_real, labels_syn = np.repeat(CLASSES, 30), np.repeat(CLASSES, 15)
    result = matched_metrics(real, labels_real, synthetic, labels_syn, CLASSES, DistributionSettings(draws=2))
    assert result["n"] == 45 and result["n_per_class"] == dict.fromkeys(CLASSES, 15)
    for metric in ("fd", "kid", "precision", "recall", "density", "coverage"):
        entry = result[metric]
        assert entry["n"] == 45 and entry["low"] <= entry["value"] <= entry["high"], metric


def test_memorisation_flags_a_copying_generator_and_not_a_fresh_one():
    rng = np.random.default_rng(0)
    training, held_out = rng.normal(size=(400, 16)), rng.normal(size=(300, 16))
    fresh = rng.normal(size=(200, 16))
    copies = training[rng.choice(400, 200)] + rng.normal(0, 1e-3, (200, 16))  # near-exact training tiles
    assert not memorisation_check(fresh, training, held_out)["flagged"]
    copied = memorisation_check(copies, training, held_out)
    assert copied["flagged"] and copied["possible_copies"]["value"] > 0.9
    half = memorisation_check(np.concatenate([fresh[:150], copies[:50]]), training, held_out)
    assert half["flagged"] and 0.2 < half["possible_copies"]["value"] < 0.35


def _classified(rng: np.random.Generator, labels: list[str], noise: float) -> np.ndarray:
    centres = {name: 3.0 * np.eye(8)[i] for i, name in enumerate(CLASSES)}
    return np.stack([centres[name] for name in labels]) + rng.normal(0, noise, (len(labels), 8))


def test_probes_train_on_equal_counts_and_the_low_data_curve_shows_the_synthetic_gain():
    rng = np.random.default_rng(0)
    labels = list(np.repeat(CLASSES, 40)) + list(np.repeat(CLASSES, 30)) + list(np.repeat(CLASSES, 12))
    features = _classified(rng, labels, noise=1.6)
    tiles = TileSet([f"t{i}" for i in range(len(labels))], labels)
    rows = {"real_train": list(range(120)), "real_test": list(range(120, 210)), "synthetic": list(range(210, 246))}
    probe_rows = select_probe_rows(tiles, rows, None, seed=0)
    counts = {role: {c: sum(labels[i] == c for i in probe_rows[role]) for c in CLASSES} for role in probe_rows}
    assert counts["real_train"] == counts["synthetic"] == dict.fromkeys(CLASSES, 12)
    assert counts["real_train_full"] == dict.fromkeys(CLASSES, 40)

    settings = ProbeSettings(low_data_ks=(1, 5, 40, 500), draws=3, replicates=50)
    probes = probe_results(features, labels, probe_rows, settings)
    assert probes["TRTR"]["n_train"] == probes["TSTR"]["n_train"] == 36 and probes["TRTR_full"]["n_train"] == 120
    ci = probes["TSTR"]["balanced_accuracy_ci"]
    assert ci["low"] <= ci["value"] <= ci["high"] and ci["n"] == 90
    curve = low_data_curve(features, labels, probe_rows, settings)
    assert [p["k"] for p in curve["points"]] == [1, 5, 40]  # 500 exceeds the smallest class
    first = curve["points"][0]
    assert first["real_plus_synthetic"]["value"] > first["real"]["value"]  # 1 real tile per class is not enough


def test_low_data_ks_and_balanced_accuracy_interval():
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(1)
    truth, guess = rng.choice(list("ABCD"), 60), rng.choice(list("ABCD"), 60)
    assert balanced_accuracy(truth, guess) == pytest.approx(balanced_accuracy_score(truth, guess), abs=1e-12)
    assert low_data_ks(70, (10, 50, 100, 500)) == [10, 50]
    assert low_data_ks(3, (10, 50)) == [3]
    truth = np.array(["A"] * 50 + ["B"] * 50)
    perfect = balanced_accuracy_estimate(truth, [truth.copy()], replicates=50, seed=0)
    assert perfect == {"value": 1.0, "low": 1.0, "high": 1.0, "n": 100}
    coin = np.random.default_rng(0).choice(["A", "B"], 100)
    chance = balanced_accuracy_estimate(truth, [coin], replicates=200, seed=0)
    assert chance["low"] < 0.5 < chance["high"] and chance["high"] - chance["low"] > 0.1


def test_dataset_card_says_how_the_set_was_made_its_metrics_and_the_licence():
    from pixcell_ext.evaluation.report import dataset_card

    provenance = {  # the fields generate_synthetic.py records in generation_config.json
        "sources": {"pretrained_model_name_or_path": "StonyBrook-CVLab/PixCell-256", "lora_dir": "runs/nct"},
        "lora_sha256": "ab12cd34",
        "guidance_scale": 2.5,
        "num_inference_steps": 20,
        "scheduler": "dpm",
        "seed": 7,
    }
    kid = {"value": 0.0123, "low": 0.01, "high": 0.015, "n": 50}
    overall = {m: kid for m in ("fd", "kid", "precision", "recall", "density", "coverage")}
    report = {
        "counts": {"synthetic": {"ADI": 50}},
        "extractors": {"uni": {"distribution": {"overall": overall}, "probe": None}},
        "memorisation": {"skipped": "no training tiles"},
    }
    card = dataset_card(report, provenance)
    for fact in ("PixCell-256", "ab12cd34", "2.5", "`20`", "`7`", "0.0123 [0.01, 0.015] (n=50)", "ADI 50"):
        assert fact in card, fact
    assert "UNI2-h's terms" in card and "commercial" in card and "STAND-IN" not in card
