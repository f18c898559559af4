"""A full disk anywhere (TensorBoard logs, checkpoint, final weights, generated images, evaluation report) stops the
script with one sentence naming the folder (and for training the last complete checkpoint), leaves nothing a rerun
takes for complete, and the rerun recovers exactly. One test fills a real tmpfs where the machine lets us mount one;
the others inject the error into the writers."""

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors import SafetensorError

from conftest import REPO, launch_command
from pixcell_ext import files
from pixcell_ext.console import run_main
from pixcell_ext.evaluation import pipeline
from pixcell_ext.training import checkpoints, run_directory

sys.path.insert(0, str(REPO))
import evaluate_synthetic  # noqa: E402
import generate_synthetic  # noqa: E402
import train_adapter_lora  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def sentence(capsys, script, argv: list[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run_main(lambda: script.parse_args(argv), script.main)
    assert exited.value.code == 2
    return capsys.readouterr().err


def train_argv(stack, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--preset", "tiny", "--tiny_dir", str(stack.pixcell.parent), "--output_dir", str(output_dir),
        "--dataloader_num_workers", "0", "--max_train_steps", "6", "--checkpointing_steps", "3",
        "--validation_steps", "100", *extra,
    ]  # fmt: skip


def same_weights(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    for name in ("adapter.safetensors", run_directory.LORA_FILE):
        wa, wb = load_file(a / name), load_file(b / name)
        if wa.keys() != wb.keys() or any(not torch.equal(wa[k], wb[k]) for k in wa):
            return False
    return True


@pytest.fixture(scope="module")
def straight_run(tiny_stack, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("straight")
    train_adapter_lora.main(train_adapter_lora.parse_args(train_argv(tiny_stack, output_dir)))
    return output_dir


def test_a_full_disk_under_the_tensorboard_writer_names_the_last_checkpoint_and_the_rerun_recovers(
    tiny_stack, straight_run, tmp_path, monkeypatch, capsys
):
    real_log, calls = Accelerator.log, []

    def log_until_full(self, values, step=None, **kwargs):
        calls.append(step)
        if step == 5:
            enospc()
        return real_log(self, values, step=step, **kwargs)

    monkeypatch.setattr(Accelerator, "log", log_until_full)
    output_dir = tmp_path / "run"
    err = sentence(capsys, train_adapter_lora, train_argv(tiny_stack, output_dir))
    assert (
        f"error: The disk holding --output_dir '{output_dir}' is full: the TensorBoard logs could not be written. "
        "The last complete checkpoint, checkpoint-3, is intact" in err
    )
    assert "Traceback" not in err
    monkeypatch.setattr(Accelerator, "log", real_log)
    train_adapter_lora.main(
        train_adapter_lora.parse_args(train_argv(tiny_stack, output_dir, "--resume_from_checkpoint", "latest"))
    )
    assert same_weights(output_dir, straight_run)


def test_a_full_disk_during_the_final_weights_leaves_them_absent_and_the_rerun_writes_them(
    tiny_stack, straight_run, tmp_path, monkeypatch, capsys
):
    output_dir, real_save = tmp_path / "run", run_directory.save_trained

    def save_until_the_final_weights(directory, model, lora_config):
        if Path(directory) == output_dir:  # checkpoints are saved into their own folders
            enospc()
        real_save(directory, model, lora_config)

    monkeypatch.setattr(run_directory, "save_trained", save_until_the_final_weights)
    err = sentence(capsys, train_adapter_lora, train_argv(tiny_stack, output_dir))
    assert "is full: the final weights could not be written. The last complete checkpoint, checkpoint-6" in err
    assert not (output_dir / "adapter.safetensors").exists()
    monkeypatch.undo()
    train_adapter_lora.main(
        train_adapter_lora.parse_args(train_argv(tiny_stack, output_dir, "--resume_from_checkpoint", "latest"))
    )
    assert same_weights(output_dir, straight_run)


def test_safetensors_reports_a_full_disk_as_one_and_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    """safetensors raises its own SafetensorError for ENOSPC; the checkpoint save then must say "disk full", remove
    its `.checkpoint-N.partial` and keep the last complete checkpoint."""
    import safetensors.torch

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError) as caught:
        files.save_safetensors_atomically({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    assert caught.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []

    accelerator = Accelerator(cpu=True)
    output_dir = tmp_path / "run"
    (output_dir / "checkpoint-4").mkdir(parents=True)

    def save_state(directory):
        Path(directory).mkdir(parents=True)
        files.save_safetensors_atomically({"w": torch.zeros(2)}, Path(directory) / "adapter.safetensors")

    monkeypatch.setattr(accelerator, "save_state", save_state)
    with pytest.raises(run_directory.RunDirectoryError, match="checkpoint-8 could not be written. The last complete"):
        checkpoints.save_checkpoint(accelerator, output_dir, checkpoints.TrainingProgress(global_step=8), None, {})
    assert sorted(p.name for p in output_dir.iterdir()) == ["checkpoint-4"]


def test_a_write_error_on_a_nearly_full_disk_is_called_a_full_disk(tmp_path, monkeypatch):
    """torch.save (accelerate's optimiser state) reports a full disk as 'unexpected pos': judged by the free space."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(100, 100, 0))
    with pytest.raises(run_directory.RunDirectoryError, match="is full: x could not be written"):
        with run_directory.disk_full_explained(tmp_path, "x"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


def test_a_full_disk_during_generation_keeps_the_finished_images_and_the_rerun_completes(
    tiny_stack, tmp_path, monkeypatch, capsys
):
    argv = ["--preset", "tiny", "--tiny_dir", str(tiny_stack.pixcell.parent), "--classes", "ADI", "TUM",
            "--num_images_per_class", "4", "--num_inference_steps", "2", "--batch_size", "2"]  # fmt: skip
    straight = tmp_path / "straight"
    generate_synthetic.main(generate_synthetic.parse_args([*argv, "--output_dir", str(straight)]))
    real_write, written = files.write_png_atomically, []

    def write_until_full(path, image):
        if len(written) == 3:
            enospc()
        real_write(path, image)
        written.append(path)

    monkeypatch.setattr(files, "write_png_atomically", write_until_full)
    output_dir = tmp_path / "out"
    err = sentence(capsys, generate_synthetic, [*argv, "--output_dir", str(output_dir)])
    assert f"error: The disk holding --output_dir '{output_dir}' is full: the ADI images could not be written." in err
    assert "Free some space and run the same command again: it keeps what is complete." in err
    assert not [p for p in output_dir.rglob("*") if ".tmp" in p.name]
    monkeypatch.undo()
    generate_synthetic.main(generate_synthetic.parse_args([*argv, "--output_dir", str(output_dir)]))
    pngs = sorted(p.relative_to(straight) for p in straight.glob("*/*.png"))
    assert len(pngs) == 8 and all((output_dir / p).read_bytes() == (straight / p).read_bytes() for p in pngs)


def test_a_full_disk_during_the_evaluation_report_is_one_sentence(tiny_stack, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pipeline, "write_report", enospc)
    output_dir = tmp_path / "evaluation"
    argv = ["--preset", "tiny", "--tiny_dir", str(tiny_stack.pixcell.parent), "--output_dir", str(output_dir),
            "--extractors", "timm"]  # fmt: skip
    err = sentence(capsys, evaluate_synthetic, argv)
    assert f"The disk holding --output_dir '{output_dir}' is full: the report, plots and dataset cards" in err
    assert not (output_dir / "metrics.json").exists()


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
    return subprocess.run(command, capture_output=True).returncode == 0


def test_a_real_full_disk_stops_training_in_one_sentence_and_the_rerun_recovers_exactly(tiny_stack, tmp_path):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "400k"):
        pytest.skip("cannot mount a small tmpfs here (needs root); the fault-injection tests above cover the writers")
    try:
        argv = ["--preset", "tiny", "--tiny_dir", str(tiny_stack.pixcell.parent), "--output_dir", str(disk / "run"),
                "--dataloader_num_workers", "0"]  # fmt: skip
        command = launch_command(1, "train_adapter_lora.py", *argv)
        environment = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
        full = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300)
        assert full.returncode != 0
        assert f"error: The disk holding --output_dir '{disk / 'run'}' is full" in full.stderr
        assert "The last complete checkpoint, checkpoint-10, is intact" in full.stderr
        assert "Traceback" not in full.stderr
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        rerun = subprocess.run(
            [*command, "--resume_from_checkpoint", "latest"], cwd=REPO, env=environment, capture_output=True,
            text=True, timeout=300,
        )  # fmt: skip
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        straight = tmp_path / "straight"
        command[command.index(str(disk / "run"))] = str(straight)
        subprocess.run(command, cwd=REPO, env=environment, capture_output=True, timeout=300, check=True)
        assert same_weights(disk / "run", straight)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
