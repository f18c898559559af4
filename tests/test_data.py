import shutil

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from pixcell_ext.data import (
    MIN_TILE_SIZE,
    DataError,
    EpochSampler,
    TileDataset,
    dihedral,
    file_digest,
    load_hub_dataset,
    read_rgb,
    scan_image_folder,
)
from pixcell_ext.stacks.tiny import write_tiny_dataset


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


def test_step_randomness_is_a_function_of_seed_epoch_and_index():
    from pixcell_ext.model.diffusion import RandomnessSpec, WithStepRandomness

    spec = RandomnessSpec(seed=0, latent_shape=(4, 2, 2), num_train_timesteps=1000, cond_dropout=0.5)
    dataset = WithStepRandomness([{"index": i} for i in range(5)], spec)
    a, b = dataset[(3, 0)], dataset[(3, 0)]
    assert all(torch.equal(a[k], b[k]) for k in a if k != "index") and a["index"] == 3
    assert not torch.equal(dataset[(3, 1)]["noise"], a["noise"])
    assert not torch.equal(dataset[(2, 0)]["noise"], a["noise"])
    assert not torch.equal(a["noise"], a["posterior_noise"])


def hub_style(folder, classes: list[str], interleave: bool = False) -> datasets.Dataset:
    """The folder as a hub dataset holds it: rows of (encoded image bytes, ClassLabel), as `push_to_hub` or
    `save_to_disk` store them; `interleave` mixes the classes row by row, as hub rows often are."""
    files = [
        (i, label, path)
        for label, name in enumerate(classes)
        for i, path in enumerate(sorted((folder / name).iterdir()))
    ]
    if interleave:
        files.sort(key=lambda file: file[:2])
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=classes))
    rows = {"image": [{"bytes": p.read_bytes(), "path": p.name} for *_, p in files], "label": [f[1] for f in files]}
    return datasets.Dataset.from_dict(rows, features=features)


def test_folder_and_equivalent_hub_dataset_give_the_same_index(folder, tmp_path):
    local = scan_image_folder(folder)
    saved = tmp_path / "saved"
    hub_style(folder, local.class_names, interleave=True).save_to_disk(saved)
    repository = tmp_path / "repository" / "data"  # a hub repository's layout, read by load_dataset as from the hub
    repository.mkdir(parents=True)
    hub_style(folder, local.class_names).to_parquet(repository / "train-00000-of-00001.parquet")
    for hub in (load_hub_dataset(str(saved)), load_hub_dataset(str(repository.parent))):
        assert hub.class_names == local.class_names
        assert [r.label for r in hub.records] == [r.label for r in local.records]
        assert all(r.path is None for r in hub.records)  # read from the rows, nothing exported
        for i in range(len(local.records)):
            assert hub.digest(i) == local.digest(i) == file_digest(local.records[i].path)
            assert np.array_equal(np.asarray(hub.image(i)), np.asarray(local.image(i)))


def test_folder_order_is_class_then_file_name_and_hidden_files_are_not_images(folder):
    (folder / "ADI" / "._ADI-00000000.tif").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    (folder / "ADI" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "ADI" / ".hidden.png").write_bytes(b"not an image")
    (folder / "__MACOSX" / "ADI").mkdir(parents=True)
    (folder / "__MACOSX" / "ADI" / "._ADI-00000001.png").write_bytes(b"\x00\x05\x16\x07")
    (folder / ".thumbnails").mkdir()
    index = scan_image_folder(folder)
    assert index.class_names[0] == "ADI" and "__MACOSX" not in index.class_names
    assert [r.path.name for r in index.records[:2]] == ["ADI-00000000.tif", "ADI-00000001.png"]
    keys = [(r.label, str(r.path)) for r in index.records]
    assert keys == sorted(keys) and len(index.records) == 18 and not index.skipped


def test_only_files_directly_in_class_folders_count(folder):
    Image.new("RGB", (64, 64)).save(folder / "stray.png")
    (folder / "TUM" / "nested").mkdir()
    Image.new("RGB", (64, 64)).save(folder / "TUM" / "nested" / "deep.png")
    (folder / "TUM" / "notes.txt").write_text("scanner log")
    (folder / "metadata.csv").write_text("file_name,label\nTUM/TUM-00000000.tif,ADI\n")
    index = scan_image_folder(folder)
    assert index.counts() == dict.fromkeys(index.class_names, 2)
    assert index.records[-1].path.parent == folder / "TUM"


