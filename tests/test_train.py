"""The training script run for real, as users run it: through `accelerate launch`, on the tiny stack."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from PIL import Image
from safetensors.torch import load_file

from conftest import REPO, launch_command
from pixcell_ext.data import DataError, scan_image_folder, tile_digests
from pixcell_ext.stacks.tiny import write_tiny_dataset
from pixcell_ext.training import feature_cache


def train_args(stack, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--preset", "tiny",
        "--tiny_dir", str(stack.pixcell.parent),
        "--output_dir", str(output_dir),
        "--dataloader_num_workers", "0",
        "--validation_steps", "1000",
        "--report_to", "tensorboard",
        *extra,
    ]  # fmt: skip


def run_training(stack, output_dir: Path, *extra: str, num_processes: int = 1, env: dict | None = None):
    command = launch_command(num_processes, "train_adapter_lora.py", *train_args(stack, output_dir, *extra))
    environment = {**os.environ, "ACCELERATE_USE_CPU": "true", **(env or {})}
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def trained_weights(directory: Path) -> dict[str, torch.Tensor]:
    weights = {f"adapter.{k}": v for k, v in load_file(directory / "adapter.safetensors").items()}
    weights.update(load_file(directory / "pytorch_lora_weights.safetensors"))
    return weights


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, wb = trained_weights(a), trained_weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst <= atol, f"largest difference {worst:g}"
    moved = max((wa[k]).abs().max().item() for k in wa if "lora_B" in k)
    assert moved > 0, "LoRA B never moved: the comparison would be vacuous"


def logged_losses(output_dir: Path, tag: str = "loss") -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted((output_dir / "logs").rglob("events.out.tfevents*"))
    values = {}
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values.update({e.step: e.value for e in accumulator.Scalars(tag)})
    return [values[k] for k in sorted(values)]


@pytest.fixture(scope="module")
def reference_run(tiny_stack, tmp_path_factory):
    """Batch 4, 8 updates, a checkpoint every 4 (step 4 lies in the middle of the first epoch of 9 batches)."""
    output_dir = tmp_path_factory.mktemp("reference")
    run_training(tiny_stack, output_dir, "--max_train_steps", "8", "--checkpointing_steps", "4")
    return output_dir


def test_tiny_run_writes_everything_a_real_run_writes(reference_run):
    for name in ("adapter.safetensors", "pytorch_lora_weights.safetensors", "training_config.json", "README.md"):
        assert (reference_run / name).is_file(), name
    assert (reference_run / "checkpoint-4" / "training_state.json").is_file()
    assert (reference_run / "checkpoint-8" / "optimizer.bin").is_file()
    assert not list(reference_run.glob(".checkpoint-*"))
    panel = Image.open(reference_run / "validation" / "step-000008.png")
    assert panel.width > 9 * 64 and panel.height > 2 * 64
    assert len(logged_losses(reference_run)) == 8


def test_a_fixed_small_batch_is_overfitted(tiny_stack, tmp_path):
    data = write_tiny_dataset(tmp_path / "four", images_per_class=4, size=64)
    for folder in data.iterdir():
        if folder.name != "TUM":
            shutil.rmtree(folder)
    output_dir = tmp_path / "overfit"
    run_training(
        tiny_stack, output_dir, "--train_data_dir", str(data), "--max_train_steps", "60", "--learning_rate", "3e-3",
        "--lora_rank", "8", "--cond_dropout", "0", "--checkpointing_steps", "1000",
    )  # fmt: skip
    losses = logged_losses(output_dir)
    assert len(losses) == 60
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    assert last < 0.8 * first, (first, last)


def test_two_processes_train_identical_replicas_equal_to_one_process(tiny_stack, tmp_path, reference_run):
    output_dir = tmp_path / "ddp"
    result = run_training(
        tiny_stack, output_dir, "--max_train_steps", "8", "--checkpointing_steps", "4", "--train_batch_size", "2",
        num_processes=2,
    )  # fmt: skip
    assert "bit-identical on all 2 process(es)" in result.stderr
    assert "2 process(es), 2 per process x 1 accumulation = 4 tiles per update" in result.stderr
    # Two processes of 2 see exactly the tiles and noise of one process of 4.
    assert_same_weights(output_dir, reference_run, atol=1e-5)


def test_resume_mid_epoch_gives_the_straight_run(tiny_stack, tmp_path, reference_run):
    output_dir = tmp_path / "resumed"
    run_training(tiny_stack, output_dir, "--max_train_steps", "4", "--checkpointing_steps", "4")
    shutil.copytree(output_dir / "checkpoint-4", tmp_path / "checkpoint-4-copy")
    run_training(
        tiny_stack, output_dir, "--max_train_steps", "8", "--checkpointing_steps", "4",
        "--resume_from_checkpoint", "latest",
    )  # fmt: skip
    assert_same_weights(output_dir, reference_run, atol=1e-6)
    assert logged_losses(output_dir)[-4:] == pytest.approx(logged_losses(reference_run)[-4:], abs=1e-6)


@pytest.fixture(scope="module")
def two_epoch_run(tiny_stack, tmp_path_factory):
    """12 updates of 4 tiles over epochs of 9 batches; checkpoint-10 lies in the second epoch (its batch 1)."""
    output_dir = tmp_path_factory.mktemp("two-epochs")
    run_training(tiny_stack, output_dir, "--max_train_steps", "12", "--checkpointing_steps", "10")
    return output_dir


def resume_from_copy(stack, finished: Path, step: int, output_dir: Path, *flags: str, num_processes: int = 1):
    """Resume in a new folder from a copy of `finished`'s checkpoint-`step`, as a run stopped there would."""
    output_dir.mkdir()
    shutil.copytree(finished / f"checkpoint-{step}", output_dir / f"checkpoint-{step}")
    return run_training(stack, output_dir, *flags, "--resume_from_checkpoint", "latest", num_processes=num_processes)


