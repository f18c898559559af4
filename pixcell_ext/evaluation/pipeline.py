"""Evaluation of a class-organised synthetic set against real tiles: which numbers, on which tiles, with which notes.

The maths lives in `metrics`, `probe` and `intervals`; the other jobs have their own modules, and this one puts them
together for `evaluate_synthetic.py`:

- `extractors`: the feature spaces (UNI2-h, Inception, a timm encoder, colour histograms, colour-jittered variants);
- `feature_store`: the tile lists and the per-file feature cache; `splits`: which tiles each metric sees;
- `distribution`: FD, KID, precision/recall, density/coverage at matched sizes with intervals;
- `downstream`: TSTR/TRTR at equal counts, the colour-jittered TSTR and the low-data curve;
- `memorisation`: nearest-training-tile distances; `lpips_scores`: LPIPS with its real baselines;
- `vae_floor`: real held-out tiles through the VAE alone, the score a perfect generator would get;
- `manifest`: which reference each synthetic tile came from; `report`, `plots`: what is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from pixcell_ext.data import load_tile, scan_image_folder
from pixcell_ext.evaluation.distribution import DistributionSettings, per_class_matched_metrics, small_sample_warning
from pixcell_ext.evaluation.downstream import ProbeSettings, low_data_curve, probe_results
from pixcell_ext.evaluation.extractors import (
    COLOUR_HISTOGRAM,
    ExtractorUnavailable,
    FeatureExtractor,
    colour_histogram_extractor,
    colour_jittered,
    inception_extractor,
    select_extractors,
    timm_extractor,
    uni_extractor,
)
from pixcell_ext.evaluation.feature_store import TileSet, compute_features
from pixcell_ext.evaluation.lpips_scores import LPIPSScorer, LPIPSSettings, lpips_metrics, lpips_report
from pixcell_ext.evaluation.memorisation import memorisation_check, write_closest_pairs
from pixcell_ext.evaluation.plots import write_plots
from pixcell_ext.evaluation.report import summary_lines, write_dataset_card, write_report
from pixcell_ext.evaluation.splits import arrange_tiles, select_probe_rows, split_per_class, subsample_per_class
from pixcell_ext.evaluation.vae_floor import (
    FLOOR_FOLDER,
    floor_rows,
    floor_section,
    round_trip_paths,
    tile_resolution,
    write_round_trips,
)
from pixcell_ext.generation.manifest import GENERATION_CONFIG_FILE, References, read_references
from pixcell_ext.model import networks
from pixcell_ext.training.feature_cache import hash_files

__all__ = [
    "COLOUR_HISTOGRAM",
    "DistributionSettings",
    "ExtractorUnavailable",
    "FeatureExtractor",
    "LPIPSScorer",
    "LPIPSSettings",
    "ProbeSettings",
    "TileSet",
    "arrange_tiles",
    "colour_histogram_extractor",
    "compute_features",
    "dependence_warnings",
    "evaluate_feature_spaces",
    "extract_features",
    "inception_extractor",
    "is_standin",
    "load_tile",
    "lpips_metrics",
    "lpips_report",
    "jittered_features",
    "memorisation_report",
    "training_features",
    "memorisation_extractor",
    "memorisation_section",
    "provenance_notes",
    "read_references",
    "select_extractors",
    "select_probe_rows",
    "split_per_class",
    "subsample_per_class",
    "summary_lines",
    "synthetic_provenance",
    "timm_extractor",
    "uni_extractor",
    "vae_floor_features",
    "vae_floor_report",
    "write_dataset_card",
    "write_plots",
    "write_report",
]

MEMORISATION_SPACES = ("timm:", "inception", "uni")  # preference order: independent encoders first
NO_TRAINING_NOTE = "Memorisation check skipped: pass --train_data_dir (the generator's training tiles) to run it."
NO_SPACE_NOTE = "Memorisation check skipped: no feature space with distances (timm, Inception or UNI2-h) loaded."
NO_FLOOR_TILES_NOTE = (
    "VAE floor skipped: the real probe test set holds no tile of a generated class to round-trip through the VAE "
    "(pass a --real_test_dir with those classes)."
)
NO_HELD_OUT_NOTE = (
    "Memorisation check skipped: fewer than two real probe test tiles are outside --train_data_dir (or none of a "
    "generated class), so there is no held-out scale to compare with "
    "(pass a --real_test_dir the generator was not trained on)."
)

INTERVAL_NOTE = (
    "What the intervals cover: for FD, KID, precision/recall and density/coverage, the expected value of the metric "
    "at the matched n (FD's lies above the population FD, which no finite n estimates; compare FDs only at equal n), "
    "from a delete-a-group jackknife over both sides (FD, KID) or half-samples (the k-NN metrics), with the variance "
    "of the average over --matched_draws; for probe accuracies, the accuracy of the trained probe on new test tiles "
    "(a bootstrap over test tiles); for low-data points and gains, the expected accuracy over which k real tiles are "
    "drawn as well; for LPIPS, the mean over pairs (a bootstrap over pairs)."
)
GENERAL_NOTES = [
    "Distribution metrics compare equal numbers of real and synthetic tiles per class (the larger side subsampled, "
    "repeated draws averaged); 'overall' keeps those per-class counts, so class proportions match too.",
    "NCT-CRC-HE is separable by colour alone: a TSTR score means something only where it beats the colour_histogram "
    "probe.",
    INTERVAL_NOTE,
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
    listed = sum(tiles.paths[i].resolve() in references for i in rows["synthetic"])
    if manifest is not None and (not listed or manifest.unresolved):
        found.append(
            (
                f"manifest.csv in the synthetic folder lists none of its {len(refs)} tiles"
                if not listed
                else f"{len(manifest.unresolved)} references in manifest.csv were not found (e.g. "
                f"'{manifest.unresolved[0]}')"
            )
            + ", so the reference-overlap checks (references inside --real_dir or the probe test set) did not run "
            "for those tiles. Evaluate the folder generate_synthetic.py wrote, with its references where "
            "generation_config.json says they are."
        )
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


def missing_class_warning(real_dir: str | os.PathLike, classes: Sequence[str]) -> list[str]:
    """Real classes absent from the synthetic set would otherwise vanish from 'overall' without a word."""
    real_classes = scan_image_folder(real_dir, allow_missing_classes=True, verify=False).class_names
    missing = [name for name in real_classes if name not in classes]
    if not missing:
        return []
    return [
        f"Real classes {missing} have no synthetic tiles, so every metric, 'overall' included, covers only "
        f"{list(classes)}. Generate those classes too, or pass --classes to say the subset is intended."
    ]


def extract_features(
    accelerator: Accelerator,
    extractors: Sequence[FeatureExtractor],
    paths: Sequence[Path],
    digests: Sequence[str],
    cache_dir: str | os.PathLike,
    *,
    batch_size: int,
    num_workers: int,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Features of ``paths`` per extractor (main process; empty elsewhere) and the extractors skipped, with why.

    Every process must call this (the cache fill has barriers); an unavailable extractor is skipped on all alike.
    """
    features, skipped = {}, {}
    for extractor in extractors:
        try:
            matrix = compute_features(
                accelerator, extractor, paths, digests, cache_dir, batch_size=batch_size, num_workers=num_workers
            )
        except ExtractorUnavailable as error:
            skipped[extractor.name] = str(error)
            continue
        if matrix is not None:
            features[extractor.name] = matrix
    return features, skipped


