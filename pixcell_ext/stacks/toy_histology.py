"""Two synthetic H&E-like tissue domains with the nine NCT-CRC-HE classes: a toy stand-in for real histology.

Real NCT-CRC-HE tiles and the real PixCell stack cannot be used offline, so the mini stack learns from tiles drawn
here. Every class is told apart by morphology (nucleus size, shape and density, fibres, membranes, glands, mucus),
rendered as haematoxylin and eosin optical densities and turned into RGB with the Beer-Lambert law, as stained
tissue absorbs light. Two domains mimic two labs:

- SOURCE: the domain the mini stack is pretrained on;
- TARGET: a new lab, with different stain vectors and strengths (bluer haematoxylin, salmon eosin) and a
  morphology difference (thicker sections: nuclei 25 % larger, cells 25 % sparser).

This is a toy: the tiles look like histology only at a glance and no claim about real tissue follows from them.

    write_toy_dataset("toy/target-train", "target", "train", images_per_class=50)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pixcell_ext import NCT_CLASSES
from pixcell_ext.files import write_folder_once

DOMAINS = ("source", "target")
SPLITS = ("train", "heldout", "judge")  # "judge": the mini judge's own stream, no other set draws from it
REFERENCE_SIZE = 224  # morphology below is in pixels of a 224 px tile (0.5 um/px, as NCT); other sizes scale it
# Structures are drawn this much larger than the sizes written below (and correspondingly fewer), so that nuclei keep
# a radius of 1.5 px or more in the mini stack's 64 px tiles; lymphocytes then measure ~6 um, about their real size.
ZOOM = 1.8


@dataclass(frozen=True)
class Domain:
    """How one lab's tiles look: stain optical-density vectors and gains, and the tissue's apparent geometry."""

    haematoxylin: tuple[float, float, float]
    eosin: tuple[float, float, float]
    haematoxylin_gain: float
    eosin_gain: float
    background: tuple[float, float, float]
    nucleus_scale: float
    density: float


# Ruifrok & Johnston's H and E optical-density vectors for SOURCE; TARGET's are rotated and re-weighted.
DOMAIN_STYLES = {
    "source": Domain((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), 1.0, 1.0, (0.02, 0.03, 0.02), 1.0, 1.0),
    "target": Domain((0.78, 0.60, 0.18), (0.05, 0.80, 0.60), 1.15, 0.85, (0.03, 0.05, 0.09), 1.25, 0.75),
}


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish noise that varies over about size / cells pixels."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))


def _stamp_nuclei(
    canvas: np.ndarray,
    rng: np.random.Generator,
    centers: np.ndarray,
    radii: np.ndarray,
    elongation: np.ndarray,
    angles: np.ndarray,
    irregularity: float,
    intensity: np.ndarray,
) -> None:
    """Draw soft elliptical blobs with wobbly outlines and grainy chromatin into `canvas` (max-blend, wrapping).

    All nuclei are computed at once on a shared square patch, so a tile costs a few vectorised operations.
    """
    if len(centers) == 0:
        return
    size = canvas.shape[0]
    major = radii * elongation
    half = int(np.ceil(major.max() * (1 + irregularity) + 2))
    offsets = np.arange(-half, half + 1, dtype=np.float32)
    base = np.floor(centers).astype(np.int64)
    frac = (centers - base).astype(np.float32)
    dy = offsets[None, :, None] - frac[:, 0, None, None]
    dx = offsets[None, None, :] - frac[:, 1, None, None]
    cos, sin = np.cos(angles)[:, None, None], np.sin(angles)[:, None, None]
    u = dx * cos + dy * sin
    v = -dx * sin + dy * cos
    theta = np.arctan2(v, u)
    lobes = rng.integers(2, 6, len(centers))[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, len(centers))[:, None, None]
    wobble = 1 + irregularity * np.sin(lobes * theta + phase)
    r = np.sqrt((u / major[:, None, None]) ** 2 + (v / radii[:, None, None]) ** 2) / wobble
    grain = 0.75 + 0.25 * rng.random(r.shape, dtype=np.float32)
    values = np.clip((1 - r) * 3, 0, 1) * grain * intensity[:, None, None]
    ys = (base[:, 0, None, None] + offsets[None, :, None].astype(np.int64)) % size
    xs = (base[:, 1, None, None] + offsets[None, None, :].astype(np.int64)) % size
    inside = values > 0
    ys, xs = np.broadcast_to(ys, values.shape)[inside], np.broadcast_to(xs, values.shape)[inside]
    np.maximum.at(canvas, (ys, xs), values[inside].astype(canvas.dtype))


def _nuclei(
    canvas: np.ndarray,
    rng: np.random.Generator,
    domain: Domain,
    scale: float,
    count: float,
    radius: tuple[float, float],
    *,
    elongation: tuple[float, float] = (1.0, 1.3),
    angle: float | np.ndarray | None = None,
    irregularity: float = 0.08,
    intensity: tuple[float, float] = (1.2, 1.6),
    centers: np.ndarray | None = None,
) -> None:
    """Scatter nuclei of one kind; the domain scales their number and size."""
    size = canvas.shape[0]
    if centers is None:
        n = rng.poisson(count * domain.density / ZOOM**2)
        centers = rng.uniform(0, size, (n, 2))
    n = len(centers)
    radii = rng.uniform(*radius, n) * domain.nucleus_scale * scale
    stretch = rng.uniform(*elongation, n)
    angles = rng.uniform(0, np.pi, n) if angle is None else angle + rng.normal(0, 0.08, n)
    strength = rng.uniform(*intensity, n)
    _stamp_nuclei(canvas, rng, centers, radii, stretch, angles, irregularity, strength)


def _fibres(rng: np.random.Generator, size: int, scale: float, angle: float, period: float, waviness: float):
    """A stripe field in [0, 1] along `angle`: straight for small `waviness`, wavy for large."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    along = xx * np.cos(angle) + yy * np.sin(angle)
    across = -xx * np.sin(angle) + yy * np.cos(angle)
    warp = waviness * _smooth_noise(rng, size, 4) + 0.35 * waviness * np.sin(along / (18 * scale))
    return 0.5 + 0.5 * np.sin(2 * np.pi * across / (period * scale) + warp)


