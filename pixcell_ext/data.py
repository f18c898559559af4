"""Histology tiles from a class folder or a hub dataset, both read through `datasets`: checked before any model loads,
read as 8-bit RGB, resized once per consumer.

A folder is read with `load_dataset("imagefolder")`, whose `ClassLabel` comes from the folder names; a hub dataset
(or one saved with `save_to_disk`) brings its own image and label columns. Either way the result is an
`ImageFolderIndex` whose order is fixed: grouped by class in `class_names` order, then by file name (a folder) or row
(a dataset). A tile's position in that order keys its per-sample randomness and the resume position, so the same
tiles give the same training whichever way they were stored.

Resize policy: every tile is centre-cropped to a square, then resized (bicubic, antialiased) separately for each
model from the original pixels: 224 px for UNI2-h (its training resolution) and `resolution` px (256 for PixCell-256)
for the VAE, which sees [-1, 1]. Both are carried as uint8 and converted on the device.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import io
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from pixcell_ext.console import progress_bar
from pixcell_ext.errors import ExplainedError
from pixcell_ext.seeding import derived_seed

if TYPE_CHECKING:
    import datasets
    from accelerate import Accelerator

# A 32 px tile at NCT's 0.5 um/px spans 16 um, about two nuclei, and reaching the VAE's 256 px means upsampling it
# 8x: what the model would learn from it is interpolation blur. Such files are thumbnails or failed crops.
MIN_TILE_SIZE = 32
UNREADABLE = (OSError, UnidentifiedImageError, ValueError, SyntaxError)  # what PIL raises for broken or foreign files
logger = logging.getLogger(__name__)


class DataError(ValueError, ExplainedError):
    """Bad input data; the message names the file or folder and what to do."""


@dataclass
class ImageRecord:
    """One tile: an image file, or (with `path` None) row `row` of the index's dataset, which holds its bytes."""

    path: Path | None
    label: int
    row: int | None = None


@dataclass
class ImageFolderIndex:
    """The tiles of a class folder or of a dataset, in the fixed order described in the module docstring."""

    root: Path | str  # the folder, or the dataset's name
    class_names: list[str]
    records: list[ImageRecord]
    skipped: list[tuple[Path | str, str]] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)
    rows: datasets.Dataset | None = None  # the undecoded image column of a dataset whose rows hold the bytes

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.class_names, 0)
        for record in self.records:
            counts[self.class_names[record.label]] += 1
        return counts

    def image(self, i: int) -> Image.Image:
        """Tile `i` as 8-bit RGB."""
        return read_rgb(self._source(i))

    def tile(self, i: int, size: int) -> torch.Tensor:
        """Tile `i` as `load_tile` reads a file: uint8 [3, size, size]."""
        return load_tile(self._source(i), size)

    def digest(self, i: int) -> str:
        """SHA-256 of tile `i`'s encoded bytes: a file's content hash, or the same hash of a row's stored bytes, so
        the same image file keys the same feature-cache entry whether it came from a folder or a dataset."""
        source = self._source(i)
        if isinstance(source, io.BytesIO):
            return hashlib.sha256(source.getbuffer()).hexdigest()
        return file_digest(source)

    def name(self, i: int) -> Path | str:
        """What an error message calls tile `i`: its path, or its dataset row."""
        record = self.records[i]
        return record.path if record.path is not None else f"{self.root} row {record.row}"

    def _source(self, i: int) -> Path | io.BytesIO:
        record = self.records[i]
        if record.path is not None:
            return record.path
        return io.BytesIO(self.rows[record.row][self.rows.column_names[0]]["bytes"])


