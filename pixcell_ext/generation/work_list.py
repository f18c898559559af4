"""The work list of a generation run: which images to make, and which reference tile conditions each.

Every image is a pure function of the configuration and its (class, index): its reference tile comes from a seeded
permutation of the class folder and its seed from (seed, class, index), so the list does not depend on how it is split
across processes or resumed. `WorkItem` is what the manifest records, one row per item.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import torch

from pixcell_ext.data import DataError, read_rgb, scan_image_folder
from pixcell_ext.seeding import derived_seed, generator_for

logger = logging.getLogger(__name__)

UNREADABLE = (OSError, ValueError, SyntaxError)  # what PIL raises for truncated or foreign files


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