def _voronoi_edges(rng: np.random.Generator, size: int, n_sites: int, width: float) -> np.ndarray:
    """Thin polygonal cell membranes: 1 on the bisector between the two nearest sites, fading over `width` px."""
    sites = rng.uniform(0, size, (n_sites, 2)).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    squared = (yy[None] - sites[:, 0, None, None]) ** 2 + (xx[None] - sites[:, 1, None, None]) ** 2
    nearest = np.argpartition(squared, 1, axis=0)[:2]
    d1, d2 = np.take_along_axis(squared, nearest, axis=0)
    gap = np.linalg.norm(sites[nearest[1]] - sites[nearest[0]], axis=-1)
    to_bisector = (d2 - d1) / (2 * np.maximum(gap, 1e-3))
    return np.clip(1 - to_bisector / width, 0, 1), sites


def _render(domain: Domain, class_name: str, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin and eosin density maps of one tile of `class_name`."""
    s = ZOOM * size / REFERENCE_SIZE
    h = np.zeros((size, size), np.float32)
    e = np.zeros((size, size), np.float32)
    texture = _smooth_noise(rng, size, 12)
    if class_name == "ADI":
        cells = int(rng.integers(24, 40) * domain.density / ZOOM**2)
        membranes, sites = _voronoi_edges(rng, size, cells, 1.2 * s)
        e += 0.45 * membranes + 0.02
        flat = sites[rng.random(len(sites)) < 0.25] + rng.normal(0, 3 * s, (1, 2))
        _nuclei(h, rng, domain, s, 0, (2.0, 2.5), elongation=(2.0, 3.0), intensity=(0.8, 1.1), centers=flat)
    elif class_name == "BACK":
        e += 0.015 + 0.01 * texture
        h += 0.01 + 0.005 * _smooth_noise(rng, size, 6)
    elif class_name == "DEB":
        e += np.clip(0.4 + 0.18 * texture + 0.1 * _smooth_noise(rng, size, 16), 0.05, None)
        _nuclei(h, rng, domain, s, 260, (0.8, 2.2), irregularity=0.45, intensity=(0.6, 1.5))
        _nuclei(h, rng, domain, s, 12, (4.0, 6.0), irregularity=0.3, intensity=(0.25, 0.45))
    elif class_name == "LYM":
        e += 0.12 + 0.04 * texture
        _nuclei(h, rng, domain, s, 380, (3.0, 3.8), elongation=(1.0, 1.1), irregularity=0.04, intensity=(1.6, 2.0))
    elif class_name == "MUC":
        strands = _fibres(rng, size, s, rng.uniform(0, np.pi), 40, 6.0)
        h += 0.12 + 0.07 * strands + 0.03 * texture
        e += 0.05 + 0.04 * strands
        _nuclei(h, rng, domain, s, 6, (3.0, 4.5), intensity=(0.9, 1.2))
    elif class_name in ("MUS", "STR"):
        angle = rng.uniform(0, np.pi)
        muscle = class_name == "MUS"
        fibres = _fibres(rng, size, s, angle, 9 if muscle else 14, 0.6 if muscle else 7.0)
        if muscle:
            e += 0.55 + 0.3 * fibres + 0.05 * texture
            _nuclei(h, rng, domain, s, 45, (2.2, 2.8), elongation=(3.5, 5.0), angle=angle, intensity=(1.1, 1.4))
        else:
            e += 0.1 + 0.32 * fibres**2 + 0.04 * texture
            _nuclei(h, rng, domain, s, 14, (1.8, 2.2), elongation=(3.0, 4.5), angle=angle, intensity=(1.0, 1.3))
    elif class_name == "NORM":
        e += 0.25 + 0.05 * texture
        _nuclei(h, rng, domain, s, 18, (2.0, 2.6), elongation=(1.5, 2.5), intensity=(0.9, 1.2))
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        for _ in range(int(rng.integers(1, 3))):
            cy, cx = rng.uniform(0, size, 2)
            lumen = rng.uniform(16, 26) * s
            ring = lumen + 12 * s * domain.nucleus_scale
            dist = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
            e[dist < ring] = 0.3
            e[dist < lumen] = 0.02
            h[dist < ring] = 0.05
            n = int(2 * np.pi * (lumen + ring) / 2 / (7 * s * domain.nucleus_scale / np.sqrt(domain.density)))
            phi = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi)
            mid = (lumen + 0.65 * (ring - lumen)) * np.stack([np.sin(phi), np.cos(phi)], 1)
            centers = np.mod(mid + [cy, cx], size)
            # Columnar epithelium: evenly spaced nuclei elongated towards the lumen.
            _nuclei(
                h,
                rng,
                domain,
                s,
                0,
                (2.0, 2.4),
                elongation=(2.0, 2.4),
                angle=phi,
                intensity=(1.3, 1.6),
                centers=centers,
            )
    elif class_name == "TUM":
        e += 0.3 + 0.08 * texture
        h += 0.15 + 0.05 * _smooth_noise(rng, size, 8)
        _nuclei(h, rng, domain, s, 95, (5.5, 9.0), elongation=(1.0, 1.6), irregularity=0.25, intensity=(1.2, 1.9))
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        for _ in range(int(rng.integers(0, 3))):
            cy, cx = rng.uniform(0, size, 2)
            hole = (yy - cy) ** 2 / rng.uniform(4, 10) ** 2 + (xx - cx) ** 2 / rng.uniform(6, 16) ** 2 < s * s
            e[hole], h[hole] = 0.03, 0.02
    else:
        raise ValueError(f"Unknown class '{class_name}': the toy domains have the classes {', '.join(NCT_CLASSES)}.")
    return h, e


def toy_tile(domain: str, class_name: str, rng: np.random.Generator, size: int = REFERENCE_SIZE) -> np.ndarray:
    """One uint8 [size, size, 3] tile of `class_name` in `domain` ("source" or "target"), drawn from `rng`."""
    if domain not in DOMAIN_STYLES:
        raise ValueError(f"Unknown toy domain '{domain}': use one of {', '.join(DOMAINS)}.")
    style = DOMAIN_STYLES[domain]
    h, e = _render(style, class_name, rng, size)
    # Slide-to-slide stain variation within a lab.
    h_gain = style.haematoxylin_gain * np.exp(rng.normal(0, 0.08))
    e_gain = style.eosin_gain * np.exp(rng.normal(0, 0.08))
    density = (
        h[..., None] * h_gain * np.asarray(style.haematoxylin, np.float32)
        + e[..., None] * e_gain * np.asarray(style.eosin, np.float32)
        + np.asarray(style.background, np.float32)
    )
    image = 255.0 * np.exp(-density) + 2.5 * rng.standard_normal(density.shape, dtype=np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def _split_seed(seed: int, domain: str, split: str, class_index: int) -> list[int]:
    return [seed, DOMAINS.index(domain), SPLITS.index(split), class_index]


def toy_tiles(domain: str, split: str, images_per_class: int, size: int = REFERENCE_SIZE, seed: int = 0):
    """Yield (class_index, tile_index, uint8 tile) exactly as `write_toy_dataset` writes them, without the files."""
    if split not in SPLITS:
        raise ValueError(f"Unknown toy split '{split}': use one of {', '.join(SPLITS)}.")
    for class_index, name in enumerate(NCT_CLASSES):
        rng = np.random.default_rng(_split_seed(seed, domain, split, class_index))
        for i in range(images_per_class):
            yield class_index, i, toy_tile(domain, name, rng, size)


def write_toy_dataset(
    folder: str | os.PathLike, domain: str, split: str, images_per_class: int, size: int = 224, seed: int = 0
) -> Path:
    """NCT-style class folders `<CLASS>/<CLASS>-XXXXXXXX.(tif|png)`, written once (an existing folder is kept).

    Splits use separate random streams, so "train" and "heldout" never share a tile.
    """
    folder = Path(folder)
    if domain not in DOMAIN_STYLES:
        raise ValueError(f"Unknown toy domain '{domain}': use one of {', '.join(DOMAINS)}.")

    def write(tmp: Path) -> None:
        for name in NCT_CLASSES:
            (tmp / name).mkdir()
        for class_index, i, tile in toy_tiles(domain, split, images_per_class, size, seed):
            name = NCT_CLASSES[class_index]
            suffix = "tif" if i % 2 == 0 else "png"
            Image.fromarray(tile).save(tmp / name / f"{name}-{i:08d}.{suffix}")

    return write_folder_once(folder, write)
