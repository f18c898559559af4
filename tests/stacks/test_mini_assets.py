"""The toy domains and the committed mini VAE, encoder and judge: each test breaks when what it checks breaks.

Measured values at the committed build are noted beside each threshold (see also benchmarks/RESULTS.md, "Mini
stack build").
"""

import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pixcell_ext import NCT_CLASSES
from pixcell_ext.data import resized_uint8, scan_image_folder, vae_input
from pixcell_ext.model import networks
from pixcell_ext.stacks.mini import MINI_ASSETS, MINI_RESOLUTION, PART_FOLDERS
from pixcell_ext.stacks.toy_histology import toy_tile, toy_tiles, write_toy_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def full_size_tiles(domain, split, per_class, seed=0):
    return list(toy_tiles(domain, split, per_class, seed=seed))


def tiles(domain, split, per_class, size, seed=0):
    """uint8 [N, 3, size, size] and labels, resized from 224 px as the data pipeline does (rendered once)."""
    rendered = full_size_tiles(domain, split, per_class, seed)
    images = [resized_uint8(Image.fromarray(tile), size) for _, _, tile in rendered]
    return torch.stack(images), torch.tensor([class_index for class_index, _, _ in rendered])


def nearest_centroid_accuracy(train_x, train_y, test_x, test_y):
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    centroids = torch.stack([train_x[train_y == c].mean(0) for c in range(len(NCT_CLASSES))])
    return (torch.cdist(test_x, centroids).argmin(1) == test_y).float().mean().item()


def morphology_features(images):
    """Colour-free statistics: brightness quantiles, dark-pixel fraction and edge energy at two scales."""
    grey = images.float().mean(1) / 255
    flat = grey.flatten(1)
    quantiles = torch.quantile(flat, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95]), dim=1).T
    dark = (flat < 0.5).float().mean(1, keepdim=True)
    edges = [(grey[:, 1:] - grey[:, :-1]).abs().mean((1, 2)), (grey[:, :, 1:] - grey[:, :, :-1]).abs().mean((1, 2))]
    coarse = F.avg_pool2d(grey.unsqueeze(1), 4).squeeze(1)
    edges.append((coarse[:, 1:] - coarse[:, :-1]).abs().mean((1, 2)))
    return torch.cat([quantiles, dark, torch.stack(edges, 1)], 1)


def test_toy_tiles_are_deterministic_per_seed():
    first = toy_tile("target", "TUM", np.random.default_rng(3), 96)
    again = toy_tile("target", "TUM", np.random.default_rng(3), 96)
    other = toy_tile("target", "TUM", np.random.default_rng(4), 96)
    assert first.dtype == np.uint8 and first.shape == (96, 96, 3)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_toy_classes_are_separable_by_morphology_alone():
    """Grey-level statistics (no colour) tell the nine classes apart, in both domains: chance is 0.11."""
    for domain in ("source", "target"):
        train_x, train_y = tiles(domain, "train", 6, 96)
        test_x, test_y = tiles(domain, "heldout", 6, 96)
        accuracy = nearest_centroid_accuracy(morphology_features(train_x), train_y, morphology_features(test_x), test_y)
        assert accuracy >= 0.75, (domain, accuracy)  # measured 1.0 (source) / 0.98 (target)


def test_target_differs_from_source_in_stain_and_morphology():
    source, labels = tiles("source", "heldout", 4, 224)
    target, _ = tiles("target", "heldout", 4, 224)
    tissue = labels != NCT_CLASSES.index("BACK")
    # Stain: the mean colour of tissue tiles moves by tens of grey levels.
    shift = (source[tissue].float().mean((2, 3)) - target[tissue].float().mean((2, 3))).norm(dim=1).mean()
    assert shift > 15, shift  # measured 39.3
    # Morphology: TARGET lymphocyte nuclei are larger (x1.25) and sparser (x0.75).
    lym = labels == NCT_CLASSES.index("LYM")
    source_count, source_area = nuclei_statistics(source[lym])
    target_count, target_area = nuclei_statistics(target[lym])
    assert target_area > 1.25 * source_area, (source_area, target_area)  # measured 115 vs 181 px
    assert target_count < 0.9 * source_count, (source_count, target_count)  # measured 78 vs 57


def nuclei_statistics(images):
    """Mean number and mean area (px) of dark blobs per tile: the darkest structures are nuclei."""
    from scipy import ndimage

    counts, areas = [], []
    for image in images.float().mean(1).numpy():
        labelled, count = ndimage.label(image < 0.5 * (np.median(image) + image.min()))
        sizes = np.bincount(labelled.ravel())[1:]
        counts.append(count)
        areas.append(sizes.mean())
    return float(np.mean(counts)), float(np.mean(areas))


def test_write_toy_dataset_is_nct_like_and_splits_are_disjoint(tmp_path):
    train = write_toy_dataset(tmp_path / "train", "source", "train", images_per_class=2, size=64)
    heldout = write_toy_dataset(tmp_path / "heldout", "source", "heldout", images_per_class=2, size=64)
    index = scan_image_folder(train)
    assert index.class_names == list(NCT_CLASSES)
    assert sorted(p.name for p in (train / "LYM").iterdir()) == ["LYM-00000000.tif", "LYM-00000001.png"]
    for name in NCT_CLASSES:
        a = np.asarray(Image.open(train / name / f"{name}-00000000.tif"))
        b = np.asarray(Image.open(heldout / name / f"{name}-00000000.tif"))
        assert not np.array_equal(a, b)
    with pytest.raises(ValueError, match="domain"):
        write_toy_dataset(tmp_path / "bad", "elsewhere", "train", images_per_class=1)


