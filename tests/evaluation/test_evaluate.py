"""End-to-end tests of evaluate_synthetic.py and pixcell_ext.evaluation.pipeline on tiny random encoders (CPU, offline).

Random encoders make the numbers meaningless as quality scores, but not as checks: a distance must still be zero
for identical sets, grow with image corruption, and the probes must agree when their training data agree.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from torch import nn

from conftest import REPO
from pixcell_ext.arguments import ArgumentError
from pixcell_ext.data import DataError, scan_image_folder
from pixcell_ext.evaluation import pipeline
from pixcell_ext.evaluation.distribution import matched_metrics
from pixcell_ext.evaluation.metrics import frechet_distance
from pixcell_ext.generation.manifest import GENERATION_CONFIG_FILE, References, read_references, write_manifest
from pixcell_ext.stacks.testing_assets import TINY_TIMM_ENCODER, write_random_timm_encoder
from pixcell_ext.stacks.tiny import write_tiny_dataset
from pixcell_ext.training import feature_cache

sys.path.insert(0, str(REPO))
import evaluate_synthetic  # noqa: E402

SIZE = 64
TIMM = TINY_TIMM_ENCODER


pytestmark = pytest.mark.usefixtures("one_thread", "one_blas_thread")


@pytest.fixture
def one_blas_thread():
    """The probes' small logistic regressions lose more to BLAS threads on a busy machine than they gain."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def timm_weights(tmp_path_factory) -> Path:
    return write_random_timm_encoder(TIMM, tmp_path_factory.mktemp("timm") / "encoder")


@pytest.fixture(scope="module")
def real_dir(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("real") / "real", images_per_class=6, size=SIZE, seed=0)


@pytest.fixture(scope="module")
def accelerator() -> Accelerator:
    return Accelerator(cpu=True)


def _timm(weights: Path) -> pipeline.FeatureExtractor:
    return pipeline.timm_extractor(TIMM, str(weights), image_size=SIZE)


def _files(folder: Path) -> list[Path]:
    return pipeline.TileSet.from_index(scan_image_folder(folder)).paths


