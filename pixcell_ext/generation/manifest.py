"""The generation manifest: one ``manifest.csv`` row per generated image, written by generation, read by evaluation.

One format, one writer and one reader, so that evaluation (reference-overlap checks, LPIPS against the reference),
the tiny preset's stand-in set and the tests all agree with what `generate_synthetic.py` writes:

    file,class,index,conditioning,reference,seed,guidance_scale,num_inference_steps,scheduler,model,lora_dir,lora_sha256

``file`` is relative to the synthetic folder, ``reference`` relative to the generation run's
``--reference_data_dir`` (recorded in ``generation_config.json`` beside the manifest), or ``none`` when the image
was generated without a reference tile.

The same rows are written as ``metadata.jsonl``, the layout `datasets`' imagefolder reads (``file`` renamed
``file_name``), so ``load_dataset("imagefolder", data_dir=OUT)`` keeps every image's provenance. With a metadata file
imagefolder infers no ``label`` from the class folders: the class is the metadata's ``class`` column.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pixcell_ext.files import remove_stale_temporaries, write_text_atomically

if TYPE_CHECKING:
    from pixcell_ext.generation.work_list import WorkItem

MANIFEST_FILE = "manifest.csv"
METADATA_FILE = "metadata.jsonl"
GENERATION_CONFIG_FILE = "generation_config.json"
# Written next to a synthetic set by its evaluation; a regenerated set must lose it with the images it describes.
DATASET_CARD_FILE = "DATASET_CARD.md"
MANIFEST_COLUMNS = (
    "file",
    "class",
    "index",
    "conditioning",
    "reference",
    "seed",
    "guidance_scale",
    "num_inference_steps",
    "scheduler",
    "model",
    "lora_dir",
    "lora_sha256",
)
UNCONDITIONAL_REFERENCES = {"", "none", "null", "nan"}


def conditioning_label(item: WorkItem, class_conditioning: bool) -> str:
    """The manifest's ``conditioning`` value: what an image was generated from."""
    if class_conditioning:
        return "reference+class" if item.reference else "class-only"
    return "reference" if item.reference else "unconditional"


def manifest_rows(output_dir: Path, items: list[WorkItem], config: dict) -> list[dict]:
    """One row per item whose PNG exists, in (class, index) order; rebuilt from the configuration on every run."""
    # References may be indexed as absolute paths while the flag was relative (or the reverse): compare absolute
    # paths, without resolving links, so that a tile reached through a symlinked class folder stays under the root.
    sources, reference_root = config["sources"], Path(os.path.abspath(config["sources"]["reference_data_dir"]))
    rows = []
    for item in sorted(items, key=lambda i: (i.class_name, i.index)):
        if not (output_dir / item.file).exists():
            continue
        reference = Path(os.path.abspath(item.reference)) if item.reference else None
        rows.append(
            {
                "file": item.file,
                "class": item.class_name,
                "index": item.index,
                "conditioning": conditioning_label(item, config.get("class_conditioning", False)),
                "reference": reference.relative_to(reference_root).as_posix() if reference else "none",
                "seed": item.seed,
                "guidance_scale": config["guidance_scale"],
                "num_inference_steps": config["num_inference_steps"],
                "scheduler": config["scheduler"],
                "model": sources["pretrained_model_name_or_path"],
                "lora_dir": sources["lora_dir"] or "none",
                "lora_sha256": config["lora_sha256"] or "none",
            }
        )
    return rows


def write_manifest(output_dir: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``manifest.csv`` and ``metadata.jsonl`` atomically (columns missing from a row stay empty) and clear
    killed writers' temporaries. One writer for both keeps them equal after every run, resumed or not."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS, restval="")
    writer.writeheader()
    writer.writerows(rows)
    metadata = "".join(
        json.dumps({"file_name" if key == "file" else key: row.get(key, "") for key in MANIFEST_COLUMNS}) + "\n"
        for row in rows
    )
    for name, text in ((MANIFEST_FILE, buffer.getvalue()), (METADATA_FILE, metadata)):
        remove_stale_temporaries(output_dir, name)
        write_text_atomically(Path(output_dir) / name, text)


def read_manifest(output_dir: Path) -> list[dict]:
    """The manifest's rows as dicts of strings, in file order."""
    with open(Path(output_dir) / MANIFEST_FILE, newline="") as handle:
        return list(csv.DictReader(handle))


@dataclass
class References:
    """Reference tile of each generated file (None: generated without one), resolved to existing files."""

    references: dict[Path, Path | None]
    unresolved: list[str]


def read_references(synthetic_dir: str | os.PathLike, real_dir: str | os.PathLike) -> References | None:
    """The manifest's generated file -> reference tile map, or None when the folder has no manifest.

    A reference is looked up as an absolute path, then under the generation run's ``reference_data_dir`` (from
    ``generation_config.json``), the synthetic folder, ``real_dir`` and the working directory, in that order.
    References found nowhere are listed in ``unresolved``.
    """
    synthetic_dir = Path(synthetic_dir)
    path = synthetic_dir / MANIFEST_FILE
    if not path.is_file():
        return None
    roots = [synthetic_dir, Path(real_dir), Path.cwd()]
    config_file = synthetic_dir / GENERATION_CONFIG_FILE
    if config_file.is_file():
        reference_dir = json.loads(config_file.read_text()).get("sources", {}).get("reference_data_dir")
        roots = ([Path(reference_dir)] if reference_dir else []) + roots
    rows = read_manifest(synthetic_dir)
    if rows and not {"file", "reference"} <= set(rows[0]):
        raise ValueError(f"'{path}' needs the columns 'file' and 'reference', found {list(rows[0])}")
    references: dict[Path, Path | None] = {}
    unresolved = []
    for row in rows:
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
    return References(references, unresolved)
