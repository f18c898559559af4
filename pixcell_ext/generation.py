"""Class-organised synthetic datasets from an adapted PixCell: work list, references, manifest, run-config check.

Layout of an output directory (the original notebook's, plus bookkeeping that class-folder loaders ignore):

    OUT/<CLASS>/gen_0000.png ...     one image per (class, index)
    OUT/manifest.csv                 one row per image, sorted by (class, index)
    OUT/generation_config.json       what the images were made with (checked on every rerun)
    OUT/.contact_sheet_<CLASS>.png   references above, synthetic tiles below

The contact sheets are hidden top-level files on purpose: a folder beside the classes would become a class for
torchvision's `ImageFolder`, and an image file at the top level makes `datasets`' imagefolder drop the labels.

Every image is a pure function of the configuration and its (class, index): its noise comes from its own generator
seeded from (seed, class, index), its reference tile from a seeded permutation of the class folder, and every forward
runs at the full batch shape (a short batch is padded by repeating its last item), because CPU kernels round
differently for different batch sizes. So the files do not depend on how the work list was split across processes
or resumed, and the manifest can be rebuilt from the configuration at the end instead of being accumulated.
On CPUs the oneDNN convolutions of the VAE also round differently for different thread counts: byte identity across
process counts there needs the same OMP_NUM_THREADS per process (`accelerate launch` gives each process 1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import numpy as np
import torch

from pixcell_ext.adapter import ADAPTER_FILE, AdapterConfig, UNIAdapter, read_adapter_config
from pixcell_ext.artifacts import LORA_FILE, load_trained, read_training_config
from pixcell_ext.conditioning import AdaptedPixCell
from pixcell_ext.data import UNI_RESAMPLE, DataError, file_digest, load_tile, read_rgb, scan_image_folder
from pixcell_ext.features import model_identity
from pixcell_ext.files import write_json_atomically, write_png_atomically
from pixcell_ext.lora import merge_lora
from pixcell_ext.lora_files import DamagedFileError, LoRAMismatchError, read_lora_config
from pixcell_ext.manifest import DATASET_CARD_FILE, GENERATION_CONFIG_FILE, MANIFEST_FILE
from pixcell_ext.models import UNI_IMAGE_SIZE, AutoencoderKL, PixCellTransformer2DModel, UNIEncoder, decode_latents
from pixcell_ext.sampling import sample_latents_cfg, to_uint8_images
from pixcell_ext.seeding import derived_seed, generator_for
from pixcell_ext.validation import contact_sheet

logger = logging.getLogger(__name__)

PIXEL_KEYS = (
    "model",
    "revision",
    "vae",
    "uni",
    "lora_sha256",
    "seed",
    "guidance_scale",
    "num_inference_steps",
    "scheduler",
    "dtype",
)
"""Settings that change pixels: an output directory holds images of one value of each, never a mix. The resolution
is recorded too but not compared: the model's identity fixes it. The batch size is not compared either: it changes
nothing on GPUs and at most a few pixels by one grey level on CPUs (see tests/test_generate.py)."""
CONTACT_SHEET_PAIRS = 8
UNREADABLE = (OSError, ValueError, SyntaxError)  # what PIL raises for truncated or foreign files


class GenerationConfigError(ValueError):
    """The output directory holds images made with another configuration; adding to it would mix two datasets."""


@dataclass(frozen=True)
class WorkItem:
    """One image to make. `reference` is None for a class without reference tiles (class-only with class
    conditioning, else unconditional)."""

    class_name: str
    index: int
    reference: Path | None
    seed: int

    @property
    def file(self) -> str:
        return f"{self.class_name}/gen_{self.index:04d}.png"


# ---------------------------------------------------------------------------------------------- references


def default_classes(reference_data_dir: str | os.PathLike) -> list[str]:
    """The class folders of the reference directory, sorted."""
    return scan_image_folder(reference_data_dir, allow_missing_classes=True, verify=False).class_names


def class_files(reference_data_dir: str | os.PathLike, classes: list[str]) -> dict[str, list[Path]]:
    """Image files per class, sorted; a missing or empty class folder maps to []. No file is decoded here."""
    index = scan_image_folder(reference_data_dir, classes=classes, allow_missing_classes=True, verify=False)
    files: dict[str, list[Path]] = {name: [] for name in index.class_names}
    for record in index.records:
        files[index.class_names[record.label]].append(record.path)
    return files


def reference_identity(files: list[Path]) -> str | None:
    """Names and sizes of a class folder's files: they fix the seeded reference order. None for no references."""
    if not files:
        return None
    listing = "\n".join(f"{path.name}\t{path.stat().st_size}" for path in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def choose_references(
    files: list[Path], count: int, *, seed: int, class_name: str, skip_bad_images: bool
) -> list[Path]:
    """Up to `count` readable files of a class, in the order of a permutation seeded by (seed, class).

    Only the files taken are decoded, so a 100K-tile folder costs `count` reads. The first k references are the same
    for every count >= k, so growing `--num_images_per_class` keeps the existing images' references.
    """
    order = torch.randperm(len(files), generator=generator_for(seed, "references", class_name)).tolist()
    chosen: list[Path] = []
    for position in order:
        if len(chosen) == count:
            break
        path = files[position]
        try:
            read_rgb(path)
        except UNREADABLE as error:
            if not skip_bad_images:
                raise DataError(
                    f"Unreadable reference tile '{path}' ({type(error).__name__}: {error}). Replace or delete it, "
                    "or pass --skip_bad_images to skip it (the next tile of the seeded order takes its place)."
                ) from error
            logger.warning("Skipping unreadable reference tile %s (%s)", path, error)
            continue
        chosen.append(path)
    return chosen


def work_items(references: dict[str, list[Path]], images_per_class: dict[str, int], seed: int) -> list[WorkItem]:
    """Every image of the given classes in (class, index) order; references are reused cyclically when short."""
    items = []
    for name, count in images_per_class.items():
        tiles = references[name]
        for index in range(count):
            reference = tiles[index % len(tiles)] if tiles else None
            items.append(WorkItem(name, index, reference, derived_seed(seed, name, index)))
    return items


def unfinished(items: list[WorkItem], output_dir: Path) -> list[WorkItem]:
    """Items whose PNG does not exist yet. Every process must call this while no process writes (between two
    barriers), so that all of them split the same list."""
    return [item for item in items if not (output_dir / item.file).exists()]


def class_batches(items: list[WorkItem], batch_size: int) -> Iterator[tuple[str, list[list[WorkItem]]]]:
    """(class, batches) in work-list order; batches do not cross classes, so progress is reported per class."""
    for name, group in groupby(items, key=lambda item: item.class_name):
        group = list(group)
        yield name, [group[i : i + batch_size] for i in range(0, len(group), batch_size)]


# ---------------------------------------------------------------------------------------------- models


def check_lora_dir(lora_dir: str | None) -> None:
    """Refuse a missing, incomplete or damaged --lora_dir in a second, before any model loads (reads headers only)."""
    if lora_dir is None:
        return
    directory = Path(lora_dir)
    fix = "Pass the --output_dir of a train_adapter_lora.py run (or a checkpoint-N folder inside it)."
    if not directory.is_dir():
        problem = "is a file, not a folder" if directory.exists() else "does not exist"
        raise DataError(f"--lora_dir '{lora_dir}' {problem}. {fix}")
    missing = [name for name in (ADAPTER_FILE, LORA_FILE) if not (directory / name).is_file()]
    if missing:
        raise DataError(f"--lora_dir '{lora_dir}' is not a training output: {', '.join(missing)} missing. {fix}")
    read_adapter_config(directory / ADAPTER_FILE)
    read_lora_config(directory / LORA_FILE)


def load_generation_model(
    transformer: PixCellTransformer2DModel, lora_dir: str | None, model_name: str
) -> AdaptedPixCell:
    """The adapted model, its LoRA merged into fp32 weights (inference then costs exactly the base model).

    In bf16/fp16 the LoRA stays unmerged and runs in fp32 beside the half-precision base: rounding W + ΔW to bf16
    would erase most of a small update (see `LoRALinear.merge`), and generated sets would then show less of the
    fine-tuning than the (unmerged) validation panels did. Without `lora_dir` the adapter is `UNIAdapter` at init,
    which is the identity: the released PixCell.
    """
    if lora_dir is None:
        adapter = UNIAdapter(AdapterConfig(embed_dim=transformer.config.caption_channels))
        return AdaptedPixCell(transformer, adapter.to(transformer.device)).eval()
    trained_on = read_training_config(lora_dir).get("pretrained_model_name_or_path")
    if trained_on is not None and trained_on != model_name:
        logger.warning(
            "--lora_dir %s was trained on '%s' but generation uses '%s'; fine if they are copies of one checkpoint.",
            lora_dir,
            trained_on,
            model_name,
        )
    try:
        model = load_trained(lora_dir, transformer)
    except DamagedFileError:
        raise  # the file is at fault, not the choice of model: its message says so
    except (LoRAMismatchError, ValueError) as error:
        raise LoRAMismatchError(
            f"--lora_dir '{lora_dir}' does not fit the model '{model_name}': {error}\n"
            "Pass the --pretrained_model_name_or_path the run was trained on."
        ) from error
    if transformer.dtype == torch.float32:
        merge_lora(transformer)
    else:
        logger.info("LoRA kept unmerged: merging into %s weights would round the update away.", transformer.dtype)
    return model.eval()


def lora_sha256(lora_dir: str | None) -> str | None:
    """Content hash of the adapter and LoRA files: names the trained weights whatever folder they were copied to."""
    if lora_dir is None:
        return None
    digests = [file_digest(Path(lora_dir) / name) for name in (ADAPTER_FILE, LORA_FILE)]
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def reference_pixels(path: Path) -> torch.Tensor:
    """uint8 [3, 224, 224]: the centre square of a tile resized once for UNI2-h, as training saw it."""
    return load_tile(path, UNI_IMAGE_SIZE, UNI_RESAMPLE)


@dataclass(frozen=True)
class SamplingSettings:
    guidance_scale: float
    num_inference_steps: int
    sampler: str
    batch_size: int


@torch.no_grad()
def generate_batch(
    model: AdaptedPixCell,
    uni: UNIEncoder,
    vae: AutoencoderKL,
    scheduler_config: dict,
    items: list[WorkItem],
    settings: SamplingSettings,
) -> np.ndarray:
    """uint8 [len(items), H, W, 3] for at most `settings.batch_size` items.

    Every forward (UNI2-h, adapter, transformer with both guidance branches, VAE decode) runs at the full batch
    shape: a short batch is padded by repeating its last item and the padding is discarded, so an image is the same
    bytes whichever batch or process made it.
    """
    if not 0 < len(items) <= settings.batch_size:
        raise ValueError(f"A batch holds 1 to {settings.batch_size} items, got {len(items)}.")
    padded = items + [items[-1]] * (settings.batch_size - len(items))
    device = model.transformer.device
    null_context = model.unconditional_context(len(padded))
    class_ids = None
    fallback = null_context
    if model.adapter.class_embedding is not None:
        class_ids = model.adapter.class_ids([item.class_name for item in padded])
        fallback = model.class_only_context(class_ids)
    conditional = torch.tensor([item.reference is not None for item in padded], device=device)
    context = fallback
    if conditional.any():
        blank = torch.zeros(3, UNI_IMAGE_SIZE, UNI_IMAGE_SIZE, dtype=torch.uint8)
        pixels = torch.stack([reference_pixels(i.reference) if i.reference else blank for i in padded])
        with_reference = model.context(uni(pixels.to(device)), labels=class_ids)
        context = torch.where(conditional.view(-1, 1, 1), with_reference, fallback)
    latents = sample_latents_cfg(
        model.transformer,
        scheduler_config,
        context,
        null_context,
        [torch.Generator().manual_seed(item.seed) for item in padded],
        guidance_scale=settings.guidance_scale,
        num_inference_steps=settings.num_inference_steps,
        sampler=settings.sampler,
    )
    return to_uint8_images(decode_latents(vae, latents)).numpy()[: len(items)]


# ---------------------------------------------------------------------------------------------- files


def generated_images(output_dir: Path) -> list[Path]:
    return sorted(output_dir.glob("*/gen_*.png"))


def clear_generated(output_dir: Path) -> None:
    """What `--overwrite` deletes: generated images, temporaries, manifest, contact sheets, config and the dataset
    card that described them; nothing else."""
    patterns = (
        "*/gen_*.png",
        "*/.gen_*.tmp",
        MANIFEST_FILE,
        GENERATION_CONFIG_FILE,
        DATASET_CARD_FILE,
        ".contact_sheet_*.png",
    )
    for pattern in patterns:
        for path in output_dir.glob(pattern):
            path.unlink()


def remove_stale_temporaries(output_dir: Path) -> None:
    """Half-written PNGs of a killed run; only called before any process of this run writes."""
    for path in output_dir.glob("*/.gen_*.tmp"):
        path.unlink()


# ---------------------------------------------------------------------------------------------- run config


def existing_config(output_dir: Path) -> dict | None:
    """The configuration of the images already in `output_dir`; None when it holds none (a config left by a run
    that was stopped before its first image binds nothing)."""
    path = output_dir / GENERATION_CONFIG_FILE
    if not path.exists() or not generated_images(output_dir):
        return None
    return json.loads(path.read_text())


def merged_extent(existing: dict | None, images_per_class: dict[str, int]) -> dict[str, int]:
    """Classes and counts of the directory after this run: more images or more classes is not another config."""
    extent = dict(existing["images_per_class"]) if existing else {}
    for name, count in images_per_class.items():
        extent[name] = max(count, extent.get(name, 0))
    return dict(sorted(extent.items()))


def generation_config(
    args: argparse.Namespace, *, dtype: torch.dtype, files: dict[str, list[Path]], images_per_class: dict[str, int]
) -> dict:
    """What the images of an output directory are made with: pixel settings, reference folders, extent, sources."""
    return {
        "model": model_identity(args.pretrained_model_name_or_path),
        "revision": args.revision,
        "vae": model_identity(args.vae_name_or_path),
        "uni": model_identity(args.uni_model_name_or_path),
        "lora_sha256": lora_sha256(args.lora_dir),
        "class_conditioning": trained_class_names(args.lora_dir) is not None,
        "seed": args.seed,
        "guidance_scale": args.guidance_scale,
        "num_inference_steps": args.num_inference_steps,
        "scheduler": args.scheduler,
        "dtype": str(dtype).removeprefix("torch."),
        "references": {name: reference_identity(paths) for name, paths in files.items()},
        "images_per_class": images_per_class,
        "sources": {
            "pretrained_model_name_or_path": args.pretrained_model_name_or_path,
            "vae_name_or_path": args.vae_name_or_path,
            "uni_model_name_or_path": args.uni_model_name_or_path,
            "lora_dir": args.lora_dir,
            "reference_data_dir": args.reference_data_dir,
        },
    }


def config_differences(existing: dict, config: dict) -> list[str]:
    """'key: existing -> this run' for every pixel-changing setting that differs, reference folders included."""
    differences = [
        f"{key}: {existing.get(key)!r} -> {config[key]!r}" for key in PIXEL_KEYS if existing.get(key) != config[key]
    ]
    old_refs, new_refs = existing.get("references", {}), config["references"]
    for name in sorted(old_refs.keys() & new_refs.keys()):
        if old_refs[name] != new_refs[name]:
            differences.append(
                f"references[{name}]: the class folder's files changed ({old_refs[name]!r} -> {new_refs[name]!r})"
            )
    return differences


def check_output_dir(output_dir: Path, existing: dict | None, config: dict) -> None:
    """Refuse to add images to a directory whose images were made otherwise (or by something that left no config)."""
    if existing is None:
        if generated_images(output_dir):
            raise GenerationConfigError(
                f"'{output_dir}' holds gen_*.png images but no {GENERATION_CONFIG_FILE}, so their configuration is "
                "unknown. Pass --overwrite to delete them and regenerate, or choose another --output_dir."
            )
        return
    differences = config_differences(existing, config)
    if differences:
        listing = "\n  ".join(differences)
        raise GenerationConfigError(
            f"'{output_dir}' holds images generated with a different configuration ({GENERATION_CONFIG_FILE}):\n"
            f"  {listing}\n"
            "Adding to it would mix two datasets. Pass --overwrite to delete its generated images and regenerate, "
            "or choose another --output_dir."
        )


def write_generation_config(output_dir: Path, config: dict) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomically(output_dir / GENERATION_CONFIG_FILE, config)


# ---------------------------------------------------------------------------------------------- manifest, sheets


def trained_class_names(lora_dir: str | None) -> tuple[str, ...] | None:
    """The classes a run's adapter was class-conditioned on, or None (no run, or no class conditioning)."""
    if lora_dir is None or not (Path(lora_dir) / ADAPTER_FILE).exists():
        return None
    config = read_adapter_config(Path(lora_dir) / ADAPTER_FILE)
    return config.class_names if config.class_conditioning else None


def write_contact_sheet(output_dir: Path, class_name: str, items: list[WorkItem], resolution: int) -> None:
    """The first generated images of a class under their reference tiles; grey where a class has no references."""
    done = [item for item in items if (output_dir / item.file).exists()][:CONTACT_SHEET_PAIRS]
    if not done:
        return
    grey = np.full((resolution, resolution, 3), 128, dtype=np.uint8)
    references = [
        load_tile(item.reference, resolution).permute(1, 2, 0).numpy() if item.reference else grey for item in done
    ]
    synthetic = [np.asarray(read_rgb(output_dir / item.file)) for item in done]
    titles = ["reference" if done[0].reference else "(none)", "synthetic"]
    sheet = contact_sheet([references, synthetic], [str(item.index) for item in done], titles)
    write_png_atomically(output_dir / f".contact_sheet_{class_name}.png", sheet)