def jittered_features(
    accelerator: Accelerator,
    extractors: Sequence[FeatureExtractor],
    skipped: dict[str, str],
    tiles: TileSet,
    synthetic_rows: Sequence[int],
    digests: Sequence[str],
    **extract: Any,
) -> dict[str, np.ndarray]:
    """Features of the colour-jittered synthetic tiles (for ``TSTR_colour_jitter``), keyed by the jittered
    extractor's name, one row per tile of ``tiles`` (rows other than ``synthetic_rows`` are zero, never read)."""
    twins = [colour_jittered(e) for e in extractors if e.name not in skipped]
    paths, keys = [tiles.paths[i] for i in synthetic_rows], [digests[i] for i in synthetic_rows]
    computed, _ = extract_features(accelerator, twins, paths, keys, **extract)
    full = {}
    for name, matrix in computed.items():
        full[name] = np.zeros((len(tiles.paths), matrix.shape[1]), dtype=matrix.dtype)
        full[name][list(synthetic_rows)] = matrix
    return full


def training_features(
    accelerator: Accelerator, extractor: FeatureExtractor, training: TileSet, **extract: Any
) -> tuple[np.ndarray | None, list[str]]:
    """Features of the generator's training tiles in the memorisation space (None off the main process) and their
    content digests."""
    digests = hash_files(accelerator, training.paths)
    features, _ = extract_features(accelerator, [extractor], training.paths, digests, **extract)
    return features.get(extractor.name), digests


