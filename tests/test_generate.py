"""generate_synthetic.py on the tiny stack: layout, manifest, determinism across processes and batch sizes, resume.

CPU numerics that the tests pin down explicitly:
- Every forward runs at the full batch shape (a short batch is padded), so images do not depend on which items share
  a batch or a process. Different batch SIZES run different GEMM/conv kernels (small-M paths), which changes a few
  pixels by one grey level: batch 1 vs 4 is compared with that tolerance, not for byte identity.
- oneDNN convolutions (the VAE decode) round differently for different intra-op thread counts, and torchrun gives
  each of N processes OMP_NUM_THREADS=1. So every run here uses one thread, the same for one process and for two.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, launch_command
from pixcell_ext import NCT_CLASSES
from pixcell_ext.console import run_main
from pixcell_ext.data import DataError
from pixcell_ext.generation import manifest, pipeline, run_config, work_list
from pixcell_ext.model import networks
from pixcell_ext.model.adapter import AdapterConfig, UNIAdapter, save_adapter
from pixcell_ext.model.conditioning import AdaptedPixCell
from pixcell_ext.model.lora import LoRAConfig, inject_lora, lora_layers, merge_lora
from pixcell_ext.model.lora_files import DamagedFileError, LoRAMismatchError
from pixcell_ext.training import run_directory

sys.path.insert(0, str(REPO))
import generate_synthetic  # noqa: E402

N = 3  # per class: one short batch of 3 at batch size 4, split 2 + 1 over two processes
STEPS = "3"


pytestmark = pytest.mark.usefixtures("one_thread")


def make_run_dir(transformer_path: Path, directory: Path, seed: int = 0) -> Path:
    """A training output with a LoRA and an adapter that both change the images."""
    transformer = networks.load_transformer(str(transformer_path))
    model = AdaptedPixCell(
        transformer, UNIAdapter(AdapterConfig(embed_dim=transformer.config.caption_channels, hidden_dim=64))
    )
    lora_config = LoRAConfig(rank=4)
    inject_lora(transformer, lora_config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "adapter.fc2" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    run_directory.save_trained(directory, model, lora_config)
    return directory


@pytest.fixture(scope="module")
def run_dir(tiny_stack, tmp_path_factory) -> Path:
    return make_run_dir(tiny_stack.pixcell, tmp_path_factory.mktemp("lora-run"))


def cli(tiny_stack, run_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--preset", "tiny", "--tiny_dir", str(tiny_stack.pixcell.parent), "--lora_dir", str(run_dir),
        "--output_dir", str(output_dir), "--num_images_per_class", str(N), "--num_inference_steps", STEPS,
        "--batch_size", "4", *extra,
    ]  # fmt: skip


def generate(*argv: str) -> None:
    generate_synthetic.main(generate_synthetic.parse_args(list(argv)))


def subprocess_env() -> dict:
    return {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def png_bytes(output_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(output_dir).as_posix(): p.read_bytes() for p in sorted(output_dir.glob("*/*.png"))}


def assert_imagefolder_matches_manifest(output_dir: Path, cache_dir: Path) -> None:
    """`datasets` loads the set with every manifest column per image (none for the hidden contact sheets)."""
    import datasets

    loaded = datasets.load_dataset("imagefolder", data_dir=str(output_dir), split="train", cache_dir=str(cache_dir))
    rows = manifest.read_manifest(output_dir)
    assert loaded.num_rows == len(rows) == len(png_bytes(output_dir))
    assert "label" not in loaded.column_names  # with metadata, imagefolder infers no label: the class is "class"
    by_file = {Path(record["image"].filename).relative_to(output_dir).as_posix(): record for record in loaded}
    for row in rows:
        record = by_file[row["file"]]
        assert {key: str(record[key]) for key in row if key != "file"} == {k: v for k, v in row.items() if k != "file"}
        assert record["image"].size == Image.open(output_dir / row["file"]).size


def leftovers(output_dir: Path) -> list[Path]:
    return [p for p in output_dir.rglob("*") if ".tmp" in p.name]


@pytest.fixture(scope="module")
def reference(tiny_stack, run_dir, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("reference")
    generate(*cli(tiny_stack, run_dir, output_dir))
    return output_dir


@pytest.fixture(scope="module")
def batch_one(tiny_stack, run_dir, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("batch-one")
    generate(*cli(tiny_stack, run_dir, output_dir, "--batch_size", "1"))
    return output_dir


def test_tiny_preset_writes_class_folders_and_a_complete_manifest(reference, run_dir, tmp_path):
    for name in NCT_CLASSES:
        assert sorted(p.name for p in (reference / name).iterdir()) == [f"gen_{i:04d}.png" for i in range(N)]
        image = Image.open(reference / name / "gen_0000.png")
        assert image.size == (64, 64) and image.mode == "RGB"
        assert (reference / f".contact_sheet_{name}.png").is_file()
    rows = manifest.read_manifest(reference)
    assert list(rows[0]) == list(manifest.MANIFEST_COLUMNS)
    assert [(r["class"], int(r["index"])) for r in rows] == [(c, i) for c in NCT_CLASSES for i in range(N)]
    assert all(r["file"] == f"{r['class']}/gen_{int(r['index']):04d}.png" for r in rows)
    assert all(r["conditioning"] == "reference" and r["reference"].startswith(r["class"] + "/") for r in rows)
    assert len({r["seed"] for r in rows}) == len(rows)
    assert {r["lora_sha256"] for r in rows} == {run_config.lora_sha256(str(run_dir))}
    assert {(r["guidance_scale"], r["num_inference_steps"], r["scheduler"]) for r in rows} == {("2.0", STEPS, "dpm")}
    assert not leftovers(reference)
    config = json.loads((reference / manifest.GENERATION_CONFIG_FILE).read_text())
    assert config["images_per_class"] == dict.fromkeys(NCT_CLASSES, N) and config["resolution"] == 64
    assert_imagefolder_matches_manifest(reference, tmp_path / "cache")


def test_two_processes_write_the_bytes_of_one_process(tiny_stack, run_dir, reference, tmp_path):
    output_dir = tmp_path / "two"
    command = launch_command(2, "generate_synthetic.py", *cli(tiny_stack, run_dir, output_dir))
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "process 2/2 makes" in result.stderr  # two processes really shared the work
    assert png_bytes(output_dir) == png_bytes(reference)
    assert (output_dir / "manifest.csv").read_bytes() == (reference / "manifest.csv").read_bytes()
    assert (output_dir / "metadata.jsonl").read_bytes() == (reference / "metadata.jsonl").read_bytes()


def test_ddpm_two_processes_write_the_bytes_of_one_process(tiny_stack, run_dir, reference, tmp_path):
    # DDPM draws fresh noise at every step: it must come from each image's generator, not the global RNG.
    argv = ("--scheduler", "ddpm", "--classes", "TUM", "LYM")
    one, two = tmp_path / "one", tmp_path / "two"
    generate(*cli(tiny_stack, run_dir, one, *argv))
    command = launch_command(2, "generate_synthetic.py", *cli(tiny_stack, run_dir, two, *argv))
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "process 2/2 makes" in result.stderr
    assert len(png_bytes(one)) == 2 * N and png_bytes(two) == png_bytes(one)
    assert png_bytes(one)["TUM/gen_0000.png"] != png_bytes(reference)["TUM/gen_0000.png"]  # really another sampler
    assert {r["scheduler"] for r in manifest.read_manifest(two)} == {"ddpm"}


def test_batch_size_one_matches_batch_size_four_to_one_grey_level(reference, batch_one):
    # Not byte-identical on CPU: batch 1 runs other (small-M) GEMM/conv kernels than batch 4, whose rounding flips a
    # few pixels by one grey level. Measured: max |difference| 1; 8 of 331,776 values differ (6 of 27 images).
    a, b = png_bytes(reference), png_bytes(batch_one)
    assert a.keys() == b.keys()
    first = np.stack([np.asarray(Image.open(reference / name)) for name in a]).astype(int)
    second = np.stack([np.asarray(Image.open(batch_one / name)) for name in a]).astype(int)
    difference = np.abs(first - second)
    assert difference.max() <= 1
    assert (difference == 0).mean() >= 0.999


def test_killed_run_resumes_to_the_uninterrupted_result(tiny_stack, run_dir, batch_one, tmp_path):
    output_dir = tmp_path / "killed"
    argv = cli(tiny_stack, run_dir, output_dir, "--batch_size", "1")
    process = subprocess.Popen(
        [sys.executable, str(REPO / "generate_synthetic.py"), *argv], cwd=REPO, env=subprocess_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not list(output_dir.glob("*/gen_*.png")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.kill()
    process.wait()
    finished = {p: p.stat().st_mtime_ns for p in output_dir.glob("*/gen_*.png")}
    assert 0 < len(finished) < len(NCT_CLASSES) * N, "the run was not interrupted mid-way"
    (output_dir / "TUM" / ".gen_0002.png.12345.tmp").write_bytes(b"\x89PNG truncated")  # a write cut short

    generate(*argv)
    assert png_bytes(output_dir) == png_bytes(batch_one)
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in finished.items()), "finished images were redone"
    assert not leftovers(output_dir)
    assert len(manifest.read_manifest(output_dir)) == len(NCT_CLASSES) * N
    assert_imagefolder_matches_manifest(output_dir, tmp_path / "cache")


def test_classes_without_references_are_refused_or_generated_unconditionally_when_allowed(
    tiny_stack, run_dir, tmp_path, caplog, capsys
):
    data = tmp_path / "data"
    shutil.copytree(tiny_stack.data, data)
    shutil.rmtree(data / "MUC")  # missing, as a typo in --classes would be
    for path in (data / "NORM").iterdir():  # empty
        path.unlink()
    output_dir = tmp_path / "out"
    flags = cli(tiny_stack, run_dir, output_dir, "--reference_data_dir", str(data), "--classes", "ADI", "MUC", "NORM",
                "--num_images_per_class", "2")  # fmt: skip
    message = user_error(capsys, *flags)
    assert message.startswith("error: No reference tiles for ['MUC', 'NORM'] in --reference_data_dir")
    assert "classes with tiles: ['ADI', 'BACK', 'DEB', 'LYM', 'MUS', 'STR', 'TUM']" in message
    assert "--allow_unconditional" in message and message.count("\n") == 1
    assert not output_dir.exists()  # refused before the models load or anything is written
    generate(*flags, "--allow_unconditional")
    rows = {r["file"]: r for r in manifest.read_manifest(output_dir)}
    assert sorted(rows) == [f"{c}/gen_{i:04d}.png" for c in ("ADI", "MUC", "NORM") for i in range(2)]
    unconditional = {f for f, r in rows.items() if (r["conditioning"], r["reference"]) == ("unconditional", "none")}
    assert unconditional == {f"{c}/gen_{i:04d}.png" for c in ("MUC", "NORM") for i in range(2)}
    assert "MUC: no reference tiles" in caplog.text and "NORM: no reference tiles" in caplog.text
    assert json.loads((output_dir / manifest.GENERATION_CONFIG_FILE).read_text())["references"]["MUC"] is None


def test_merged_lora_generates_what_the_unmerged_lora_generates(tiny_stack, run_dir):
    stack = networks.load_pixcell_stack(str(tiny_stack.pixcell), str(tiny_stack.vae), str(tiny_stack.uni))
    model = run_directory.load_trained(run_dir, stack.transformer)
    files = work_list.class_files(tiny_stack.data, ["TUM", "LYM"])
    references = {
        n: work_list.choose_references(f, 2, seed=0, class_name=n, skip_bad_images=False) for n, f in files.items()
    }
    items = work_list.work_items(references, {"TUM": 2, "LYM": 2}, seed=0)
    settings = pipeline.SamplingSettings(2.0, 3, "dpm", 4)
    unmerged = pipeline.generate_batch(model, stack.uni, stack.vae, stack.scheduler_config, items, settings)
    merge_lora(stack.transformer)
    merged = pipeline.generate_batch(model, stack.uni, stack.vae, stack.scheduler_config, items, settings)
    difference = np.abs(unmerged.astype(int) - merged.astype(int))
    assert difference.max() <= 1 and (difference == 0).mean() >= 0.999
    base = networks.load_pixcell_stack(str(tiny_stack.pixcell), str(tiny_stack.vae), str(tiny_stack.uni))
    plain = pipeline.load_generation_model(base.transformer, None, "base")
    without = pipeline.generate_batch(plain, base.uni, base.vae, base.scheduler_config, items, settings)
    assert np.abs(without.astype(int) - merged.astype(int)).mean() > 1, "the LoRA/adapter must matter for this test"


def test_bf16_generation_keeps_a_small_lora_update_and_fp32_merges_it(tiny_stack, tmp_path):
    # PixCell-like magnitudes: a LoRA update of 0.35 % of the weights' RMS, mostly below one bf16 ulp of them.
    transformer = networks.load_transformer(str(tiny_stack.pixcell))
    model = AdaptedPixCell(transformer, UNIAdapter(AdapterConfig(embed_dim=transformer.config.caption_channels)))
    inject_lora(transformer, LoRAConfig(rank=4))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(transformer).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator))
            rms = layer.base_layer.weight.square().mean().sqrt()
            layer.lora_B.weight.mul_(0.0035 * rms / layer.delta_weight().square().mean().sqrt())
    run = tmp_path / "run"
    run_directory.save_trained(run, model, LoRAConfig(rank=4))
    name = "transformer_blocks.1.attn1.to_v"
    delta = lora_layers(transformer)[name].delta_weight()

    half = networks.load_transformer(str(tiny_stack.pixcell), dtype=torch.bfloat16)
    pipeline.load_generation_model(half, str(run), "tiny")
    layer = lora_layers(half)[name]
    assert not any(layer.merged for layer in lora_layers(half).values())
    x = torch.randn(4096, layer.base_layer.in_features, generator=generator).bfloat16()
    with torch.no_grad():  # the weight change the bf16 layer applies, fitted over many tokens
        applied = torch.linalg.lstsq(x.float(), (layer(x) - layer.base_layer(x)).float()).solution.T
    assert (applied - delta).norm() / delta.norm() < 0.2

    full = networks.load_transformer(str(tiny_stack.pixcell))
    base_weight = full.get_submodule(name).weight.clone()
    pipeline.load_generation_model(full, str(run), "tiny")
    assert all(layer.merged for layer in lora_layers(full).values())
    torch.testing.assert_close(lora_layers(full)[name].base_layer.weight, base_weight + delta, atol=1e-7, rtol=0)


def test_rerun_skips_and_keeps_the_manifest_and_more_images_extend_it(tiny_stack, run_dir, reference, tmp_path):
    output_dir = tmp_path / "copy"
    shutil.copytree(reference, output_dir)
    mtimes = {p: p.stat().st_mtime_ns for p in output_dir.glob("*/gen_*.png")}
    generate(*cli(tiny_stack, run_dir, output_dir, "--classes", "TUM"))
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    assert (output_dir / "manifest.csv").read_bytes() == (reference / "manifest.csv").read_bytes()
    generate(*cli(tiny_stack, run_dir, output_dir, "--classes", "TUM", "--num_images_per_class", str(N + 1)))
    rows = manifest.read_manifest(output_dir)
    assert len(rows) == len(NCT_CLASSES) * N + 1 and rows[-1]["file"] == f"TUM/gen_{N:04d}.png"
    assert png_bytes(output_dir).keys() - png_bytes(reference).keys() == {f"TUM/gen_{N:04d}.png"}
    assert_imagefolder_matches_manifest(output_dir, tmp_path / "cache")


def test_other_configuration_is_refused_and_overwrite_regenerates(tiny_stack, run_dir, reference, tmp_path):
    output_dir = tmp_path / "other"
    shutil.copytree(reference, output_dir)
    (output_dir / manifest.DATASET_CARD_FILE).write_text("metrics of the images about to be replaced")
    with pytest.raises(run_config.GenerationConfigError, match=r"(?s)seed: 0 -> 1.*guidance_scale.*--overwrite"):
        generate(*cli(tiny_stack, run_dir, output_dir, "--seed", "1", "--guidance_scale", "3"))
    other_run = make_run_dir(tiny_stack.pixcell, tmp_path / "other-run", seed=1)
    with pytest.raises(run_config.GenerationConfigError, match="lora_sha256"):
        generate(*cli(tiny_stack, run_dir, output_dir), "--lora_dir", str(other_run))  # the last --lora_dir wins
    assert png_bytes(output_dir) == png_bytes(reference)  # refused before touching anything

    generate(*cli(tiny_stack, run_dir, output_dir, "--seed", "1", "--classes", "ADI", "--num_images_per_class", "1",
                  "--overwrite"))  # fmt: skip
    assert sorted(png_bytes(output_dir)) == ["ADI/gen_0000.png"]
    assert png_bytes(output_dir)["ADI/gen_0000.png"] != png_bytes(reference)["ADI/gen_0000.png"]
    assert [r["file"] for r in manifest.read_manifest(output_dir)] == ["ADI/gen_0000.png"]
    assert not (output_dir / manifest.DATASET_CARD_FILE).exists()  # a card must not describe images it never saw


def test_images_without_a_config_are_refused_and_a_config_without_images_binds_nothing(
    tiny_stack, run_dir, reference, tmp_path
):
    output_dir = tmp_path / "notebook"
    (output_dir / "ADI").mkdir(parents=True)
    shutil.copy(reference / "ADI" / "gen_0000.png", output_dir / "ADI" / "gen_0000.png")
    with pytest.raises(run_config.GenerationConfigError, match="no generation_config.json"):
        generate(*cli(tiny_stack, run_dir, output_dir))
    stopped = tmp_path / "stopped-before-the-first-image"
    stopped.mkdir()
    shutil.copy(reference / manifest.GENERATION_CONFIG_FILE, stopped / manifest.GENERATION_CONFIG_FILE)
    generate(*cli(tiny_stack, run_dir, stopped, "--seed", "1", "--classes", "ADI", "--num_images_per_class", "1"))
    assert json.loads((stopped / manifest.GENERATION_CONFIG_FILE).read_text())["seed"] == 1


def test_unreadable_reference_tiles_fail_clearly_or_are_skipped(tiny_stack, tmp_path):
    folder = tmp_path / "ADI"
    shutil.copytree(tiny_stack.data / "ADI", folder)
    bad = folder / "ADI-broken.tif"
    bad.write_bytes(b"II*\x00 not a tiff")
    files = sorted(folder.iterdir())
    with pytest.raises(DataError, match="ADI-broken.tif.*--skip_bad_images"):
        work_list.choose_references(files, len(files), seed=0, class_name="ADI", skip_bad_images=False)
    chosen = work_list.choose_references(files, len(files), seed=0, class_name="ADI", skip_bad_images=True)
    assert bad not in chosen and sorted(chosen) == [f for f in files if f != bad]


def test_lora_dir_of_another_model_is_refused(tiny_stack, run_dir, tmp_path):
    other = networks.PixCellTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, num_layers=2, cross_attention_dim=32, sample_size=8,
        caption_channels=32, interpolation_scale=0.5,
    )  # fmt: skip
    other.save_pretrained(tmp_path / "other" / "transformer")
    run = make_run_dir(tmp_path / "other", tmp_path / "run")
    with pytest.raises(LoRAMismatchError, match=r"(?s)does not fit the model.*missing keys \(24\)"):
        pipeline.load_generation_model(networks.load_transformer(str(tiny_stack.pixcell)), str(run), "tiny")
    wide = tmp_path / "wide-adapter"
    shutil.copytree(run_dir, wide)
    save_adapter(UNIAdapter(AdapterConfig(embed_dim=48, hidden_dim=8)), wide / "adapter.safetensors")
    with pytest.raises(LoRAMismatchError, match="48-d UNI embeddings but the transformer expects 32"):
        pipeline.load_generation_model(networks.load_transformer(str(tiny_stack.pixcell)), str(wide), "tiny")


def user_error(capsys, *argv: str) -> str:
    """What the script prints for a user error: run_main exits with status 2 and the message, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run_main(lambda: generate_synthetic.parse_args(list(argv)), generate_synthetic.main)
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_missing_lora_dir_is_a_sentence_naming_the_flag(tiny_stack, tmp_path, capsys):
    missing = tmp_path / "no-such-run"
    message = user_error(capsys, *cli(tiny_stack, missing, tmp_path / "out"))
    assert message.startswith("error: --lora_dir") and f"'{missing}' does not exist" in message
    assert "--output_dir of a train_adapter_lora.py run" in message
    assert not (tmp_path / "out").exists()
    weights_file = tmp_path / "pytorch_lora_weights.safetensors"  # the file instead of its folder
    weights_file.write_bytes(b"")
    message = user_error(capsys, *cli(tiny_stack, weights_file, tmp_path / "out"))
    assert f"--lora_dir '{weights_file}' is a file, not a folder" in message