def _noisy_copy(src: Path, dst: Path, sigma: float, seed: int) -> Path:
    """A copy of the class folder ``src`` with Gaussian noise of std ``sigma`` (in 0-255 units) on every pixel."""
    rng = np.random.default_rng(seed)
    for path in _files(src):
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
        noisy = np.clip(np.rint(pixels + rng.normal(0.0, sigma, pixels.shape)), 0, 255).astype(np.uint8)
        (dst / path.parent.name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(noisy).save(dst / path.parent.name / f"{path.stem}.png")
    return dst


def _features(accelerator, extractor, folder: Path, cache: Path) -> np.ndarray:
    paths = _files(folder)
    digests = feature_cache.hash_files(accelerator, paths)
    return pipeline.compute_features(accelerator, extractor, paths, digests, cache, batch_size=16)


def _run(argv: list[str]) -> dict:
    args = evaluate_synthetic.parse_args([*argv, "--dataloader_num_workers", "0"])
    evaluate_synthetic.main(args)
    return json.loads((Path(args.output_dir) / "metrics.json").read_text())


# ----------------------------------------------------------------------------------------------------------------
# Distances through the extractor and the cache
# ----------------------------------------------------------------------------------------------------------------


def test_fd_zero_on_itself_grows_with_noise_and_matches_torchmetrics(accelerator, real_dir, timm_weights, tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance

    extractor = _timm(timm_weights)
    real = _features(accelerator, extractor, real_dir, tmp_path / "cache")
    assert real.shape == (54, 64)
    assert abs(frechet_distance(real, real)) < 1e-6 * np.trace(np.cov(real.T))

    sigmas = [4, 16, 64]
    distances = []
    for sigma in sigmas:
        noisy_dir = _noisy_copy(real_dir, tmp_path / f"noisy{sigma}", sigma, seed=sigma)
        distances.append(frechet_distance(real, _features(accelerator, extractor, noisy_dir, tmp_path / "cache")))
    assert distances[0] > 0
    assert all(a < b for a, b in zip(distances, distances[1:], strict=False)), dict(zip(sigmas, distances, strict=True))

    class AsModule(nn.Module):
        num_features = real.shape[1]  # lets torchmetrics skip its dummy forward

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return extractor.extract(images).double()

    fid = FrechetInceptionDistance(feature=AsModule())
    fid.update(torch.stack([pipeline.load_tile(p, SIZE) for p in _files(real_dir)]), real=True)
    fid.update(torch.stack([pipeline.load_tile(p, SIZE) for p in _files(tmp_path / "noisy16")]), real=False)
    assert float(fid.compute()) == pytest.approx(distances[1], abs=1e-3)


def test_kid_interval_holds_zero_for_one_distribution_and_excludes_it_when_shifted(timm_weights, tmp_path):
    extractor = _timm(timm_weights)

    def tum(seed: int) -> torch.Tensor:
        folder = write_tiny_dataset(tmp_path / f"set{seed}", images_per_class=60, size=SIZE, seed=seed) / "TUM"
        return torch.stack([pipeline.load_tile(p, SIZE) for p in sorted(folder.iterdir())])

    first, second = tum(0), tum(1)
    shifted = (second.float() * 0.7 + 50).clamp(0, 255).to(torch.uint8)
    reference = extractor.extract(first).numpy()
    settings = pipeline.DistributionSettings(draws=1)

    def kid(synthetic: np.ndarray) -> dict:
        return matched_metrics(reference, ["TUM"] * 60, synthetic, ["TUM"] * 60, ["TUM"], settings)["kid"]

    same, moved = kid(extractor.extract(second).numpy()), kid(extractor.extract(shifted).numpy())
    assert same["n"] == moved["n"] == 60
    assert same["low"] <= 0.0 <= same["high"]
    assert moved["low"] > 0 and moved["value"] > 5 * abs(same["value"])


def test_feature_cache_is_keyed_by_content_and_reused(accelerator, real_dir, tmp_path):
    calls = []

    def load(device):
        def forward(images):
            calls.append(len(images))
            return images.float().mean(dim=(2, 3))

        return forward

    extractor = pipeline.FeatureExtractor("mean", "mean-rgb-v1", SIZE, "mean colour", load)
    folder = tmp_path / "tiles"
    shutil.copytree(real_dir, folder)
    duplicate = _files(folder)[0]
    shutil.copy(duplicate, duplicate.with_name("copy-of-first.png"))  # same bytes, another name
    first = _features(accelerator, extractor, folder, tmp_path / "cache")
    assert sum(calls) == 54  # 55 files, 54 distinct contents
    np.testing.assert_array_equal(first[0], first[6])  # the copy sorts last in ADI ("ADI-..." < "copy-...")

    calls.clear()
    again = _features(accelerator, extractor, folder, tmp_path / "cache")
    assert sum(calls) == 0
    np.testing.assert_array_equal(first, again)

    Image.new("RGB", (SIZE, SIZE), (10, 200, 30)).save(_files(folder)[5])
    changed = _features(accelerator, extractor, folder, tmp_path / "cache")
    assert sum(calls) == 1
    assert changed[5].tolist() == pytest.approx([10, 200, 30])


# ----------------------------------------------------------------------------------------------------------------
# The script: probes, outputs, errors
# ----------------------------------------------------------------------------------------------------------------


def test_tstr_equals_trtr_when_synthetic_copies_real_train_split(real_dir, timm_weights, tmp_path):
    real = pipeline.TileSet.from_index(scan_image_folder(real_dir))
    train_rows, test_rows = pipeline.split_per_class(real, 0.5, seed=0)
    assert sorted(train_rows + test_rows) == list(range(54)) and not set(train_rows) & set(test_rows)
    synthetic = tmp_path / "synthetic"
    manifest = []
    for i, row in enumerate(train_rows):
        path, label = real.paths[row], real.labels[row]
        (synthetic / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, synthetic / label / f"gen_{i:04d}{path.suffix}")
        reference = path.relative_to(real_dir).as_posix()  # as generate_synthetic.py writes it
        manifest.append({"file": f"{label}/gen_{i:04d}{path.suffix}", "class": label, "reference": reference})
    write_manifest(synthetic, manifest)

    out = tmp_path / "eval"
    report = _run(
        ["--real_dir", str(real_dir), "--synthetic_dir", str(synthetic), "--output_dir", str(out)]
        + ["--extractors", "timm", "--timm_encoder", TIMM, "--timm_encoder_weights", str(timm_weights)]
        + ["--timm_image_size", str(SIZE), "--kid_subsets", "10"]
    )
    assert set(report["extractors"]) == {f"timm:{TIMM}", pipeline.COLOUR_HISTOGRAM}
    for name, result in report["extractors"].items():
        tstr, trtr = result["probe"]["TSTR"], result["probe"]["TRTR"]
        assert tstr["n_train"] == trtr["n_train"] == 27 and tstr["n_test"] == 27, name
        for key in ("balanced_accuracy", "macro_f1", "accuracy", "per_class_recall"):
            assert tstr[key] == trtr[key], (name, key)
    assert report["counts"]["real_train"] == report["counts"]["synthetic"] == dict.fromkeys(report["classes"], 3)
    assert any("same patients" in note for note in report["notes"])
    assert any("generated from references in --real_dir" in w for w in report["warnings"])
    assert not any("probe test set" in w for w in report["warnings"])  # only train tiles were copied
    with open(out / "per_class_metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 10
    assert {r["tstr_recall"] == r["trtr_recall"] for r in rows} == {True}
    overall = [r for r in rows if r["class"] == "overall"]
    assert len(overall) == 2 and all(r["tstr_balanced_accuracy"] == r["trtr_balanced_accuracy"] != "" for r in overall)


def test_tiny_preset_writes_json_csv_and_plots(tiny_stack, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = _run(
        ["--preset", "tiny", "--tiny_dir", str(tiny_stack.data.parent), "--output_dir", str(tmp_path / "out")]
    )
    out = tmp_path / "out"

    assert {"uni", f"timm:{TIMM}", pipeline.COLOUR_HISTOGRAM} <= set(report["extractors"])
    assert "inception" in report["extractors"] or "Inception skipped" in report["skipped_extractors"]["inception"]
    for name in ("uni", f"timm:{TIMM}"):
        entry = report["extractors"][name]
        assert entry["random_weights"] is True
        assert set(entry["distribution"]) == {*report["classes"], "overall"}
        ok = entry["distribution"]["overall"]
        assert ok["n"] == 36 and ok["n_per_class"] == dict.fromkeys(report["classes"], 4)
        for metric in ("fd", "kid", "precision", "recall", "density", "coverage"):
            assert ok[metric]["n"] == 36 and ok[metric]["low"] <= ok[metric]["value"] <= ok[metric]["high"], metric
        assert {"TSTR", "TRTR", "TRTR_full", "TSTR_colour_jitter"} == set(entry["probe"])
        assert all(p["balanced_accuracy_ci"]["n"] == 18 for p in entry["probe"].values())
        assert [p["k"] for p in entry["low_data"]["points"]] == [2]  # 2 real training tiles per class
    # 4 tiles per class in 32-d (UNI) and 64-d (timm) features: one warning names every such group and points to KID.
    small = [w for w in report["warnings"] if w.startswith("FD rests on fewer than 2 d tiles")]
    assert len(small) == 1 and "uni ADI (n=4, d=32)" in small[0] and "read KID" in small[0]
    notes = " ".join(report["notes"])
    assert "flatter" in notes and "RANDOM weights" in notes and "smoke test" in notes and "LPIPS skipped" in notes
    assert report["synthetic_is_standin"] is True and "stand-in" in notes
    assert "--train_data_dir" in report["memorisation"]["skipped"]
    assert report["lpips"] == {"skipped": report["lpips"]["skipped"]}
    card = (out / "DATASET_CARD.md").read_text()
    assert "UNI2-h's terms" in card and "commercial" in card and "| uni |" in card and "STAND-IN" in card
    assert "- uni: k=2: " in card  # the low-data curve, in the card as in plots/low_data.png

    with open(out / "per_class_metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(report["extractors"]) * 10
    assert rows[0]["extractor"] == "uni" and rows[0]["class"] == "ADI" and rows[0]["n"] == "4"
    assert float(rows[0]["kid_low"]) <= float(rows[0]["kid"]) <= float(rows[0]["kid_high"])
    assert "plots/low_data.png" in report["plots"] and len(report["plots"]) == 7
    for plot in report["plots"]:
        with Image.open(out / plot) as image:
            assert image.format == "PNG" and image.size[0] > 300
            image.verify()

    # The VAE floor (the tiny stack's VAE is given by the preset): round trips of the 2 held-out tiles per class, at
    # the synthetic tiles' size, compared with the 2 real tiles per class that are not held out, in every FD space.
    floor = report["vae_floor"]
    assert floor["counts"] == dict.fromkeys(report["classes"], 2) and set(floor["extractors"]) == {
        "uni",
        f"timm:{TIMM}",
    }
    assert floor["extractors"]["uni"]["overall"]["n"] == 18 and floor["vae"] == report["config"]["vae_name_or_path"]
    trips = sorted((out / "vae_floor").rglob("*.png"))
    synthetic = next(Path(report["config"]["synthetic_dir"]).rglob("*.png"))
    with Image.open(trips[0]) as image, Image.open(synthetic) as generated:
        assert len(trips) == 18 and image.size == generated.size == (floor["resolution"],) * 2
    assert any(line.startswith("uni VAE floor: fd ") for line in pipeline.summary_lines(report))

    # uni, timm, colour histogram, jittered, and the round trips in uni and timm
    assert len(list(out.glob("feature_cache/*/shard-*.safetensors"))) == 8


def test_tiny_preset_on_another_synthetic_set_does_not_call_it_a_standin_and_warns_once_without_manifest(
    tiny_stack, tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)
    synthetic = _noisy_copy(tiny_stack.data, tmp_path / "generated", sigma=8, seed=0)  # no manifest.csv
    base = ["--preset", "tiny", "--tiny_dir", str(tiny_stack.data.parent), "--extractors", "timm"]
    with caplog.at_level("INFO"):
        report = _run([*base, "--synthetic_dir", str(synthetic), "--output_dir", str(tmp_path / "out")])
    assert report["synthetic_is_standin"] is False
    assert not any("stand-in" in note for note in report["notes"])
    assert any("random tiny encoders" in note for note in report["notes"])
    assert report["warnings"].count(pipeline.NO_MANIFEST_WARNING) == 1
    assert sum(pipeline.NO_MANIFEST_WARNING in r.getMessage() for r in caplog.records) == 1
    kid = report["extractors"][f"timm:{TIMM}"]["distribution"]["overall"]["kid"]
    printed = f"kid {kid['value']:.3g} [{kid['low']:.3g}, {kid['high']:.3g}] (n=36)"
    assert any(printed in r.getMessage() for r in caplog.records)  # headline numbers printed with their intervals

    default = _run([*base, "--output_dir", str(tmp_path / "standin")])
    assert default["synthetic_is_standin"] is True
    assert any("stand-in" in note for note in default["notes"])
    assert pipeline.NO_MANIFEST_WARNING not in default["warnings"]


def test_a_generator_that_copies_its_training_tiles_is_flagged_and_the_pairs_are_drawn(
    real_dir, timm_weights, tmp_path
):
    training = write_tiny_dataset(tmp_path / "training", images_per_class=6, size=SIZE, seed=5)
    held_out = write_tiny_dataset(tmp_path / "held-out", images_per_class=6, size=SIZE, seed=7)
    copies = _noisy_copy(training, tmp_path / "copies", sigma=1, seed=0)
    out = tmp_path / "eval"
    report = _run(
        ["--real_dir", str(real_dir), "--real_test_dir", str(held_out), "--synthetic_dir", str(copies)]
        + ["--train_data_dir", str(training), "--output_dir", str(out), "--extractors", "timm"]
        + ["--timm_encoder", TIMM, "--timm_encoder_weights", str(timm_weights), "--timm_image_size", str(SIZE)]
        + ["--matched_draws", "1", "--bootstrap_replicates", "20", "--low_data_ks", "2"]
    )
    memorisation = report["memorisation"]
    assert memorisation["feature_space"] == f"timm:{TIMM}" and memorisation["flagged"] is True
    assert memorisation["possible_copies"]["value"] > 0.9 and memorisation["possible_copies"]["n"] == 54
    assert memorisation["n_training"] == 54 and memorisation["n_held_out"] == 54
    assert any(w.startswith("Possible copies of training tiles") for w in report["warnings"])
    with Image.open(memorisation["pairs_image"]) as image:
        assert image.format == "PNG" and image.size[0] > 8 * 96


def test_clear_errors_for_bad_folders(real_dir, timm_weights, tmp_path):
    base = ["--output_dir", str(tmp_path / "out"), "--extractors", "timm"]
    with pytest.raises(DataError, match="does-not-exist"):
        _run([*base, "--real_dir", str(real_dir), "--synthetic_dir", str(tmp_path / "does-not-exist")])
    synthetic = tmp_path / "syn"
    (synthetic / "ADI").mkdir(parents=True)
    (synthetic / "TUM").mkdir()
    shutil.copy(_files(real_dir)[0], synthetic / "ADI" / "gen_0000.tif")
    with pytest.raises(DataError, match=r"syn/TUM' has no images"):
        _run([*base, "--real_dir", str(real_dir), "--synthetic_dir", str(synthetic)])
    shutil.copy(_files(real_dir)[0], synthetic / "TUM" / "gen_0000.tif")
    (synthetic / "EXTRA").mkdir()
    shutil.copy(_files(real_dir)[0], synthetic / "EXTRA" / "gen_0000.tif")
    with pytest.raises(DataError, match=r"real/EXTRA' does not exist"):
        _run([*base, "--real_dir", str(real_dir), "--synthetic_dir", str(synthetic)])
    with pytest.raises(SystemExit):
        evaluate_synthetic.parse_args(["--real_dir", str(real_dir)])
    with pytest.raises(ArgumentError, match="--lpips_backbone 'nope.pth' is not a file"):
        evaluate_synthetic.parse_args(
            [*base, "--real_dir", ".", "--synthetic_dir", ".", "--lpips_backbone", "nope.pth"]
        )
    with pytest.raises(ArgumentError, match=r"--vae_name_or_path '.*syn' holds no vae/config.json"):
        evaluate_synthetic.parse_args(
            [*base, "--real_dir", ".", "--synthetic_dir", ".", "--vae_name_or_path", str(synthetic)]
        )


# ----------------------------------------------------------------------------------------------------------------
# Extractor loading: never silently random
# ----------------------------------------------------------------------------------------------------------------


def test_timm_encoder_refuses_missing_or_mismatched_weights_and_keys_its_preprocessing(timm_weights, tmp_path):
    with pytest.raises(ValueError, match="needs --timm_encoder_weights"):
        pipeline.timm_extractor(TIMM, None)
    other = write_random_timm_encoder("test_vit", tmp_path / "vit")
    with pytest.raises(ValueError, match="does not fit timm model"):
        pipeline.timm_extractor(TIMM, str(other)).load()
    with pytest.raises(ValueError, match="does not fit timm model"):
        pipeline.timm_extractor("test_vit", str(other), model_kwargs={"depth": 1}).load()

    default = _timm(timm_weights)
    custom = pipeline.timm_extractor(TIMM, str(timm_weights), image_size=SIZE, mean=(0.7, 0.6, 0.7), std=(0.2,) * 3)
    assert custom.cache_id != default.cache_id  # other preprocessing, other cache folder
    images = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8)
    assert not torch.allclose(custom.extract(images), default.extract(images))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_inception_formats_and_offline_skip(tmp_path, monkeypatch):
    import huggingface_hub.constants
    import torchmetrics.image.fid
    from torchvision.models import inception_v3

    images = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8)

    class TinyFID(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0  # the [-1, 1] convention of the FID Inception
            return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)

    scripted = tmp_path / "fid_inception.pt"
    torch.jit.script(TinyFID()).save(str(scripted))
    features = pipeline.inception_extractor(str(scripted)).extract(images)
    assert features.shape == (2, 6)
    expected = (images.float() / 127.5 - 1).mean(dim=(2, 3))
    torch.testing.assert_close(features[:, :3], expected)

    torch.manual_seed(0)
    state_dict = tmp_path / "inception_v3.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), state_dict)
    extractor = pipeline.inception_extractor(str(state_dict))
    assert "state dict" in extractor.identity and extractor.image_size == 299
    assert extractor.extract(images[:1]).shape == (1, 2048)

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the network fails without being told
    monkeypatch.setattr(torchmetrics.image.fid, "NoTrainInceptionV3", offline)
    with pytest.raises(pipeline.ExtractorUnavailable, match="offline, pass --inception_weights PATH"):
        pipeline.inception_extractor(None).load()

    def not_installed(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'torch_fidelity'")

    monkeypatch.setattr(torchmetrics.image.fid, "NoTrainInceptionV3", not_installed)
    with pytest.raises(pipeline.ExtractorUnavailable, match="pip install -r requirements.txt"):
        pipeline.inception_extractor(None).load()

    def no_download(*args, **kwargs):
        raise AssertionError("HF_HUB_OFFLINE=1: no download may be tried")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub-cache"))
    monkeypatch.setattr(torchmetrics.image.fid, "NoTrainInceptionV3", no_download)
    with pytest.raises(
        pipeline.ExtractorUnavailable, match=r"offline \(HF_HUB_OFFLINE=1\) and .* not in the torch hub"
    ):
        pipeline.inception_extractor(None).load()


def test_requirements_provide_the_fid_inception():
    """Online users get Inception FD out of the box: torchmetrics' FID network comes from torch-fidelity."""
    requirements = (REPO / "requirements.txt").read_text().splitlines()
    assert any(line.startswith("torch-fidelity") for line in requirements)


def test_lpips_diversity_and_fidelity_follow_the_manifest(real_dir, tmp_path):
    from torchvision.models import alexnet

    torch.manual_seed(0)
    backbone = tmp_path / "alexnet_features.pth"
    torch.save({f"features.{k}": v for k, v in alexnet(weights=None).features.state_dict().items()}, backbone)

    # Synthetic tiles are exact copies of real tiles; the manifest points each at its original, except one
    # unconditional row. Random-backbone LPIPS means nothing, but LPIPS(x, x) is exactly 0 for any backbone.
    synthetic_dir = tmp_path / "synthetic"
    rows = []
    for cls in ("ADI", "TUM"):
        (synthetic_dir / cls).mkdir(parents=True)
        for i, path in enumerate(sorted((real_dir / cls).iterdir())):
            shutil.copy(path, synthetic_dir / cls / f"gen_{i:04d}{path.suffix}")
            reference = "none" if (cls, i) == ("TUM", 0) else path.relative_to(real_dir).as_posix()
            rows.append({"file": f"{cls}/gen_{i:04d}{path.suffix}", "class": cls, "reference": reference})
    write_manifest(synthetic_dir, rows)
    config = {"sources": {"reference_data_dir": str(real_dir)}}  # what generate_synthetic.py records
    (synthetic_dir / GENERATION_CONFIG_FILE).write_text(json.dumps(config))
    synthetic = pipeline.TileSet.from_index(scan_image_folder(synthetic_dir))
    manifest = read_references(synthetic_dir, tmp_path / "another-real-dir")
    assert manifest.unresolved == [] and sum(r is None for r in manifest.references.values()) == 1

    scorer = pipeline.LPIPSScorer(backbone, "alex", size=SIZE)
    settings = pipeline.LPIPSSettings(max_pairs=1000, batch_size=8, replicates=50)
    real = pipeline.TileSet.from_index(scan_image_folder(real_dir))
    result = pipeline.lpips_metrics(scorer, synthetic, real, ["ADI", "TUM"], manifest, settings)
    assert result["ADI"]["generated_to_reference"]["n"] == 6 and result["TUM"]["generated_to_reference"]["n"] == 5
    assert result["ADI"]["generated_to_reference"]["value"] == 0.0
    assert result["overall"]["generated_to_reference"] == {"value": 0.0, "low": 0.0, "high": 0.0, "n": 11}
    for cls in ("ADI", "TUM"):
        generated, baseline = result[cls]["generated_pairs"], result[cls]["real_pairs"]
        assert generated["n"] == baseline["n"] == 15 and generated["low"] <= generated["value"] <= generated["high"]
        assert generated["value"] == pytest.approx(baseline["value"])  # the copies are as diverse as the originals
        assert generated["value"] > 0

    # Rotating the references within a class pairs every tile with another one: its distance to the reference is
    # then that of a random real pair of the class, its baseline.
    shifted = {}
    for cls in ("ADI", "TUM"):
        keys = [p for p in manifest.references if p.parent.name == cls]
        values = [manifest.references[p] for p in keys]
        shifted.update(zip(keys, values[1:] + values[:1], strict=True))
    rotated = pipeline.lpips_metrics(scorer, synthetic, real, ["ADI"], References(shifted, []), settings)
    assert rotated["ADI"]["generated_to_reference"]["value"] > 0.0
    assert rotated["ADI"]["generated_pairs"] == result["ADI"]["generated_pairs"]
