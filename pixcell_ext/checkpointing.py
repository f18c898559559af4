"""Checkpoints that are either complete or absent, and resuming from the exact batch where a run stopped.

`accelerator.save_state` writes into `.checkpoint-N.partial`; only when every process has finished does the main
process rename it to `checkpoint-N`. A run killed during a save therefore leaves a `.partial` folder that is never
mistaken for a checkpoint, and `--resume_from_checkpoint latest` takes the last complete one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate import Accelerator

STATE_FILE = "training_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainingProgress:
    """Where the run is: optimiser updates done, and batches of the current epoch already consumed."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    skipped_steps: int = 0


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(output_dir: str | os.PathLike, resume_from: str | None) -> Path | None:
    """`latest` -> newest complete checkpoint (None when there is none yet); a path -> that checkpoint, checked."""
    if not resume_from:
        return None
    if resume_from == "latest":
        checkpoints = complete_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(
            f"--resume_from_checkpoint '{path}' is not a complete checkpoint (no {STATE_FILE}). "
            f"Complete ones in {output_dir}: {[p.name for p in complete_checkpoints(output_dir)] or 'none'}."
        )
    return path


def save_checkpoint(
    accelerator: Accelerator, output_dir: str | os.PathLike, progress: TrainingProgress, total_limit: int | None
) -> Path:
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{progress.global_step}"
    partial = output_dir / f".checkpoint-{progress.global_step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps(asdict(progress), indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        if total_limit is not None:
            for old in complete_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> TrainingProgress:
    accelerator.load_state(str(checkpoint))
    return TrainingProgress(**json.loads((checkpoint / STATE_FILE).read_text()))