def test_resume_in_a_later_epoch_gives_the_straight_run(tiny_stack, tmp_path, two_epoch_run):
    output_dir = tmp_path / "resumed"
    result = resume_from_copy(
        tiny_stack, two_epoch_run, 10, output_dir, "--max_train_steps", "12", "--checkpointing_steps", "10"
    )
    assert "step 10, epoch 1" in result.stderr
    assert_same_weights(output_dir, two_epoch_run, atol=1e-6)
    assert logged_losses(output_dir) == pytest.approx(logged_losses(two_epoch_run)[-2:], abs=1e-6)


def test_resume_across_an_epoch_boundary_with_accumulation_on_two_processes(tiny_stack, tmp_path):
    """2 processes x 2 tiles x 2 micro-batches: 9 micro-batches per process and epoch, so 5 updates per epoch (the
    last one of a single micro-batch); stopped at update 4, the resumed run finishes epoch 0 and goes into epoch 1."""
    flags = ("--max_train_steps", "7", "--checkpointing_steps", "4", "--train_batch_size", "2",
             "--gradient_accumulation_steps", "2")  # fmt: skip
    straight = tmp_path / "straight"
    run_training(tiny_stack, straight, *flags, num_processes=2)
    resumed = tmp_path / "resumed"
    result = resume_from_copy(tiny_stack, straight, 4, resumed, *flags, num_processes=2)
    assert "step 4, epoch 0" in result.stderr
    assert_same_weights(resumed, straight, atol=1e-6)
    assert logged_losses(resumed) == pytest.approx(logged_losses(straight)[-3:], abs=1e-6)


def run_failing(stack, output_dir: Path, *extra: str) -> str:
    command = launch_command(1, "train_adapter_lora.py", *train_args(stack, output_dir, *extra))
    environment = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Loaded PixCell" not in result.stderr  # refused before any model loads
    assert 'train_adapter_lora.py", line' not in result.stderr  # a sentence, not a stack (the launcher adds its own)
    return result.stderr