@pytest.fixture(scope="module")
def mini_vae():
    return networks.load_vae(str(MINI_ASSETS / PART_FOLDERS["vae"]))


def test_mini_vae_has_the_sd35_layout(mini_vae):
    assert mini_vae.config.latent_channels == 16
    assert networks.vae_scale_factor(mini_vae) == 8
    assert not mini_vae.config.use_quant_conv and not mini_vae.config.use_post_quant_conv


@pytest.mark.parametrize("domain", ["source", "target"])
def test_mini_vae_reconstructs_heldout_tiles(mini_vae, domain):
    pixels, _ = tiles(domain, "heldout", 2, MINI_RESOLUTION)
    images = vae_input(pixels)
    with torch.no_grad():
        mean, std = networks.encode_latent_distribution(mini_vae, images)
        latents = networks.posterior_latents(mini_vae.config, mean, std, torch.zeros_like(mean))
        decoded = networks.decode_latents(mini_vae, latents)
    psnr = 10 * torch.log10(4 / (decoded - images).pow(2).mean()).item()
    # Issue 12 asks for >= 25 dB: not met. Measured 24.5 dB (source) / 24.6 dB (target) on these 18 tiles, 24.3 / 24.3
    # on the build's 72; the threshold keeps 1 dB of headroom. An untrained or mis-loaded VAE gives ~10 dB.
    assert psnr >= 23.5, psnr


def test_mini_vae_constants_standardise_its_latents(mini_vae):
    """(z - shift) * scale has mean ~0 and std ~1 on training tiles; without the shift the mean would be off."""
    pixels = torch.cat([tiles(d, "train", 3, MINI_RESOLUTION)[0] for d in ("source", "target")])
    with torch.no_grad():
        mean, std = networks.encode_latent_distribution(mini_vae, vae_input(pixels))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
    latents = networks.posterior_latents(mini_vae.config, mean, std, noise)
    assert abs(latents.mean().item()) < 0.1, latents.mean().item()  # measured -0.0001
    assert 0.85 < latents.std().item() < 1.15, latents.std().item()  # measured 1.004
    # The constants matter at these tolerances: dropping the shift moves the mean by shift * scale (0.53), dropping
    # the scale moves the std to 1 / 1.79.
    assert abs(mini_vae.config.shift_factor * mini_vae.config.scaling_factor) > 0.2
    assert abs(mini_vae.config.scaling_factor - 1) > 0.3


def test_mini_encoder_separates_source_classes():
    encoder = networks.load_uni(str(MINI_ASSETS / PART_FOLDERS["uni"]))
    assert encoder.embed_dim == 64
    train_x, train_y = tiles("source", "train", 5, networks.UNI_IMAGE_SIZE, seed=7)
    test_x, test_y = tiles("source", "heldout", 5, networks.UNI_IMAGE_SIZE)
    with torch.no_grad():
        train_f, test_f = encoder(train_x).squeeze(1), encoder(test_x).squeeze(1)
    accuracy = nearest_centroid_accuracy(train_f, train_y, test_f, test_y)
    assert accuracy >= 0.8, accuracy  # measured 0.98; chance 0.11


def test_judge_classifies_heldout_target_tiles():
    from pixcell_ext.stacks.judge import load_judge

    judge, class_names = load_judge(MINI_ASSETS / PART_FOLDERS["judge"])
    assert class_names == list(NCT_CLASSES)
    pixels, labels = tiles("target", "heldout", 5, 224)
    with torch.no_grad():
        full = judge(pixels).argmax(1)
        small = judge(F.interpolate(pixels.float() / 255, size=MINI_RESOLUTION, mode="bicubic", antialias=True))
    assert (full == labels).float().mean().item() >= 0.9  # measured 1.0
    assert (small.argmax(1) == labels).float().mean().item() >= 0.9  # measured 1.0


def test_judge_loads_as_a_timm_feature_space():
    from pixcell_ext.evaluation.extractors import timm_extractor
    from pixcell_ext.stacks.judge import timm_extractor_arguments

    name, weights, options = timm_extractor_arguments(MINI_ASSETS / PART_FOLDERS["judge"])
    extractor = timm_extractor(name, weights, **options)
    train, train_labels = tiles("target", "train", 3, extractor.image_size, seed=7)
    heldout, labels = tiles("target", "heldout", 3, extractor.image_size)
    train_features, features = extractor.extract(train), extractor.extract(heldout)
    assert features.shape[0] == len(labels) and features.shape[1] > 8
    # Pooled judge features cluster by class: the feature space means something.
    assert nearest_centroid_accuracy(train_features, train_labels, features, labels) >= 0.8  # measured 1.0


def test_judge_trains_on_tiles_no_other_set_holds():
    """By content: the judge's training tiles, regenerated from its recorded build, share no pixel bytes with the
    adaptation tiles or any held-out set (the sets `mini.write_mini_stack` writes). Each stream's first tiles per
    class suffice: a shared stream repeats from its first tile."""
    import hashlib
    import json

    info = json.loads((MINI_ASSETS / PART_FOLDERS["judge"] / "build_info.json").read_text())
    split = info["config"].get("train_split", "train")

    def digests(domain, split, seed):
        return {hashlib.sha256(tile.tobytes()).hexdigest() for _, _, tile in full_size_tiles(domain, split, 3, seed)}

    judge = digests("target", split, info["seed"])
    assert len(judge) == 3 * len(NCT_CLASSES)
    others = {
        "target-train": ("target", "train", 0),
        "target-heldout": ("target", "heldout", 0),
        "target-test": ("target", "heldout", 1),
        "source-heldout": ("source", "heldout", 0),
    }
    for name, stream in others.items():
        assert not judge & digests(*stream), f"the judge trained on tiles of {name}"
