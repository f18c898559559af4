"""The run configuration of a generated set: what its images were made with, checked on every rerun.

An output directory holds images of one configuration, never a mix: `generation_config.json` records it, and a rerun
with other pixel-changing settings is refused (`--overwrite` deletes what a run wrote, and nothing else).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pixcell_ext.data import file_digest
from pixcell_ext.errors import ExplainedError
from pixcell_ext.files import write_json_atomically
from pixcell_ext.generation.manifest import DATASET_CARD_FILE, GENERATION_CONFIG_FILE, MANIFEST_FILE, METADATA_FILE
from pixcell_ext.generation.work_list import class_files, default_classes, reference_identity
from pixcell_ext.model.adapter import ADAPTER_FILE, read_adapter_config
from pixcell_ext.training.feature_cache import model_identity
from pixcell_ext.training.run_directory import LORA_FILE

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


class GenerationConfigError(ValueError, ExplainedError):
    """The output directory holds images made with another configuration; adding to it would mix two datasets."""


def generated_images(output_dir: Path) -> list[Path]:
    return sorted(output_dir.glob("*/gen_*.png"))


def clear_generated(output_dir: Path) -> None:
    """What `--overwrite` deletes: generated images, temporaries, manifest, contact sheets, config and the dataset
    card that described them; nothing else."""
    patterns = (
        "*/gen_*.png",
        "*/.gen_*.tmp",
        MANIFEST_FILE,
        METADATA_FILE,
        GENERATION_CONFIG_FILE,
        DATASET_CARD_FILE,
        ".contact_sheet_*.png",
    )
    for pattern in patterns:
        for path in output_dir.glob(pattern):
            path.unlink()


def remove_half_written_images(output_dir: Path) -> None:
    """Half-written PNGs of a killed run; only called before any process of this run writes."""
    for path in output_dir.glob("*/.gen_*.tmp"):
        path.unlink()


def lora_sha256(lora_dir: str | None) -> str | None:
    """Content hash of the adapter and LoRA files: names the trained weights whatever folder they were copied to."""
    if lora_dir is None:
        return None
    digests = [file_digest(Path(lora_dir) / name) for name in (ADAPTER_FILE, LORA_FILE)]
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def trained_class_names(lora_dir: str | None) -> tuple[str, ...] | None:
    """The classes a run's adapter was class-conditioned on, or None (no run, or no class conditioning)."""
    if lora_dir is None or not (Path(lora_dir) / ADAPTER_FILE).exists():
        return None
    config = read_adapter_config(Path(lora_dir) / ADAPTER_FILE)
    return config.class_names if config.class_conditioning else None


def check_classes(
    references: dict[str, list[Path]],
    trained_classes: tuple[str, ...] | None,
    reference_data_dir: str,
    *,
    allow_unconditional: bool,
) -> None:
    """Refuse classes the run cannot make what the user expects of: a class a class-conditioned adapter was not
    trained on, and, without class conditioning, a class without reference tiles (a typo in --classes, or an empty
    folder), which could only be generated unconditionally: no class at all, under the class's name. The latter is
    allowed with `allow_unconditional`, and then logged per class."""
    missing = [name for name, tiles in references.items() if not tiles]
    if trained_classes is not None:
        unknown = sorted(set(references) - set(trained_classes))
        if unknown:
            raise GenerationConfigError(
                f"--lora_dir was trained with class conditioning on {list(trained_classes)}; it cannot generate "
                f"{unknown}. Pass --classes from that list."
            )
        fallback = "its class embedding alone (conditioning=class-only)"
    elif missing and not allow_unconditional:
        available = class_files(reference_data_dir, default_classes(reference_data_dir))
        known = [name for name, tiles in available.items() if tiles]
        raise GenerationConfigError(
            f"No reference tiles for {missing} in --reference_data_dir '{reference_data_dir}' (classes with tiles: "
            f"{known}), and the adapter was not trained with --class_conditioning, so these would be generated "
            "unconditionally, not as their class. Fix --classes, add reference tiles, or pass --allow_unconditional "
            "to generate them unconditionally."
        )
    else:
        fallback = "the adapted unconditional embedding (conditioning=unconditional)"
    for name in missing:
        logger.warning(f"{name}: no reference tiles in '{reference_data_dir}/{name}'; generating from {fallback}.")


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


@dataclass(frozen=True)
class GenerationSettings:
    """The command-line values a generation run's configuration records: sources, seed and sampler."""

    pretrained_model_name_or_path: str
    revision: str | None
    vae_name_or_path: str
    uni_model_name_or_path: str
    lora_dir: str | None
    reference_data_dir: str
    seed: int
    guidance_scale: float
    num_inference_steps: int
    scheduler: str


def generation_config(
    settings: GenerationSettings,
    *,
    dtype: torch.dtype,
    files: dict[str, list[Path]],
    images_per_class: dict[str, int],
) -> dict:
    """What the images of an output directory are made with: pixel settings, reference folders, extent, sources."""
    return {
        "model": model_identity(settings.pretrained_model_name_or_path),
        "revision": settings.revision,
        "vae": model_identity(settings.vae_name_or_path),
        "uni": model_identity(settings.uni_model_name_or_path),
        "lora_sha256": lora_sha256(settings.lora_dir),
        "class_conditioning": trained_class_names(settings.lora_dir) is not None,
        "seed": settings.seed,
        "guidance_scale": settings.guidance_scale,
        "num_inference_steps": settings.num_inference_steps,
        "scheduler": settings.scheduler,
        "dtype": str(dtype).removeprefix("torch."),
        "references": {name: reference_identity(paths) for name, paths in files.items()},
        "images_per_class": images_per_class,
        "sources": {
            "pretrained_model_name_or_path": settings.pretrained_model_name_or_path,
            "vae_name_or_path": settings.vae_name_or_path,
            "uni_model_name_or_path": settings.uni_model_name_or_path,
            "lora_dir": settings.lora_dir,
            "reference_data_dir": settings.reference_data_dir,
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