def test_resubmitting_a_finished_run_trains_nothing(tiny_stack, tmp_path, two_epoch_run):
    output_dir = tmp_path / "finished"
    shutil.copytree(two_epoch_run, output_dir)
    before = {p.name: p.read_bytes() for p in output_dir.glob("*.safetensors")}
    result = run_training(
        tiny_stack, output_dir, "--max_train_steps", "12", "--checkpointing_steps", "10",
        "--resume_from_checkpoint", "latest",
    )  # fmt: skip
    assert "is complete: checkpoint-12 holds 12 of 12 updates" in result.stderr
    assert "Loaded PixCell" not in result.stderr
    assert {p.name: p.read_bytes() for p in output_dir.glob("*.safetensors")} == before
    assert json.loads((output_dir / "training_config.json").read_text())["trained_steps"] == 12
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-12"]
    assert len(logged_losses(output_dir)) == 12


def test_a_run_killed_after_its_final_checkpoint_writes_its_outputs(tiny_stack, tmp_path, two_epoch_run):
    output_dir = tmp_path / "killed-at-the-end"
    shutil.copytree(two_epoch_run, output_dir)
    for name in ("adapter.safetensors", "pytorch_lora_weights.safetensors", "training_config.json", "README.md"):
        (output_dir / name).unlink()
    result = run_training(
        tiny_stack, output_dir, "--max_train_steps", "12", "--checkpointing_steps", "10",
        "--resume_from_checkpoint", "latest",
    )  # fmt: skip
    assert "wrote adapter.safetensors, pytorch_lora_weights.safetensors" in result.stderr
    assert_same_weights(output_dir, two_epoch_run, atol=0)
    config = json.loads((output_dir / "training_config.json").read_text())
    assert config["trained_steps"] == 12 and config == json.loads((two_epoch_run / "training_config.json").read_text())
    assert "12 optimiser updates" in (output_dir / "README.md").read_text()


def test_a_new_run_into_a_used_folder_is_refused_unless_overwritten(tiny_stack, tmp_path, two_epoch_run):
    output_dir = tmp_path / "used"
    shutil.copytree(two_epoch_run, output_dir)
    (output_dir / "notes.txt").write_text("mine")
    message = run_failing(tiny_stack, output_dir, "--max_train_steps", "1")
    assert "already holds another run" in message
    assert "--resume_from_checkpoint latest" in message and "--overwrite" in message
    assert (output_dir / "checkpoint-12").is_dir()

    run_training(tiny_stack, output_dir, "--max_train_steps", "1", "--checkpointing_steps", "1", "--overwrite")
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-1"]
    assert json.loads((output_dir / "training_config.json").read_text())["trained_steps"] == 1
    assert len(logged_losses(output_dir)) == 1  # the old run's logs went with it
    assert (output_dir / "notes.txt").read_text() == "mine"  # not something a run writes: kept


def test_resuming_with_another_adapter_width_names_the_flag(tiny_stack, tmp_path, two_epoch_run):
    output_dir = tmp_path / "reshaped"
    output_dir.mkdir()
    shutil.copytree(two_epoch_run / "checkpoint-10", output_dir / "checkpoint-10")
    message = run_failing(
        tiny_stack, output_dir, "--max_train_steps", "12", "--adapter_hidden_dim", "32",
        "--resume_from_checkpoint", "latest",
    )  # fmt: skip
    assert "checkpoint-10" in message
    assert "trained with --adapter_hidden_dim 64, but this run asks for --adapter_hidden_dim 32" in message


