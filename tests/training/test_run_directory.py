"""What the training script does with its output folder when it is not writable or fills up (in process: a full disk
cannot be made on demand)."""

import errno
from pathlib import Path

import pytest
from accelerate import Accelerator

from pixcell_ext.training import checkpoints, run_directory


def test_a_read_only_folder_is_named(tmp_path, monkeypatch):
    def refuse(self, data):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "write_bytes", refuse)
    with pytest.raises(
        run_directory.RunDirectoryError, match="Cannot write to --output_dir .*run.*Read-only file system"
    ):
        run_directory.check_writable(tmp_path / "run")


def test_a_full_disk_during_a_checkpoint_is_explained_and_the_last_one_kept(tmp_path, monkeypatch):
    accelerator = Accelerator(cpu=True)
    output_dir = tmp_path / "run"
    (output_dir / "checkpoint-4").mkdir(parents=True)
    (output_dir / "checkpoint-4" / checkpoints.STATE_FILE).write_text("{}")

    def fill_the_disk(directory):
        Path(directory).mkdir(parents=True)
        (Path(directory) / "optimizer.bin").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(accelerator, "save_state", fill_the_disk)
    progress = checkpoints.TrainingProgress(global_step=8)
    with pytest.raises(run_directory.RunDirectoryError) as caught:
        checkpoints.save_checkpoint(accelerator, output_dir, progress, None, {})
    message = str(caught.value)
    assert f"The disk holding --output_dir '{output_dir}' is full: checkpoint-8 could not be written" in message
    assert "The last complete checkpoint, checkpoint-4, is intact" in message and "--resume_from_checkpoint" in message
    assert sorted(p.name for p in output_dir.iterdir()) == ["checkpoint-4"]  # the partial save was removed


def test_other_save_errors_are_not_called_a_full_disk(tmp_path):
    with pytest.raises(PermissionError), run_directory.disk_full_explained(tmp_path, "x"):
        raise PermissionError(errno.EACCES, "Permission denied")


def test_overwrite_deletes_only_what_a_run_writes(tmp_path):
    run = tmp_path / "run"
    for name in ("checkpoint-3", ".checkpoint-4.partial", "validation", "logs", "hub_dataset", "checkpoint-notes"):
        (run / name).mkdir(parents=True)
    for name in ("adapter.safetensors", "pytorch_lora_weights.safetensors", "training_config.json", "README.md", "x"):
        (run / name).write_text("")
    with pytest.raises(run_directory.RunDirectoryError, match="--resume_from_checkpoint latest"):
        run_directory.claim_output_dir(run, resuming=False, overwrite=False, logging_dir="logs", is_main=True)
    run_directory.claim_output_dir(run, resuming=True, overwrite=False, logging_dir="logs", is_main=True)
    assert len(list(run.iterdir())) == 11  # resuming touches nothing
    run_directory.claim_output_dir(run, resuming=False, overwrite=True, logging_dir="logs", is_main=True)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-notes", "hub_dataset", "x"]


def test_resuming_from_a_checkpoint_with_a_damaged_adapter_names_the_file(tmp_path, tiny_stack):
    """Resume restores the adapter with `load_trained_into`: a truncated file must be named, not a safetensors trace."""
    from pixcell_ext.model import networks
    from pixcell_ext.model.adapter import ADAPTER_FILE, AdapterConfig
    from pixcell_ext.model.lora import LoRAConfig
    from pixcell_ext.model.lora_files import DamagedFileError
    from pixcell_ext.training import loop

    transformer = networks.load_transformer(str(tiny_stack.pixcell))
    adapter_config = AdapterConfig(transformer.config.caption_channels, 1, 16)
    lora_config = LoRAConfig(rank=2, alpha=2, target_modules=("attn1.to_q",))
    model = loop.build_adapted_model(transformer, lora_config, adapter_config)
    run_directory.save_trained(tmp_path, model, lora_config)
    adapter_file = tmp_path / ADAPTER_FILE
    adapter_file.write_bytes(adapter_file.read_bytes()[:-40])
    with pytest.raises(DamagedFileError, match=f"'{adapter_file}' is damaged or incomplete"):
        run_directory.load_trained_into(model, tmp_path)
