"""Class-folder histology data: checked before any model loads, read as 8-bit RGB, resized once per consumer.

Resize policy: every tile is centre-cropped to a square, then resized (bicubic, antialiased) separately for each
model from the original pixels: 224 px for UNI2-h (its training resolution) and `resolution` px (256 for PixCell-256)
for the VAE, which sees [-1, 1]. Both are carried as uint8 and converted on the device.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from pixcell_ext.models import UNI_IMAGE_SIZE
from pixcell_ext.seeding import derived_seed

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input data; the message names the file or folder and what to do."""


@dataclass
class ImageRecord:
    path: Path
    label: int


@dataclass
class ImageFolderIndex:
    root: Path
    class_names: list[str]
    records: list[ImageRecord]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.class_names, 0)
        for record in self.records:
            counts[self.class_names[record.label]] += 1
        return counts


def to_rgb8(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode histology files come in: RGBA, grayscale, palette, 16-bit and float."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return image.convert("RGB")


def read_rgb(path: str | os.PathLike) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return to_rgb8(image)


def _unreadable_reason(path: Path) -> str | None:
    try:
        read_rgb(path)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def scan_image_folder(
    root: str | os.PathLike,
    *,
    classes: list[str] | None = None,
    skip_bad_images: bool = False,
    allow_missing_classes: bool = False,
    verify: bool = True,
    num_threads: int = 8,
) -> ImageFolderIndex:
    """Index `root/<CLASS>/*.{tif,png,jpg}` and check that every image decodes.

    A missing or empty root, a class folder with no images, or an unreadable file raises `DataError` naming it;
    `skip_bad_images` skips unreadable files (listed in `skipped`), `allow_missing_classes` records missing or empty
    class folders in `empty_classes` instead of failing (generation falls back for them).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Data directory '{root}' does not exist or is not a directory.")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_names = list(classes) if classes else found
    if not class_names:
        raise DataError(
            f"'{root}' has no class folders. Expected one folder per class, e.g. '{root}/TUM/TUM-0001.tif'."
        )
    records, empty = [], []
    for label, name in enumerate(class_names):
        folder = root / name
        files = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS) if folder.is_dir() else []
        if not files:
            if not allow_missing_classes:
                what = "has no images" if folder.is_dir() else "does not exist"
                raise DataError(
                    f"Class folder '{folder}' {what} ({', '.join(IMAGE_EXTENSIONS)} are read). "
                    "Add images, remove the folder, or pass --classes without it."
                )
            empty.append(name)
        records.extend(ImageRecord(path, label) for path in files)
    index = ImageFolderIndex(root, class_names, records, empty_classes=empty)
    if verify:
        with ThreadPoolExecutor(num_threads) as pool:
            reasons = list(pool.map(_unreadable_reason, [r.path for r in records]))
        bad = [(r.path, reason) for r, reason in zip(records, reasons, strict=True) if reason is not None]
        if bad and not skip_bad_images:
            listing = "\n".join(f"  {path}: {reason}" for path, reason in bad[:10])
            raise DataError(
                f"{len(bad)} unreadable image(s) under '{root}':\n{listing}\n"
                "Replace or delete them, or pass --skip_bad_images to skip them."
            )
        bad_paths = {path for path, _ in bad}
        index.records = [r for r in records if r.path not in bad_paths]
        index.skipped = bad
        for path, reason in bad:
            logger.warning("Skipping unreadable image %s (%s)", path, reason)
    return index


def file_digest(path: str | os.PathLike) -> str:
    """Content hash of a file: a feature cache entry is tied to these bytes, not to the file name."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def center_square(image: Image.Image) -> Image.Image:
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def resized_uint8(image: Image.Image, size: int) -> torch.Tensor:
    """uint8 [3, size, size]; bicubic with PIL's antialiasing when the size changes."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def model_inputs(image: Image.Image, resolution: int) -> dict[str, torch.Tensor]:
    """The two views of one tile, each resized from the original: UNI2-h's 224 px and the VAE's `resolution` px."""
    square = center_square(image)
    return {"uni_pixels": resized_uint8(square, UNI_IMAGE_SIZE), "vae_pixels": resized_uint8(square, resolution)}


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
        return {"index": i, "label": record.label, **model_inputs(read_rgb(record.path), self.resolution)}


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


def export_hub_dataset(accelerator, args, target: Path) -> Path:
    """Write a hub dataset (image + label columns) once as class folders, so that it goes through the same checks,
    content hashing and caching as a local folder. The main process writes; the others wait."""
    if accelerator.is_main_process and not target.exists():
        import datasets

        dataset = datasets.load_dataset(args.dataset_name, split=args.dataset_split)
        label_feature = dataset.features[args.label_column]
        names = getattr(label_feature, "names", None)
        tmp = target.with_name(target.name + ".partial")
        for i, row in enumerate(dataset):
            label = row[args.label_column]
            folder = tmp / (names[label] if names else str(label))
            folder.mkdir(parents=True, exist_ok=True)
            to_rgb8(row[args.image_column]).save(folder / f"{i:08d}.png")
        os.replace(tmp, target)
    accelerator.wait_for_everyone()
    return target