def test_an_unwritable_output_folder_is_named_before_models_load(tiny_stack, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    message = run_failing(tiny_stack, blocker / "run")
    assert f"Cannot write to --output_dir '{blocker / 'run'}'" in message


def test_gradient_accumulation_matches_the_bigger_batch(tiny_stack, tmp_path, reference_run):
    output_dir = tmp_path / "accumulated"
    run_training(
        tiny_stack, output_dir, "--max_train_steps", "8", "--checkpointing_steps", "100", "--train_batch_size", "2",
        "--gradient_accumulation_steps", "2",
    )  # fmt: skip
    assert_same_weights(output_dir, reference_run, atol=1e-5)


def test_feature_cache_trains_like_on_the_fly(tiny_stack, tmp_path, reference_run):
    output_dir = tmp_path / "cached"
    result = run_training(
        tiny_stack, output_dir, "--max_train_steps", "8", "--checkpointing_steps", "100",
        "--feature_cache", str(tmp_path / "cache"),
    )  # fmt: skip
    assert "UNI2-h from" not in result.stderr  # never loaded for training
    assert logged_losses(output_dir) == pytest.approx(logged_losses(reference_run), rel=1e-4)
    assert_same_weights(output_dir, reference_run, atol=1e-4)


def test_changing_one_image_invalidates_exactly_its_cache_entry(tiny_stack, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_stack.data, data)
    accelerator = Accelerator(cpu=True)
    loads = []

    def load_encoders():
        from pixcell_ext.model.networks import load_uni, load_vae

        loads.append(1)
        return load_vae(str(tiny_stack.vae)), load_uni(str(tiny_stack.uni))

    def build(index, cache):
        return feature_cache.build_feature_cache(
            accelerator, index, tile_digests(index), cache, vae_identity="vae", uni_identity="uni", resolution=64,
            load_encoders=load_encoders, batch_size=8,
        )  # fmt: skip

    cache = feature_cache.FeatureCache(tmp_path / "cache")
    first = build(scan_image_folder(data), cache)
    assert len(cache.rows) == len(first) == 36 and len(loads) == 1
    assert build(scan_image_folder(data), feature_cache.FeatureCache(tmp_path / "cache")) == first
    assert len(loads) == 1  # nothing missing, encoders never loaded

    edited = sorted((data / "STR").iterdir())[1]
    Image.open(edited).convert("RGB").rotate(90).save(edited)
    cache = feature_cache.FeatureCache(tmp_path / "cache")
    second = build(scan_image_folder(data), cache)
    assert [i for i, (a, b) in enumerate(zip(first, second, strict=True)) if a != b] == [
        [r.path for r in scan_image_folder(data).records].index(edited)
    ]
    assert len(cache.rows) == 37 and len(loads) == 2
    key = feature_cache.entry_keys(["same-bytes"], "vae", "uni", 64, torch.float32)
    assert feature_cache.entry_keys(["same-bytes"], "vae", "another-uni", 64, torch.float32) != key
    assert feature_cache.entry_keys(["same-bytes"], "vae", "uni", 64, torch.bfloat16) != key  # bf16 features not reused


def test_features_encoded_in_bf16_are_not_reused_by_an_fp32_run(tiny_stack, tmp_path):
    accelerator = Accelerator(cpu=True)
    index = scan_image_folder(tiny_stack.data)
    loaded = []

    def build(dtype):
        def load_encoders():
            from pixcell_ext.model.networks import load_uni, load_vae

            loaded.append(dtype)
            return load_vae(str(tiny_stack.vae), dtype=dtype), load_uni(str(tiny_stack.uni), dtype=dtype)

        return feature_cache.build_feature_cache(
            accelerator, index, tile_digests(index), feature_cache.FeatureCache(tmp_path / "cache"), vae_identity="vae",
            uni_identity="uni",
            resolution=64, load_encoders=load_encoders, batch_size=12, dtype=dtype,
        )  # fmt: skip

    bf16 = build(torch.bfloat16)
    fp32 = build(torch.float32)
    assert loaded == [torch.bfloat16, torch.float32]  # the fp32 run encoded its own features
    assert not set(bf16) & set(fp32)
    assert build(torch.bfloat16) == bf16 and len(loaded) == 2  # and each precision finds its own again


def test_killed_run_resumes_from_the_last_complete_checkpoint(tiny_stack, tmp_path, reference_run):
    output_dir = tmp_path / "killed"
    command = launch_command(
        1, "train_adapter_lora.py",
        *train_args(tiny_stack, output_dir, "--max_train_steps", "8", "--checkpointing_steps", "2"),
    )  # fmt: skip
    process = subprocess.Popen(
        command, cwd=REPO, env={**os.environ, "ACCELERATE_USE_CPU": "true"}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 240
    while not (output_dir / "checkpoint-2").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    complete = sorted(output_dir.glob("checkpoint-*"))
    assert complete, "killed before the first checkpoint"
    # What a kill during a save leaves behind: a partial folder that must never be taken for a checkpoint.
    partial = output_dir / ".checkpoint-6.partial"
    partial.mkdir(exist_ok=True)
    (partial / "adapter.safetensors").write_bytes(b"truncated")
    run_training(
        tiny_stack, output_dir, "--max_train_steps", "8", "--checkpointing_steps", "2",
        "--resume_from_checkpoint", "latest",
    )  # fmt: skip
    assert_same_weights(output_dir, reference_run, atol=1e-6)


def test_bad_data_fails_before_models_load(tiny_stack, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_stack.data, data)
    (data / "DEB" / "DEB-corrupt.tif").write_bytes(b"\x00" * 100)
    command = launch_command(
        1, "train_adapter_lora.py", *train_args(tiny_stack, tmp_path / "o", "--train_data_dir", str(data))
    )
    result = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "ACCELERATE_USE_CPU": "true"}
    )
    assert result.returncode != 0
    assert "DEB-corrupt.tif" in result.stderr and "--skip_bad_images" in result.stderr
    assert "Loaded PixCell" not in result.stderr
    with pytest.raises(DataError, match="does not exist"):
        scan_image_folder(tmp_path / "missing")


