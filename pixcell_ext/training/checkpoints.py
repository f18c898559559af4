"""Checkpoints that are either complete or absent, and resuming from the exact batch where a run stopped.

`accelerator.save_state` writes into `.checkpoint-N.partial`; only when every process has finished does the main
process rename it to `checkpoint-N`. A run killed during a save therefore leaves a `.partial` folder that is never
mistaken for a checkpoint, and `--resume_from_checkpoint latest` takes the last complete one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate import Accelerator

from pixcell_ext.files import replace_folder, write_bytes_atomically, write_json_atomically
from pixcell_ext.model.adapter import ADAPTER_FILE
from pixcell_ext.training import run_directory
from pixcell_ext.training.run_directory import CONFIG_FILE, complete_checkpoints

STATE_FILE = "training_state.json"


@dataclass
class TrainingProgress:
    """Where the run is: optimiser updates done, and batches of the current epoch already consumed."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    skipped_steps: int = 0


def resolve_checkpoint(output_dir: str | os.PathLike, resume_from: str | None) -> Path | None:
    """`latest` -> newest complete checkpoint (None when there is none yet); a path -> that checkpoint, checked."""
    if not resume_from:
        return None
    if resume_from == "latest":
        checkpoints = complete_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from)
    if not (path / STATE_FILE).exists():
        raise run_directory.RunDirectoryError(
            f"--resume_from_checkpoint '{path}' is not a complete checkpoint (no {STATE_FILE}). "
            f"Complete ones in {output_dir}: {[p.name for p in complete_checkpoints(output_dir)] or 'none'}."
        )
    return path


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | os.PathLike,
    progress: TrainingProgress,
    total_limit: int | None,
    run_config: dict,
) -> Path:
    """Save the training state and the run's configuration (what a resubmission is checked against)."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{progress.global_step}"
    partial = output_dir / f".checkpoint-{progress.global_step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        with run_directory.disk_full_explained(output_dir, final.name):
            accelerator.save_state(str(partial))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                write_json_atomically(partial / STATE_FILE, asdict(progress))
                write_json_atomically(partial / CONFIG_FILE, {**run_config, "trained_steps": progress.global_step})
    except run_directory.RunDirectoryError:
        shutil.rmtree(partial, ignore_errors=True)  # frees what it took; the last complete checkpoint is untouched
        raise
    if accelerator.is_main_process:
        replace_folder(partial, final)
        if total_limit is not None:
            for old in complete_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def read_progress(checkpoint: Path) -> TrainingProgress:
    return TrainingProgress(**json.loads((checkpoint / STATE_FILE).read_text()))


def load_checkpoint(accelerator: Accelerator, checkpoint: Path | None) -> TrainingProgress:
    """The state of `checkpoint` restored, and where it stopped; a new run's start when there is none."""
    if checkpoint is None:
        return TrainingProgress()
    accelerator.load_state(str(checkpoint))
    return read_progress(checkpoint)


def updates_per_epoch(num_samples: int, batch_size: int, num_processes: int, accumulation: int) -> int:
    """Optimiser updates in one epoch, known before any model loads: accelerate shards the batches over the processes
    (evenly: short processes wrap around), and the last window of an epoch may hold fewer micro-batches."""
    batches_per_process = math.ceil(math.ceil(num_samples / batch_size) / num_processes)
    return math.ceil(batches_per_process / accumulation)


# Flags that fix the shapes (or the meaning) of the trained weights: a resumed run must keep them.
MODEL_FLAGS = (
    "adapter_tokens",
    "adapter_hidden_dim",
    "lora_rank",
    "lora_alpha",
    "use_rslora",
    "lora_targets",
    "lora_blocks",
    "lora_block_ranks",
    "class_conditioning",
    "classes",
)


def check_resumable(checkpoint: Path, flags: dict) -> None:
    """Compare the model flags of this run with those the checkpoint was trained with, before any state loads: a
    mismatch would otherwise surface as a shape error deep in `load_state_dict`."""
    recorded = run_directory.read_training_config(checkpoint)
    if not recorded:
        return  # a checkpoint written before checkpoints recorded their configuration
    pairs = [(flag, recorded.get(flag), flags.get(flag)) for flag in MODEL_FLAGS]
    had_head, has_head = (recorded.get("class_loss_weight") or 0) > 0, (flags.get("class_loss_weight") or 0) > 0
    if had_head != has_head:
        pairs.append(("class_loss_weight", recorded.get("class_loss_weight"), flags.get("class_loss_weight")))
    for flag, then, now in pairs:
        if then != now:
            raise run_directory.RunDirectoryError(
                f"{checkpoint.name} in '{checkpoint.parent}' was trained with --{flag} {_shown(then)}, but this run "
                f"asks for --{flag} {_shown(now)}. Resume with --{flag} {_shown(then)}, or start a new run in another "
                "--output_dir (or with --overwrite)."
            )


def earlier_data(checkpoint: Path, run_config: dict, allow_other_data: bool) -> list[dict]:
    """The data the run was trained on before this resume, when it differs from `run_config`'s; [] when it is the
    same. Another dataset under the same folder name (or another folder) would otherwise be trained on silently and
    `training_config.json` would name only the last one, so it is refused unless `allow_other_data` says so."""
    recorded = run_directory.read_training_config(checkpoint)
    history = recorded.get("earlier_data", [])
    if recorded.get("data_sha256") in (None, run_config["data_sha256"]):
        return history  # the same tiles (or a checkpoint written before checkpoints recorded their data)
    then = recorded.get("train_data_dir") or recorded.get("dataset_name")
    now = run_config.get("train_data_dir") or run_config.get("dataset_name")
    if not allow_other_data:
        raise run_directory.RunDirectoryError(
            f"{checkpoint.name} in '{checkpoint.parent}' was trained on other data ('{then}', content hash "
            f"{recorded['data_sha256'][:12]}) than this run's ('{now}', {run_config['data_sha256'][:12]}). Resume with "
            "the same data, or pass --allow_other_data if continuing on new data is intended (training_config.json "
            "then records both)."
        )
    step = read_progress(checkpoint).global_step
    return [*history, {"data": then, "data_sha256": recorded["data_sha256"], "until_step": step}]


def _shown(value) -> str:
    if value is None:
        return "(not given)"
    return " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def finish_from_checkpoint(checkpoint: Path, output_dir: Path) -> list[str]:
    """A resubmitted run that already reached its last update writes, from its final checkpoint, whichever final
    outputs are missing (it was killed after that checkpoint) and trains nothing; returns the names written."""
    written = []
    for name in (ADAPTER_FILE, run_directory.LORA_FILE):
        if not (output_dir / name).exists():
            write_bytes_atomically(output_dir / name, (checkpoint / name).read_bytes())
            written.append(name)
    if not (output_dir / CONFIG_FILE).exists() or not (output_dir / run_directory.MODEL_CARD_FILE).exists():
        run_directory.write_run_summary(output_dir, run_directory.read_training_config(checkpoint))
        written += [CONFIG_FILE, run_directory.MODEL_CARD_FILE]
    return written