def memorisation_extractor(extractors: Sequence[FeatureExtractor], skipped: dict[str, str]) -> FeatureExtractor | None:
    """The space for the memorisation check: an independent encoder when there is one, else UNI2-h (with a note)."""
    available = [e for e in extractors if e.name not in skipped and e.distribution_metrics]
    for prefix in MEMORISATION_SPACES:
        for extractor in available:
            if extractor.name.startswith(prefix):
                return extractor
    return None


def memorisation_section(
    extractor: FeatureExtractor,
    generated: np.ndarray,
    training: np.ndarray,
    held_out: np.ndarray,
    generated_paths: Sequence[Path],
    training_paths: Sequence[Path],
    pairs_path: Path,
    *,
    labels: tuple[Sequence[str], Sequence[str]],
    confidence: float,
) -> tuple[dict[str, Any], list[str]]:
    """The report's ``memorisation`` section, the closest-pairs image, and warnings (copies found, a UNI-only check).

    ``labels`` are the (generated, held-out) classes: thresholds are per class (see `memorisation`)."""
    result = memorisation_check(
        generated, training, held_out, generated_labels=labels[0], held_out_labels=labels[1], confidence=confidence
    )
    distances, nearest = result.pop("generated_distances"), result.pop("nearest_training_rows")
    result["feature_space"] = extractor.name
    result["pairs_image"] = str(write_closest_pairs(pairs_path, generated_paths, training_paths, distances, nearest))
    found = []
    if extractor.name == "uni":
        found.append(
            "Memorisation measured in UNI2-h space, which conditions the generator: pass an independent encoder "
            "(--timm_encoder) for a check the generator could not have been steered towards."
        )
    if result["flagged"]:
        share = result["possible_copies"]["value"]
        found.append(
            f"Possible copies of training tiles: {share:.1%} of the generated tiles are closer to a training tile than "
            f"about 99 % of held-out real tiles of their class are ({result['expected_by_chance']:.1%} expected, "
            f"exact p = {result['p_value']:.2g}); look at {result['pairs_image']}."
        )
    return result, found


def memorisation_report(
    extractor: FeatureExtractor | None,
    features: dict[str, np.ndarray],
    training_features: tuple[np.ndarray | None, list[str]] | None,
    tiles: TileSet,
    rows: dict[str, Sequence[int]],
    digests: Sequence[str],
    training: TileSet | None,
    pairs_path: Path,
    *,
    confidence: float,
) -> tuple[dict[str, Any], list[str]]:
    """The ``memorisation`` section (or ``{"skipped": reason}``) and its warnings.

    Held-out tiles are the probe test tiles (``--real_test_dir``) or the real tiles, minus any whose bytes are in the
    training set: a training tile's distance to itself is 0 and would lower the threshold to nothing.
    """
    if training is None:
        return {"skipped": NO_TRAINING_NOTE}, []
    if extractor is None or training_features is None or training_features[0] is None:
        return {"skipped": NO_SPACE_NOTE}, []
    training_matrix, training_digests = training_features[0], set(training_features[1])
    held_out = [i for i in rows["real_test"] if digests[i] not in training_digests]
    if len(held_out) < 2 or not {tiles.labels[i] for i in held_out} & {tiles.labels[i] for i in rows["synthetic"]}:
        return {"skipped": NO_HELD_OUT_NOTE}, []
    matrix, synthetic = features[extractor.name], list(rows["synthetic"])
    return memorisation_section(
        extractor,
        matrix[synthetic],
        training_matrix,
        matrix[held_out],
        [tiles.paths[i] for i in synthetic],
        training.paths,
        pairs_path,
        labels=([tiles.labels[i] for i in synthetic], [tiles.labels[i] for i in held_out]),
        confidence=confidence,
    )


@dataclass
class FloorTiles:
    """The VAE floor's tiles: round trips of real held-out tiles, and the real rows they are compared with."""

    trips: TileSet
    reference_rows: list[int]
    resolution: int
    features: dict[str, np.ndarray]