def test_processes_that_form_no_group_are_stopped(tiny_stack, tmp_path):
    command = launch_command(2, "train_adapter_lora.py", *train_args(tiny_stack, tmp_path / "o"))
    environment = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert "every process would train on its own" in result.stderr


def poison_cache(cache_dir: Path, how_many: int | None) -> None:
    """Put NaN into the cached latents of `how_many` tiles (all when None), as a corrupt cache or a bad tile would."""
    from safetensors.torch import save_file

    for shard in sorted(cache_dir.glob("shard-*.safetensors")):
        from safetensors import safe_open

        with safe_open(str(shard), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        rows = slice(None) if how_many is None else slice(0, how_many)
        tensors["latent_mean"][rows] = float("nan")
        save_file(tensors, shard, metadata=metadata)


def test_non_finite_losses_are_skipped_counted_and_stop_the_run(tiny_stack, tmp_path):
    cache = tmp_path / "cache"
    run_training(tiny_stack, tmp_path / "build", "--max_train_steps", "1", "--feature_cache", str(cache))
    poison_cache(cache, how_many=1)
    output_dir = tmp_path / "one-bad-tile"
    run_training(tiny_stack, output_dir, "--max_train_steps", "9", "--feature_cache", str(cache))
    skipped = logged_losses(output_dir, "skipped_steps")
    assert skipped[-1] == 1  # the one batch holding the bad tile, once per epoch of 9 batches
    assert all(torch.isfinite(w).all() for w in trained_weights(output_dir).values())
    # On 2 processes the bad tile is on one of them; both must skip that update, or the replicas would drift apart.
    result = run_training(
        tiny_stack, tmp_path / "two-processes", "--max_train_steps", "9", "--feature_cache", str(cache),
        "--train_batch_size", "2", num_processes=2,
    )  # fmt: skip
    assert logged_losses(tmp_path / "two-processes", "skipped_steps")[-1] == 1
    assert "bit-identical on all 2 process(es)" in result.stderr

    poison_cache(cache, how_many=None)
    command = launch_command(
        1, "train_adapter_lora.py",
        *train_args(tiny_stack, tmp_path / "all-bad", "--max_train_steps", "9", "--feature_cache", str(cache),
                    "--max_bad_steps", "3"),
    )  # fmt: skip
    environment = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "not finite for 3 updates in a row" in result.stderr and "--learning_rate" in result.stderr


def test_augmentation_balance_snr_and_checkpointing_flags_train(tiny_stack, tmp_path):
    output_dir = tmp_path / "flags"
    run_training(
        tiny_stack, output_dir, "--max_train_steps", "3", "--augment", "--class_balanced", "--snr_gamma", "5",
        "--gradient_checkpointing", "--gradient_accumulation_steps", "2", "--train_batch_size", "2",
    )  # fmt: skip
    losses = logged_losses(output_dir)
    assert len(losses) == 3 and all(np.isfinite(losses))
    config = json.loads((output_dir / "training_config.json").read_text())
    assert config["augment"] and config["class_balanced"] and config["snr_gamma"] == 5
