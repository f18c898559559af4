"""Evaluation of a class-organised synthetic set against real tiles: which numbers, on which tiles, with which notes.

The maths lives in `metrics` and `probe`; the other jobs have their own modules, and this one puts them together
for `evaluate_synthetic.py`:

- `extractors`: the feature spaces (UNI2-h, Inception, a timm encoder, colour histograms);
- `feature_store`: the tile lists and the per-file feature cache;
- `splits`: which tiles each metric sees (probe split, per-class subsamples);
- `manifest`: the generation manifest (which reference each synthetic tile came from);
- `lpips_scores`, `report`, `plots`: LPIPS, ``metrics.json`` / CSV, and the figures.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pixcell_ext.extractors import (
    COLOUR_HISTOGRAM,
    ExtractorUnavailable,
    FeatureExtractor,
    colour_histogram_extractor,
    inception_extractor,
    select_extractors,
    timm_extractor,
    uni_extractor,
)
from pixcell_ext.feature_store import TileSet, compute_features, load_tile
from pixcell_ext.lpips_scores import LPIPSScorer, lpips_metrics, lpips_report
from pixcell_ext.manifest import GENERATION_CONFIG_FILE, References, read_references
from pixcell_ext.metrics import fd_sample_warning, frechet_distance, kernel_inception_distance, precision_recall
from pixcell_ext.plots import write_plots
from pixcell_ext.probe import tstr_trtr
from pixcell_ext.report import write_report
from pixcell_ext.splits import arrange_tiles, select_probe_rows, split_per_class, subsample_per_class
from pixcell_ext.tiny import TinyStack

__all__ = [
    "COLOUR_HISTOGRAM",
    "ExtractorUnavailable",
    "FeatureExtractor",
    "LPIPSScorer",
    "TileSet",
    "arrange_tiles",
    "colour_histogram_extractor",
    "compute_features",
    "dependence_warnings",
    "distribution_metrics",
    "evaluate_feature_spaces",
    "inception_extractor",
    "is_standin",
    "load_tile",
    "lpips_metrics",
    "lpips_report",
    "per_class_distribution_metrics",
    "probe_metrics",
    "provenance_notes",
    "read_references",
    "select_extractors",
    "select_probe_rows",
    "split_per_class",
    "subsample_per_class",
    "synthetic_provenance",
    "timm_extractor",
    "tiny_evaluation",
    "uni_extractor",
    "write_plots",
    "write_report",
]

OVERALL = "overall"

GENERAL_NOTES = [
    "'overall' pools all classes, so it also reflects differences between the real and synthetic class proportions.",
    "NCT-CRC-HE is separable by colour alone: a TSTR score means something only where it beats the colour_histogram "
    "probe.",
]
RANDOM_ENCODERS_NOTE = "Tiny preset: random tiny encoders, a smoke test of the pipeline: the numbers mean nothing."
STANDIN_NOTE = (
    "The synthetic set is a stand-in ({generator}), not generated images: its numbers say nothing about a model."
)
NO_MANIFEST_WARNING = (
    "No manifest.csv in --synthetic_dir, so it is unknown which real tiles the synthetic ones were generated from: "
    "the reference-overlap checks (references inside --real_dir bias FD/KID/precision/recall; references inside the "
    "probe test set make TSTR optimistic) and LPIPS against the reference are off. Evaluate the folder "
    "generate_synthetic.py wrote, with its manifest.csv and generation_config.json."
)


SAME_PATIENT_SPLIT_NOTE = (
    "No --real_test_dir: the probes' real train and test tiles come from the same folder, hence the same patients "
    "and slides; a same-patient split overestimates TRTR and TSTR. Use a held-out set from other patients "
    "(CRC-VAL-HE-7K for NCT-CRC-HE-100K) as --real_test_dir."
)


def distribution_metrics(
    real: np.ndarray,
    synthetic: np.ndarray,
    *,
    kid_subsets: int,
    pr_k: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, Any], list[str]]:
    """FD, KID and k-NN precision/recall of one real/synthetic pair of feature sets, plus warning texts.

    A metric the sample sizes cannot support is None (with a warning) rather than an error, so one tiny class does
    not stop the report. The KID subset size is 1000 (the usual value) or, for smaller classes, half the smaller
    set: subsets of every image would all be the same, and their spread (``kid_std``) would say nothing.
    """
    n_real, n_syn, dim = real.shape[0], synthetic.shape[0], real.shape[1]
    result: dict[str, Any] = {"n_real": n_real, "n_synthetic": n_syn, "dim": dim}
    notes: list[str] = []
    if min(n_real, n_syn) >= 2:
        result["fd"] = frechet_distance(real, synthetic)
        fd_warning = fd_sample_warning(min(n_real, n_syn), dim)
        result["fd_warning"] = fd_warning
        notes += [fd_warning] if fd_warning else []
        subset = min(1000, max(2, min(n_real, n_syn) // 2))
        result["kid_mean"], result["kid_std"] = kernel_inception_distance(
            real, synthetic, subset_size=subset, num_subsets=kid_subsets, seed=seed, device=device
        )
        result["kid_subset_size"] = subset
    else:
        result.update(fd=None, fd_warning=None, kid_mean=None, kid_std=None, kid_subset_size=None)
        notes.append(f"FD and KID need at least 2 images on each side, got real={n_real}, synthetic={n_syn}")
    if min(n_real, n_syn) > pr_k:
        result["precision"], result["recall"] = precision_recall(real, synthetic, k=pr_k, device=device)
    else:
        result.update(precision=None, recall=None)
        notes.append(f"precision/recall with k={pr_k} need more than {pr_k} images on each side")
    return result, notes


def per_class_distribution_metrics(
    real: np.ndarray,
    real_labels: Sequence[str],
    synthetic: np.ndarray,
    synthetic_labels: Sequence[str],
    classes: Sequence[str],
    *,
    kid_subsets: int,
    pr_k: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """`distribution_metrics` for every class and for all classes pooled (key ``"overall"``), with warnings."""
    real_labels, synthetic_labels = np.asarray(real_labels), np.asarray(synthetic_labels)
    results, notes = {}, []
    for name in [*classes, OVERALL]:
        pick_real = np.ones(len(real_labels), bool) if name == OVERALL else real_labels == name
        pick_syn = np.ones(len(synthetic_labels), bool) if name == OVERALL else synthetic_labels == name
        results[name], found = distribution_metrics(
            real[pick_real], synthetic[pick_syn], kid_subsets=kid_subsets, pr_k=pr_k, seed=seed, device=device
        )
        notes += [f"{name}: {text}" for text in found]
    return results, notes


def probe_metrics(
    features: np.ndarray,
    labels: Sequence[str],
    rows: dict[str, Sequence[int]],
    *,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """TSTR and TRTR linear probes; ``rows`` picks the ``real_train``, ``real_test`` and ``synthetic`` rows."""
    labels = np.asarray(labels)

    def pair(name: str) -> tuple[np.ndarray, np.ndarray]:
        picked = np.asarray(rows[name], dtype=np.int64)
        return features[picked], labels[picked]

    return tstr_trtr(pair("real_train"), pair("real_test"), pair("synthetic"), seed=seed)


def dependence_warnings(
    tiles: TileSet, digests: Sequence[str], rows: dict[str, list[int]], manifest: References | None
) -> list[str]:
    """Count synthetic tiles that are not independent of the real tiles they are compared with.

    A tile generated from a real reference is correlated with it. References inside the real comparison set pull
    FD/KID/precision/recall towards the synthetic set (the unbiased KID can then go negative); references or
    byte-identical copies inside the probe test set make TSTR optimistic.
    """
    references = manifest.references if manifest else {}
    refs = [references.get(tiles.paths[i].resolve()) for i in rows["synthetic"]]
    found = [NO_MANIFEST_WARNING] if manifest is None else []
    real_paths = {tiles.paths[i].resolve() for i in rows["real"]}
    from_real = sum(r in real_paths for r in refs if r is not None)
    if from_real:
        found.append(
            f"{from_real} synthetic tiles were generated from references in --real_dir: they are correlated with "
            "those real tiles, which biases FD/KID/precision/recall in the synthetic set's favour (KID can go "
            "negative). Compare against real tiles that were not used as references."
        )
    test_paths = {tiles.paths[i].resolve() for i in rows["real_test"]}
    from_test = sum(r in test_paths for r in refs if r is not None)
    if from_test:
        found.append(
            f"{from_test} synthetic tiles were generated from references in the real probe test set: TSTR is "
            "optimistic (generate from training tiles only)."
        )
    test_digests = {digests[i] for i in rows["real_test"]}
    copies = sum(digests[i] in test_digests for i in rows["synthetic"])
    if copies:
        found.append(f"{copies} synthetic files are byte-identical to real probe test tiles: TSTR is meaningless.")
    return found


def evaluate_feature_spaces(
    extractors: Sequence[FeatureExtractor],
    features: dict[str, np.ndarray],
    tiles: TileSet,
    distribution_rows: dict[str, Sequence[int]],
    probe_rows: dict[str, Sequence[int]] | None,
    classes: Sequence[str],
    *,
    kid_subsets: int,
    pr_k: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Per feature space: distribution metrics (``real`` vs ``synthetic`` rows of ``tiles``) and the probes.

    ``features[name]`` holds one row per tile of ``tiles``. ``probe_rows`` (``real_train``, ``real_test``,
    ``synthetic``) is None when the probes cannot run. Returns the report's ``extractors`` section and warnings.
    """
    results, warnings_out = {}, []
    for extractor in extractors:
        if extractor.name not in features:
            continue
        matrix = features[extractor.name]
        entry: dict[str, Any] = {
            "description": extractor.description,
            "identity": extractor.identity,
            "cache_id": extractor.cache_id,
            "dim": int(matrix.shape[1]),
            "random_weights": extractor.random_weights,
        }
        if extractor.distribution_metrics:
            real, syn = list(distribution_rows["real"]), list(distribution_rows["synthetic"])
            entry["distribution"], found = per_class_distribution_metrics(
                matrix[real],
                [tiles.labels[i] for i in real],
                matrix[syn],
                [tiles.labels[i] for i in syn],
                classes,
                kid_subsets=kid_subsets,
                pr_k=pr_k,
                seed=seed,
                device=device,
            )
            warnings_out += [f"[{extractor.name}] {text}" for text in found]
        entry["probe"] = probe_metrics(matrix, tiles.labels, probe_rows, seed=seed) if probe_rows else None
        results[extractor.name] = entry
    return results, warnings_out