def vae_floor_features(
    accelerator: Accelerator,
    vae_name_or_path: str | None,
    extractors: Sequence[FeatureExtractor],
    skipped: dict[str, str],
    tiles: TileSet,
    rows: dict[str, list[int]],
    classes: Sequence[str],
    output_dir: Path,
    *,
    seed: int,
    **extract: Any,
) -> FloorTiles | None:
    """Round trips written by the main process, then their features in every distribution space (all processes
    extract; the features are on the main process). None without a VAE or when nothing is held out to round-trip."""
    if vae_name_or_path is None:
        return None
    picked, reference = floor_rows(tiles, rows, classes, seed)
    if not picked:
        return None
    folder, originals = Path(output_dir) / FLOOR_FOLDER, tiles.subset(picked)
    resolution = tile_resolution(tiles.paths[rows["synthetic"][0]])
    vae = networks.load_vae(vae_name_or_path).to(accelerator.device)  # on every process: a failure stops all alike
    if accelerator.is_main_process:
        write_round_trips(vae, originals, folder, resolution, batch_size=extract["batch_size"])
    accelerator.wait_for_everyone()
    trips = round_trip_paths(originals, folder)
    spaces = [e for e in extractors if e.name not in skipped and e.distribution_metrics]
    features, _ = extract_features(accelerator, spaces, trips.paths, hash_files(accelerator, trips.paths), **extract)
    return FloorTiles(trips, reference, resolution, features)


def vae_floor_report(
    vae_name_or_path: str | None,
    floor: FloorTiles | None,
    features: dict[str, np.ndarray],
    tiles: TileSet,
    classes: Sequence[str],
    settings: DistributionSettings,
    *,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, Any] | None, list[str]]:
    """The ``vae_floor`` section (None without a VAE) and its notes: per space, the round trips against the real
    tiles, with the synthetic set's estimators and settings."""
    if vae_name_or_path is None:
        return None, []
    if floor is None:
        return None, [NO_FLOOR_TILES_NOTE]
    reference = floor.reference_rows
    distributions = {
        name: per_class_matched_metrics(
            features[name][reference],
            [tiles.labels[i] for i in reference],
            matrix,
            floor.trips.labels,
            classes,
            settings,
            device=device,
        )[0]
        for name, matrix in floor.features.items()
    }
    counts = floor.trips.counts(classes)
    return floor_section(vae_name_or_path, floor.resolution, counts, distributions), []


def evaluate_feature_spaces(
    extractors: Sequence[FeatureExtractor],
    features: dict[str, np.ndarray],
    jittered: dict[str, np.ndarray],
    tiles: TileSet,
    distribution_rows: dict[str, Sequence[int]],
    probe_rows: dict[str, Sequence[int]] | None,
    classes: Sequence[str],
    distribution_settings: DistributionSettings,
    probe_settings: ProbeSettings,
    *,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Per feature space: matched distribution metrics, the probes and the low-data curve, all with intervals.

    ``features[name]`` holds one row per tile of ``tiles``; ``jittered[name]`` likewise (only synthetic rows are
    read). ``probe_rows`` (see `splits.select_probe_rows`) is None when the probes cannot run. Returns the report's
    ``extractors`` section and its warnings (one for all groups where FD rests on too few tiles).
    """
    results, warnings_out, distributions = {}, [], {}
    real, syn = list(distribution_rows["real"]), list(distribution_rows["synthetic"])
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
            entry["distribution"], found = per_class_matched_metrics(
                matrix[real],
                [tiles.labels[i] for i in real],
                matrix[syn],
                [tiles.labels[i] for i in syn],
                classes,
                distribution_settings,
                device=device,
            )
            distributions[extractor.name] = entry["distribution"]
            warnings_out += [f"[{extractor.name}] {text}" for text in found]
        entry["probe"], entry["low_data"] = None, None
        if probe_rows:
            twin = jittered.get(f"{extractor.name}+colour-jitter")
            entry["probe"] = probe_results(matrix, tiles.labels, probe_rows, probe_settings, jittered_synthetic=twin)
            entry["low_data"] = low_data_curve(matrix, tiles.labels, probe_rows, probe_settings)
        results[extractor.name] = entry
    warning = small_sample_warning(distributions)
    return results, warnings_out + ([warning] if warning else [])


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
