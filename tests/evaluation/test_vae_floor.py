"""The VAE floor: round trips of held-out real tiles that are the VAE's reconstructions, never compared with their own
originals, at the synthetic set's size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixcell_ext.data import load_tile
from pixcell_ext.evaluation import pipeline
from pixcell_ext.evaluation.splits import arrange_tiles
from pixcell_ext.evaluation.vae_floor import floor_rows, write_round_trips
from pixcell_ext.model import networks
from pixcell_ext.stacks.mini import MINI_ASSETS, MINI_RESOLUTION
from pixcell_ext.stacks.mini_training import toy_arrays
from pixcell_ext.stacks.mini_vae import reconstruction_psnr

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiles(prefix: str, counts: dict[str, int]) -> pipeline.TileSet:
    labels = [name for name, count in counts.items() for _ in range(count)]
    return pipeline.TileSet([Path(f"/{prefix}/{name}/{i}.png") for i, name in enumerate(labels)], labels)


@pytest.mark.parametrize("held_out", [None, {"A": 2, "B": 9}])
def test_round_tripped_tiles_are_never_in_the_comparison_set_and_match_the_synthetic_counts(held_out):
    real, synthetic = _tiles("real", {"A": 10, "B": 12}), _tiles("syn", {"A": 4, "B": 6})
    real_test = _tiles("test", held_out) if held_out else None
    tiles, rows = arrange_tiles(real, synthetic, real_test, test_fraction=0.5, seed=0)

    picked, reference = floor_rows(tiles, rows, ["A", "B"], seed=0)

    assert set(picked) <= set(rows["real_test"]) and not set(picked) & set(reference)
    assert {tiles.paths[i] for i in picked}.isdisjoint({tiles.paths[i] for i in reference})
    expected = {"A": 2, "B": 6} if held_out else {"A": 4, "B": 6}  # min(held out, synthetic) per class
    assert tiles.subset(picked).counts(["A", "B"]) == expected
    assert set(reference) == set(rows["real"]) - set(rows["real_test"])


def test_round_trips_are_the_vaes_reconstructions_at_the_requested_size(tmp_path):
    pixels, labels = toy_arrays("target", "heldout", 2, MINI_RESOLUTION, seed=0)
    sources = []
    for i, (image, label) in enumerate(zip(pixels, labels.tolist(), strict=True)):
        path = tmp_path / "real" / str(label) / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
        sources.append(path)
    vae = networks.load_vae(str(MINI_ASSETS / "sd35-vae-mini"))

    trips = write_round_trips(
        vae,
        pipeline.TileSet(sources, [str(x) for x in labels.tolist()]),
        tmp_path / "floor",
        MINI_RESOLUTION,
        batch_size=7,
    )

    assert not (tmp_path / ".floor.building").exists() and len(list((tmp_path / "floor").rglob("*.png"))) == 18
    written = torch.stack([load_tile(path, MINI_RESOLUTION) for path in trips.paths])
    assert written.shape == pixels.shape and trips.labels == [str(x) for x in labels.tolist()]
    error = ((written.float() - pixels.float()) / 255).pow(2).mean().item()
    # The files hold what the VAE reconstructs (the same PSNR as the build's own measurement, up to uint8 rounding),
    # not the originals (a copy would read infinite PSNR, a wrong latent path far below).
    assert 10 * np.log10(1 / error) == pytest.approx(reconstruction_psnr(vae, pixels), abs=0.1)


def test_a_run_killed_while_writing_round_trips_leaves_the_previous_floor_whole(tmp_path):
    vae = networks.load_vae(str(MINI_ASSETS / "sd35-vae-mini"))
    pixels, _ = toy_arrays("target", "heldout", 1, MINI_RESOLUTION, seed=0)
    earlier, later = tmp_path / "earlier.png", tmp_path / "later.png"
    Image.fromarray(pixels[0].permute(1, 2, 0).numpy()).save(earlier)
    Image.fromarray(pixels[1].permute(1, 2, 0).numpy()).save(later)
    write_round_trips(vae, pipeline.TileSet([earlier], ["ADI"]), tmp_path / "floor", MINI_RESOLUTION, batch_size=1)
    before = {p: p.read_bytes() for p in (tmp_path / "floor").rglob("*.png")}
    assert len(before) == 1
    tiles = pipeline.TileSet([later, tmp_path / "missing.png"], ["ADI", "ADI"])

    with pytest.raises(OSError):  # the second tile fails after the first round trip was written
        write_round_trips(vae, tiles, tmp_path / "floor", MINI_RESOLUTION, batch_size=1)

    assert {p: p.read_bytes() for p in (tmp_path / "floor").rglob("*.png")} == before  # nothing half-replaced