def synthetic_provenance(synthetic_dir: str | os.PathLike) -> dict[str, Any]:
    """What made the synthetic set, from its ``generation_config.json`` (``{}`` when there is none)."""
    path = Path(synthetic_dir) / GENERATION_CONFIG_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def is_standin(provenance: dict[str, Any]) -> bool:
    """True only when the synthetic set's own config says it is a stand-in, whichever preset evaluates it."""
    return str(provenance.get("generator", "")).startswith("stand-in")


def provenance_notes(provenance: dict[str, Any], random_encoders: bool) -> list[str]:
    """Notes on a stand-in synthetic set and on random encoders."""
    notes = [RANDOM_ENCODERS_NOTE] if random_encoders else []
    if is_standin(provenance):
        notes.append(STANDIN_NOTE.format(generator=provenance["generator"]))
    return notes


def tiny_evaluation(stack: TinyStack) -> dict[str, Any]:
    """Defaults of ``--preset tiny``: the tiny tiles as real set, a stand-in synthetic set, random tiny encoders."""
    from pixcell_ext.testing_assets import TINY_TIMM_ENCODER, write_random_timm_encoder, write_standin_synthetic

    root = stack.data.parent
    return {
        "real_dir": str(stack.data),
        "synthetic_dir": str(write_standin_synthetic(stack.data, root / "nct-tiny-standin-synthetic")),
        "output_dir": "outputs/tiny-evaluation",
        "uni_model_name_or_path": str(stack.uni),
        "timm_encoder": TINY_TIMM_ENCODER,
        "timm_encoder_weights": str(write_random_timm_encoder(TINY_TIMM_ENCODER, root / "timm-tiny-random")),
        "batch_size": 8,
        "dataloader_num_workers": 0,
        "kid_subsets": 20,
    }


def __getattr__(name: str) -> Any:
    """The stand-in builders stay importable from here without putting them on the evaluation import path."""
    if name in {"write_standin_synthetic", "write_random_timm_encoder", "TINY_TIMM_ENCODER"}:
        from pixcell_ext import testing_assets

        return getattr(testing_assets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
