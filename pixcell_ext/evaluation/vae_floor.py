"""The VAE floor: real held-out tiles through the generator's VAE alone, measured exactly like the synthetic set.

Every generated tile leaves through the VAE's decoder, so even a generator that reproduced the real latents exactly
would not score like real tiles. Round trips (encode, posterior mean, decode) of real tiles that the comparison set
does not hold show that part of the gap: between the floor and the synthetic set lies what a better generator could
close; the floor itself is the autoencoder's. It is a reference point, not a bound on each metric (a generator's
decodings need not look like round trips).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pixcell_ext.console import progress_bar
from pixcell_ext.data import load_tile, vae_input
from pixcell_ext.evaluation.feature_store import TileSet
from pixcell_ext.evaluation.splits import matched_subsample
from pixcell_ext.files import replace_folder, write_png_atomically
from pixcell_ext.model import networks
from pixcell_ext.model.sampling import to_uint8_images

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

FLOOR_FOLDER = "vae_floor"  # under the evaluation's output folder, one sub-folder per class
FLOOR_NOTE = (
    "VAE floor: real held-out tiles (the probe test tiles, as many per class as the synthetic set has) encoded and "
    "decoded by the generator's VAE alone, then compared with the real tiles (never with their own originals) by "
    "the same estimators as the synthetic set. A "
    "generator that reproduced real latents exactly would score about this: the part of the synthetic set's gap "
    "down to the floor is the generator's, the floor itself is the autoencoder's."
)


def floor_rows(
    tiles: TileSet, rows: dict[str, Sequence[int]], classes: Sequence[str], seed: int
) -> tuple[list[int], list[int]]:
    """Rows to round-trip and the real rows to compare them with.

    The round trips are drawn from the probe test tiles, as many per class as the synthetic set has (FD's bias and
    the k-NN metrics depend on n, so the floor must be measured at the synthetic set's n). The comparison set is the
    real set without them: without ``--real_test_dir`` the test tiles are a split of the real ones, and a tile
    compared with its own round trip would flatter the VAE.
    """
    held_out = list(rows["real_test"])
    synthetic = tiles.subset(rows["synthetic"]).counts(classes)
    held = tiles.subset(held_out)
    counts = {name: min(held.labels.count(name), synthetic[name]) for name in classes if name in held.labels}
    picked = [held_out[i] for i in matched_subsample(held, counts, seed, "vae-floor")]
    excluded = set(held_out)
    return picked, [i for i in rows["real"] if i not in excluded]


def tile_resolution(path: str | os.PathLike) -> int:
    """The generator's resolution, read off a synthetic tile: the round trips are made at the size it decodes."""
    from PIL import Image

    with Image.open(path) as image:
        return min(image.size)


def round_trip_paths(tiles: TileSet, folder: str | os.PathLike) -> TileSet:
    """Where `write_round_trips` puts each tile's round trip: every process knows the files without a message."""
    pairs = enumerate(zip(tiles.paths, tiles.labels, strict=True))
    paths = [Path(folder) / label / f"{i:06d}-{path.stem}.png" for i, (path, label) in pairs]
    return TileSet(paths, list(tiles.labels))


@torch.no_grad()
def write_round_trips(
    vae: AutoencoderKL,
    tiles: TileSet,
    folder: str | os.PathLike,
    resolution: int,
    *,
    batch_size: int,
) -> TileSet:
    """PNG round trips of ``tiles`` in ``folder/<class>/``, returned in the same order.

    They are built beside ``folder`` and moved into place whole, so a killed run never leaves a partial floor that a
    later run would take for a complete one.
    """
    folder = Path(folder)
    building = folder.with_name(f".{folder.name}.building")
    shutil.rmtree(building, ignore_errors=True)
    trips = round_trip_paths(tiles, folder)
    names = [path.relative_to(folder) for path in trips.paths]
    progress = progress_bar(len(names), "VAE round trips")
    for start in range(0, len(names), batch_size):
        batch = tiles.paths[start : start + batch_size]
        pixels = vae_input(torch.stack([load_tile(path, resolution) for path in batch])).to(vae.device)
        mean, _ = networks.encode_latent_distribution(vae, pixels)
        images = to_uint8_images(networks.decode_posterior_mean(vae, mean)).numpy()
        for name, image in zip(names[start : start + len(batch)], images, strict=True):
            (building / name).parent.mkdir(parents=True, exist_ok=True)
            write_png_atomically(building / name, image)
        progress.update(len(batch))
    progress.close()
    replace_folder(building, folder)
    return trips


def floor_section(
    vae_name_or_path: str,
    resolution: int,
    counts: dict[str, int],
    distributions: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The report's ``vae_floor``: which VAE, at which size, how many tiles, and per feature space the same
    distribution metrics as the synthetic set's."""
    return {
        "vae": vae_name_or_path,
        "resolution": resolution,
        "counts": counts,
        "extractors": distributions,
        "note": FLOOR_NOTE,
    }