@pytest.mark.parametrize("name", [run_directory.LORA_FILE, "adapter.safetensors"])
def test_truncated_weights_file_is_named_as_damaged_not_as_another_model(tiny_stack, run_dir, tmp_path, name, capsys):
    damaged_run = tmp_path / "run"
    shutil.copytree(run_dir, damaged_run)
    data = (damaged_run / name).read_bytes()
    (damaged_run / name).write_bytes(data[: len(data) // 2])  # a copy cut short
    message = user_error(capsys, *cli(tiny_stack, damaged_run, tmp_path / "out"))
    assert message.startswith(f"error: '{damaged_run / name}' is damaged or incomplete")
    assert "copy it again" in message and "--pretrained_model_name_or_path" not in message
    # The library path (no early check) says the same, not "pass the model the run was trained on".
    with pytest.raises(DamagedFileError) as error:
        pipeline.load_generation_model(networks.load_transformer(str(tiny_stack.pixcell)), str(damaged_run), "tiny")
    assert name in str(error.value) and "--pretrained_model_name_or_path" not in str(error.value)


def test_work_list_reuses_references_cyclically_and_lists_unfinished_images(tmp_path):
    references = {"A": [Path("a0"), Path("a1")], "B": []}
    items = work_list.work_items(references, {"A": 5, "B": 2}, seed=0)
    assert [i.reference for i in items[:5]] == [Path(p) for p in ("a0", "a1", "a0", "a1", "a0")]
    assert [i.reference for i in items[5:]] == [None, None]
    assert len({i.seed for i in items}) == len(items)
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / "gen_0003.png").touch()
    assert [(i.class_name, i.index) for i in work_list.unfinished(items, tmp_path)] == [
        ("A", 0), ("A", 1), ("A", 2), ("A", 4), ("B", 0), ("B", 1)
    ]  # fmt: skip