def test_a_changed_folder_is_read_again_not_taken_from_the_datasets_cache(folder):
    assert len(scan_image_folder(folder).records) == 18
    (folder / "ADI" / "ADI-00000000.tif").unlink()
    Image.new("RGB", (40, 40)).save(folder / "TUM" / "TUM-new.png")
    (folder / "TUM" / "TUM-00000001.png").rename(folder / "ADI" / "ADI-moved.png")
    index = scan_image_folder(folder)
    assert index.counts()["ADI"] == 2 and index.counts()["TUM"] == 2
    assert folder / "ADI" / "ADI-moved.png" in [r.path for r in index.records]


def test_a_class_named_like_a_split_is_a_class(tmp_path):
    data = write_tiny_dataset(tmp_path / "d", images_per_class=1, size=MIN_TILE_SIZE)
    (data / "ADI").rename(data / "test")  # `datasets` would take a bare "test" folder for a test split
    index = scan_image_folder(data)
    assert "test" in index.class_names and len(index.records) == 9


def test_a_single_class_folder_keeps_its_label(folder):
    index = scan_image_folder(folder, classes=["TUM"])
    assert index.class_names == ["TUM"] and [r.label for r in index.records] == [0, 0]


def test_classes_subset_follows_the_given_order(folder):
    index = scan_image_folder(folder, classes=["TUM", "ADI"])
    assert [r.path.parent.name for r in index.records] == ["TUM", "TUM", "ADI", "ADI"]
    assert [r.label for r in index.records] == [0, 0, 1, 1]


@pytest.mark.parametrize("size", [(1, 1), (MIN_TILE_SIZE - 1, 224)])
def test_a_tile_under_the_minimum_size_is_refused_by_name_or_skipped(folder, size):
    small = folder / "STR" / "STR-thumbnail.png"
    Image.new("RGB", size, (200, 100, 150)).save(small)
    with pytest.raises(DataError, match=f"STR-thumbnail.png: {size[0]}x{size[1]} px, under the {MIN_TILE_SIZE} px"):
        scan_image_folder(folder)
    index = scan_image_folder(folder, skip_bad_images=True)
    assert [p for p, _ in index.skipped] == [small] and len(index.records) == 18


def test_a_tile_of_the_minimum_size_is_accepted(folder):
    Image.new("RGB", (MIN_TILE_SIZE, MIN_TILE_SIZE)).save(folder / "STR" / "STR-small.png")
    assert scan_image_folder(folder).counts()["STR"] == 3


def test_bad_hub_rows_are_named_by_row_or_skipped(folder, tmp_path):
    classes = scan_image_folder(folder).class_names
    rows = hub_style(folder, classes).to_dict()
    rows["image"][5] = {"bytes": b"truncated", "path": None}
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=classes))
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "bad")
    with pytest.raises(DataError, match="bad row 5: UnidentifiedImageError") as error:
        load_hub_dataset(str(tmp_path / "bad"))
    assert "--skip_bad_images" in str(error.value)
    index = load_hub_dataset(str(tmp_path / "bad"), skip_bad_images=True)
    assert len(index.records) == 17 and [r.row for r in index.records if r.label == 2] == [4]


def test_hub_dataset_with_plain_labels_and_a_class_subset(folder, tmp_path):
    classes = scan_image_folder(folder).class_names
    rows = hub_style(folder, classes).to_dict()
    rows["label"] = [classes[label] for label in rows["label"]]  # strings, not a ClassLabel
    features = datasets.Features(tile=datasets.Image(), tissue=datasets.Value("string"))
    plain = datasets.Dataset.from_dict({"tile": rows["image"], "tissue": rows["label"]}, features=features)
    plain.save_to_disk(tmp_path / "plain")
    index = load_hub_dataset(str(tmp_path / "plain"), image_column="tile", label_column="tissue")
    assert index.class_names == sorted(classes) and len(index.records) == 18
    subset = load_hub_dataset(
        str(tmp_path / "plain"), image_column="tile", label_column="tissue", classes=["TUM", "ADI"]
    )
    assert subset.counts() == {"TUM": 2, "ADI": 2} and [r.label for r in subset.records] == [0, 0, 1, 1]


def test_hub_dataset_errors_name_the_fix(folder, tmp_path):
    hub_style(folder, scan_image_folder(folder).class_names).save_to_disk(tmp_path / "hub")
    with pytest.raises(DataError, match="no column 'tissue'.*--label_column"):
        load_hub_dataset(str(tmp_path / "hub"), label_column="tissue")
    with pytest.raises(DataError, match="'label' of dataset .* not images.*--image_column"):
        load_hub_dataset(str(tmp_path / "hub"), image_column="label")
    with pytest.raises(DataError, match=r"\['XYZ'\] are not labels.*--classes"):
        load_hub_dataset(str(tmp_path / "hub"), classes=["XYZ"])
    with pytest.raises(DataError, match="Could not load dataset 'no-such/dataset'.*hf auth login"):
        load_hub_dataset("no-such/dataset")
