import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from pixcell_ext.data import DataError, EpochSampler, TileDataset, dihedral, read_rgb, scan_image_folder
from pixcell_ext.tiny import write_tiny_dataset


@pytest.fixture
def folder(tmp_path):
    return write_tiny_dataset(tmp_path / "nct", images_per_class=2, size=32)


def test_scan_reads_nine_classes_with_tif_and_png(folder):
    index = scan_image_folder(folder)
    assert index.class_names == ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
    assert len(index.records) == 18 and {r.path.suffix for r in index.records} == {".tif", ".png"}
    assert index.counts()["TUM"] == 2


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nowhere")):
        scan_image_folder(tmp_path / "nowhere")


def test_directory_without_class_folders_is_refused(tmp_path):
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        scan_image_folder(tmp_path / "flat")


def test_empty_class_folder_is_named(folder):
    for f in (folder / "MUC").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="MUC.*has no images"):
        scan_image_folder(folder)
    index = scan_image_folder(folder, allow_missing_classes=True)
    assert index.empty_classes == ["MUC"] and index.counts()["MUC"] == 0


def test_corrupt_image_fails_by_name_or_is_skipped(folder):
    bad = folder / "LYM" / "LYM-broken.tif"
    bad.write_bytes(b"not a tiff at all")
    with pytest.raises(DataError, match="LYM-broken.tif") as error:
        scan_image_folder(folder)
    assert "--skip_bad_images" in str(error.value)
    index = scan_image_folder(folder, skip_bad_images=True)
    assert [p for p, _ in index.skipped] == [bad] and len(index.records) == 18


@pytest.mark.parametrize("mode", ["RGBA", "L", "I;16", "P"])
def test_every_mode_becomes_8bit_rgb(tmp_path, mode):
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(rgb)
    if mode == "I;16":
        image = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    else:
        image = image.convert(mode)
    path = tmp_path / f"x.{'tif' if mode == 'I;16' else 'png'}"
    image.save(path)
    out = read_rgb(path)
    assert out.mode == "RGB" and out.size == (8, 8)
    if mode == "I;16":
        assert np.array_equal(np.asarray(out)[..., 0], rgb[..., 0])


def test_tile_dataset_gives_uni_and_vae_views(folder):
    item = TileDataset(scan_image_folder(folder), resolution=64)[3]
    assert item["uni_pixels"].shape == (3, 224, 224) and item["uni_pixels"].dtype == torch.uint8
    assert item["vae_pixels"].shape == (3, 64, 64) and item["index"] == 3


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    labels = [0] * 90 + [1] * 10
    sampler = EpochSampler(labels, seed=3)
    first = list(sampler)
    assert sorted(first) == [(i, 0) for i in range(100)] and list(sampler) == first
    sampler.set_epoch(1)
    second = list(sampler)
    assert [i for i, _ in second] != [i for i, _ in first] and {e for _, e in second} == {1}
    balanced = EpochSampler(labels, seed=3, class_balanced=True)
    drawn = [labels[i] for e in range(20) for i, _ in (balanced.set_epoch(e), list(balanced))[1]]
    assert 0.4 < np.mean(drawn) < 0.6


def test_dihedral_gives_eight_distinct_transforms():
    tile = torch.arange(16).view(1, 4, 4)
    variants = {tuple(dihedral(tile, code).flatten().tolist()) for code in range(8)}
    assert len(variants) == 8


def test_hub_free_folder_copy_keeps_working(folder, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert len(scan_image_folder(copy, classes=["ADI", "TUM"]).records) == 4


def test_hub_style_dataset_is_exported_once_to_class_folders(folder, tmp_path):
    from argparse import Namespace

    from accelerate import Accelerator

    from pixcell_ext.data import export_hub_dataset

    # `datasets` resolves a local folder the way it resolves a hub id, so this runs the real loading path offline.
    args = Namespace(dataset_name=str(folder), dataset_split="train", image_column="image", label_column="label")
    target = export_hub_dataset(Accelerator(cpu=True), args, tmp_path / "exported")
    index = scan_image_folder(target)
    assert index.class_names == scan_image_folder(folder).class_names
    assert index.counts() == scan_image_folder(folder).counts()
    first = sorted((target / "ADI").iterdir())[0]
    export_hub_dataset(Accelerator(cpu=True), args, target)  # second call: kept, not rewritten
    assert sorted((target / "ADI").iterdir())[0].stat().st_mtime_ns == first.stat().st_mtime_ns


def test_step_randomness_is_a_function_of_seed_epoch_and_index():
    from pixcell_ext.diffusion import RandomnessSpec, WithStepRandomness

    spec = RandomnessSpec(seed=0, latent_shape=(4, 2, 2), num_train_timesteps=1000, cond_dropout=0.5)
    dataset = WithStepRandomness([{"index": i} for i in range(5)], spec)
    a, b = dataset[(3, 0)], dataset[(3, 0)]
    assert all(torch.equal(a[k], b[k]) for k in a if k != "index") and a["index"] == 3
    assert not torch.equal(dataset[(3, 1)]["noise"], a["noise"])
    assert not torch.equal(dataset[(2, 0)]["noise"], a["noise"])
    assert not torch.equal(a["noise"], a["posterior_noise"])