def to_rgb8(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode histology files come in: RGBA, grayscale, palette, 16-bit and float."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return image.convert("RGB")


def read_rgb(source: str | os.PathLike | io.BytesIO) -> Image.Image:
    with Image.open(source) as image:
        image.load()
        return to_rgb8(image)


def split_map(accelerator: Accelerator | None, fn: Callable[[int], Any], count: int, *, desc: str) -> list:
    """`[fn(0), ..., fn(count - 1)]` on every process, each process computing a contiguous share (on a few threads:
    the work is file reading and decoding). Without an accelerator, one process does it all."""
    from accelerate.utils import gather_object

    def compute(ids: list[int], quiet: bool) -> list:
        values = []
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            with progress_bar(len(ids), desc, enabled=not quiet and count >= 1000) as bar:
                for value in pool.map(fn, ids):
                    values.append(value)
                    bar.update(1)
        return values

    if accelerator is None or accelerator.num_processes == 1:
        return compute(list(range(count)), quiet=False)
    with accelerator.split_between_processes(list(range(count))) as mine:
        values = compute(mine, quiet=not accelerator.is_main_process)
    return gather_object(values)  # the shares in process order: the whole list, in order


def _problem(index: ImageFolderIndex, i: int) -> str | None:
    """Why tile `i` cannot be trained on, or None."""
    try:
        image = index.image(i)
    except UNREADABLE as error:
        return f"{type(error).__name__}: {error}"
    if min(image.size) < MIN_TILE_SIZE:
        return f"{image.width}x{image.height} px, under the {MIN_TILE_SIZE} px minimum on a side"
    return None


def check_images(index: ImageFolderIndex, *, skip_bad_images: bool, accelerator: Accelerator | None = None) -> None:
    """Decode every tile (the work split across processes) and refuse unreadable or too small ones by name, or, with
    `skip_bad_images`, drop them from `index.records` (listed in `index.skipped`)."""
    problems = split_map(accelerator, lambda i: _problem(index, i), len(index.records), desc="checking images")
    bad = [(i, reason) for i, reason in enumerate(problems) if reason is not None]
    if bad and not skip_bad_images:
        listing = "\n".join(f"  {index.name(i)}: {reason}" for i, reason in bad[:10])
        raise DataError(
            f"{len(bad)} unusable image(s) in '{index.root}':\n{listing}\n"
            "Replace or delete them, or pass --skip_bad_images to skip them."
        )
    index.skipped = [(index.name(i), reason) for i, reason in bad]
    for name, reason in index.skipped:
        logger.warning("Skipping image %s (%s)", name, reason)
    bad_ids = {i for i, _ in bad}
    index.records = [record for i, record in enumerate(index.records) if i not in bad_ids]


def _hidden(name: str) -> bool:
    """Names `datasets` leaves out of a folder: dot-files (macOS `._*`, `.DS_Store`) and `__*` (`__MACOSX`)."""
    return name.startswith((".", "__"))


def _check_link(path: Path, root: Path) -> None:
    """A symlinked class folder or tile is followed (splits are assembled that way on clusters), but a link that
    loops (onto itself, or onto the data folder or one above it) would make the class silently empty."""
    if not path.is_symlink():
        return
    fix = "Point the link at a folder of tiles (or at a tile), or remove it."
    try:
        target = path.resolve(strict=True)
    except RuntimeError as error:  # how Python before 3.13 reports a loop
        raise DataError(f"'{path}' is a symlink loop ({error}). {fix}") from error
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise DataError(f"'{path}' is a symlink loop ({error.strerror}). {fix}") from error
        return  # a dangling link: reported like any missing class folder or unreadable tile
    if target.is_dir() and (target == root.resolve() or target in root.resolve().parents):
        raise DataError(f"'{path}' is a symlink loop: it points to '{target}', which holds the data folder. {fix}")


def _class_patterns(root: Path, class_names: list[str]) -> list[str]:
    """One `datasets` pattern per class folder that holds an image: `*/*` would not enter a symlinked class folder,
    and a pattern without a match would fail the whole load instead of naming its class."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    patterns = []
    for name in class_names:
        folder = root / name
        if not folder.is_dir():
            continue
        images = [p for p in folder.iterdir() if not _hidden(p.name) and p.suffix.lower() in ImageFolder.EXTENSIONS]
        for path in images:
            _check_link(path, root)
        if images:
            patterns.append(f"{glob.escape(name)}/*")
    return patterns


def _load(accelerator: Accelerator | None, load: Callable[[], datasets.Dataset]) -> datasets.Dataset:
    """One process builds the `datasets` cache (or downloads) first; the others then read it."""
    if accelerator is None:
        return load()
    with accelerator.main_process_first():
        return load()


def _records(dataset: datasets.Dataset, image_column: str, labels: list[int]) -> list[ImageRecord]:
    """Records of the rows whose label is >= 0, read from the Arrow table without touching the image bytes."""
    import pyarrow.compute as pc

    images = dataset.with_format("arrow")[image_column]
    paths = pc.struct_field(images, "path").to_pylist()
    stored = pc.is_valid(pc.struct_field(images, "bytes")).to_pylist()
    return [
        ImageRecord(None, label, row) if has_bytes else ImageRecord(Path(path), label)
        for row, (label, path, has_bytes) in enumerate(zip(labels, paths, stored, strict=True))
        if label >= 0
    ]


def scan_image_folder(
    root: str | os.PathLike,
    *,
    classes: list[str] | None = None,
    skip_bad_images: bool = False,
    allow_missing_classes: bool = False,
    verify: bool = True,
    accelerator: Accelerator | None = None,
) -> ImageFolderIndex:
    """Index `root/<CLASS>/<image>` through `datasets`' image folder and check that every image can be used.

    Only files directly inside a class folder count; hidden files and folders are ignored. A missing or empty root,
    a class folder with no images, or an unusable file raises `DataError` naming it; `skip_bad_images` skips unusable
    files (listed in `skipped`), `allow_missing_classes` records missing or empty class folders in `empty_classes`
    instead of failing (generation falls back for them).
    """
    import datasets

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Data directory '{root}' does not exist or is not a directory.")
    entries = [p for p in root.iterdir() if not _hidden(p.name)]
    for entry in entries:
        _check_link(entry, root)
    found = sorted(p.name for p in entries if p.is_dir())
    class_names = list(classes) if classes else found
    if not class_names:
        raise DataError(
            f"'{root}' has no class folders. Expected one folder per class, e.g. '{root}/TUM/TUM-0001.tif'."
        )

    def load() -> datasets.Dataset:
        # "*/*": files directly in a class folder; no split or metadata files are read into the folder's meaning.
        # No progress bars: "downloading" local files would only confuse.
        quiet = datasets.utils.are_progress_bars_disabled()
        datasets.utils.disable_progress_bars()
        try:
            return datasets.load_dataset(
                "imagefolder",
                data_dir=str(root),
                data_files={"train": patterns},
                split="train",
                drop_labels=False,
                drop_metadata=True,
            )
        finally:
            if not quiet:
                datasets.utils.enable_progress_bars()

    patterns = _class_patterns(root, class_names)
    try:
        if not patterns:
            raise FileNotFoundError(root)
        dataset = _load(accelerator, load)
    except (FileNotFoundError, ValueError):  # no image in any class folder: reported per class below
        records = []
    else:
        names = dataset.features["label"].names
        position = {name: label for label, name in enumerate(class_names)}
        labels = [position.get(names[label], -1) for label in dataset.with_format("arrow")["label"].to_pylist()]
        records = sorted(_records(dataset, "image", labels), key=lambda r: (r.label, str(r.path)))
    index = ImageFolderIndex(root, class_names, records)
    for name, count in index.counts().items():
        if count == 0:
            folder = root / name
            if not allow_missing_classes:
                what = "has no images" if folder.is_dir() else "does not exist"
                raise DataError(
                    f"Class folder '{folder}' {what} (.tif, .png, .jpg and the other formats PIL reads are read). "
                    "Add images, remove the folder, or pass --classes without it."
                )
            index.empty_classes.append(name)
    if verify:
        check_images(index, skip_bad_images=skip_bad_images, accelerator=accelerator)
    return index


def load_hub_dataset(
    name: str,
    *,
    split: str = "train",
    image_column: str = "image",
    label_column: str = "label",
    classes: list[str] | None = None,
    skip_bad_images: bool = False,
    accelerator: Accelerator | None = None,
) -> ImageFolderIndex:
    """Index a dataset with an image and a label column: a hub id, a local dataset repository, or a folder written
    by `save_to_disk`. Every image is checked as for a folder; rows stay in the dataset (nothing is exported).

    Class names are the `ClassLabel` names in their declared order (other label types: their sorted values), or
    `classes` in the given order.
    """
    import datasets

    def load() -> datasets.Dataset:
        if (Path(name) / "dataset_dict.json").is_file():
            return datasets.load_from_disk(name)[split]
        if (Path(name) / "state.json").is_file():
            return datasets.load_from_disk(name)
        return datasets.load_dataset(name, split=split)

    try:
        dataset = _load(accelerator, load)
    except (OSError, ValueError, KeyError) as error:
        raise DataError(
            f"Could not load dataset '{name}' (split '{split}'): {type(error).__name__}: {error}. Check the name and "
            "--dataset_split, and for a gated hub dataset accept its terms and run `hf auth login`."
        ) from error
    missing = [column for column in (image_column, label_column) if column not in dataset.column_names]
    if missing:
        raise DataError(
            f"Dataset '{name}' has no column {', '.join(map(repr, missing))}; its columns are {dataset.column_names}. "
            "Name the right ones with --image_column and --label_column."
        )
    if not isinstance(dataset.features[image_column], datasets.Image):
        raise DataError(
            f"Column '{image_column}' of dataset '{name}' holds {dataset.features[image_column]}, not images. "
            "Name the image column with --image_column."
        )
    dataset = dataset.select_columns([image_column, label_column])
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    values = dataset.with_format("arrow")[label_column].to_pylist()
    unlabelled = sum(value is None or value == -1 for value in values)
    if unlabelled:
        raise DataError(
            f"{unlabelled} row(s) of dataset '{name}' (split '{split}') have no label in column '{label_column}'. "
            "Train on a labelled split (--dataset_split)."
        )
    feature = dataset.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        names = feature.names
    else:  # plain ints or strings: sorted values, as `class_encode_column` would name them (without rewriting rows)
        names = [str(value) for value in sorted(set(values))]
        values = [names.index(str(value)) for value in values]
    class_names = list(classes) if classes else list(names)
    unknown = [c for c in class_names if c not in names]
    if unknown:
        raise DataError(f"Class(es) {unknown} are not labels of dataset '{name}' (its labels: {names}). Fix --classes.")
    position = {class_name: label for label, class_name in enumerate(class_names)}
    labels = [position.get(names[value], -1) for value in values]
    records = sorted(_records(dataset, image_column, labels), key=lambda r: r.label)  # stable: row order per class
    index = ImageFolderIndex(name, class_names, records, rows=dataset.select_columns([image_column]))
    empty = [class_name for class_name, count in index.counts().items() if count == 0]
    if empty:
        raise DataError(
            f"Dataset '{name}' (split '{split}') has no rows of class(es) {empty}. Pass --classes without them."
        )
    check_images(index, skip_bad_images=skip_bad_images, accelerator=accelerator)
    return index


def file_digest(path: str | os.PathLike) -> str:
    """Content hash of a file: a feature cache entry is tied to these bytes, not to the file name."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tile_digests(index: ImageFolderIndex, accelerator: Accelerator | None = None) -> list[str]:
    """SHA-256 of every tile's bytes (`ImageFolderIndex.digest`), split across processes, in index order."""
    return split_map(accelerator, index.digest, len(index.records), desc="hashing")


def content_fingerprint(index: ImageFolderIndex, digests: list[str]) -> str:
    """One hash of what a run trains on: every tile's bytes with its class, in order. A resumed run compares it,
    because a folder's name says nothing about what is in it now."""
    lines = "\n".join(f"{index.class_names[r.label]}\t{d}" for r, d in zip(index.records, digests, strict=True))
    return hashlib.sha256(lines.encode()).hexdigest()


def duplicate_tiles(index: ImageFolderIndex, digests: list[str]) -> list[list[Path | str]]:
    """Groups of tiles with identical bytes: each copy weighs in again, and copies in two classes contradict."""
    groups: dict[str, list[Path | str]] = {}
    for i, digest in enumerate(digests):
        groups.setdefault(digest, []).append(index.name(i))
    return [names for names in groups.values() if len(names) > 1]


def center_square(image: Image.Image) -> Image.Image:
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


# The authors extracted UNI2-h features with torchvision's `Resize(224)` on PIL images: antialiased bilinear.
# `UNIEncoder.preprocess` resizes other input sizes the same way on the device.
UNI_IMAGE_SIZE = 224  # UNI2-h's input size: the ViT's patch grid is fixed at 224 px
UNI_RESAMPLE = Image.BILINEAR


def resized_uint8(image: Image.Image, size: int, resample: int = Image.BICUBIC) -> torch.Tensor:
    """uint8 [3, size, size]; PIL's antialiased `resample` filter when the size changes."""
    if image.size != (size, size):
        image = image.resize((size, size), resample)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def load_tile(source: str | os.PathLike | io.BytesIO, size: int, resample: int = Image.BICUBIC) -> torch.Tensor:
    """uint8 [3, size, size]: the centre square of a tile file, resized once from its original pixels. The one
    tile reader: training, generation's references, evaluation and the contact sheets all see a tile this way."""
    return resized_uint8(center_square(read_rgb(source)), size, resample)


def model_inputs(image: Image.Image, resolution: int) -> dict[str, torch.Tensor]:
    """The two views of one tile, each resized from the original: UNI2-h's 224 px and the VAE's `resolution` px."""
    square = center_square(image)
    return {
        "uni_pixels": resized_uint8(square, UNI_IMAGE_SIZE, UNI_RESAMPLE),
        "vae_pixels": resized_uint8(square, resolution),
    }


def vae_input(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float in [-1, 1], the range the SD3.5 VAE was trained on."""
    return pixels.float() / 127.5 - 1.0


class TileDataset(Dataset):
    """Tiles of an `ImageFolderIndex`, each returned with its index (the key of its per-sample randomness)."""

    def __init__(self, index: ImageFolderIndex, resolution: int):
        self.index = index
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.index.records)

    def __getitem__(self, i: int) -> dict:
        record = self.index.records[i]
        return {"index": i, "label": record.label, **model_inputs(self.index.image(i), self.resolution)}


class EpochSampler(Sampler[tuple[int, int]]):
    """Shuffled (or class-balanced) order that is a pure function of (seed, epoch), so a resumed run sees the rest
    of exactly the same epoch. Class-balanced draws with replacement, each class equally likely.

    Yields (index, epoch) pairs: the epoch travels with each index to the loader workers, which draw the sample's
    randomness from it (`diffusion.WithStepRandomness`)."""

    def __init__(self, labels: list[int], seed: int, class_balanced: bool = False):
        self.labels = torch.tensor(labels)
        self.seed = seed
        self.class_balanced = class_balanced
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self):
        generator = torch.Generator().manual_seed(derived_seed(self.seed, "epoch-order", self.epoch))
        if self.class_balanced:
            counts = torch.bincount(self.labels).float()
            weights = 1.0 / counts[self.labels]
            order = torch.multinomial(weights, len(self.labels), replacement=True, generator=generator)
        else:
            order = torch.randperm(len(self.labels), generator=generator)
        return iter([(index, self.epoch) for index in order.tolist()])


def dihedral(pixels: torch.Tensor, code: int) -> torch.Tensor:
    """One of the 8 flips/rotations of a square tile ([..., H, W]); tissue has no preferred orientation."""
    if code >= 4:
        pixels = pixels.flip(-1)
    return torch.rot90(pixels, code % 4, dims=(-2, -1))
