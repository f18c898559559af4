"""Accelerate set-up checks that turn silent multi-process mistakes into clear errors."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator

from pixcell_ext.errors import ExplainedError


class RunStopped(RuntimeError, ExplainedError):
    """The launch or the run cannot go on; the message says why and what to change."""


def check_process_group(accelerator: Accelerator) -> None:
    """Refuse to run when the launcher started several processes that each believe they are alone.

    On a machine without GPUs, `accelerate launch --multi_gpu` starts N processes with WORLD_SIZE=N but, unless
    told to use the CPU, each one initialises no process group and trains independently: N runs writing into the
    same output directory.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and accelerator.num_processes != world_size:
        raise RunStopped(
            f"The launcher started {world_size} processes (WORLD_SIZE={world_size}) but Accelerate sees "
            f"{accelerator.num_processes} in its process group, so every process would train on its own. "
            "On a machine without GPUs set ACCELERATE_USE_CPU=true (or use --config_file "
            "accelerate_configs/cpu_2proc.yaml); on GPUs check that every process can see a device."
        )


def weight_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype of the frozen models: the compute dtype of the mixed-precision mode."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def too_many_bad_steps_message(count: int, max_bad_steps: int, learning_rate: float, max_grad_norm: float) -> str:
    return (
        f"The loss was not finite for {count} updates in a row, so training stopped (--max_bad_steps "
        f"{max_bad_steps}). Try a lower --learning_rate (now {learning_rate}), --mixed_precision bf16 "
        f"instead of fp16, a tighter --max_grad_norm (now {max_grad_norm}), or resume from an earlier "
        "checkpoint with --resume_from_checkpoint; check the data for blank or corrupt tiles."
    )


@torch.no_grad()
def check_replicas_identical(accelerator: Accelerator, params: list[torch.Tensor]) -> None:
    """Fail loudly if DDP replicas drifted apart: every process must hold bit-identical trainable weights."""
    flat = torch.cat([p.detach().double().flatten() for p in params])
    positions = torch.arange(flat.numel(), device=flat.device, dtype=torch.float64)
    fingerprint = torch.stack([flat.sum(), (flat * flat).sum(), (flat * torch.sin(positions)).sum()]).view(1, 3)
    everyone = accelerator.gather(fingerprint)
    if not bool((everyone == everyone[0]).all()):
        raise RuntimeError(f"Trainable weights differ between processes: fingerprints {everyone.tolist()}.")


def apply_gradient_clipping_to_deepspeed(accelerator: Accelerator, max_grad_norm: float) -> None:
    """DeepSpeed clips inside its engine and ignores `accelerator.clip_grad_norm_`; give it the script's value."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None:
        plugin.deepspeed_config["gradient_clipping"] = max_grad_norm
