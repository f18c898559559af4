"""Accelerate set-up checks that turn silent multi-process mistakes into clear errors."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator


def check_process_group(accelerator: Accelerator) -> None:
    """Refuse to run when the launcher started several processes that each believe they are alone.

    On a machine without GPUs, `accelerate launch --multi_gpu` starts N processes with WORLD_SIZE=N but, unless
    told to use the CPU, each one initialises no process group and trains independently: N runs writing into the
    same output directory.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and accelerator.num_processes != world_size:
        raise RuntimeError(
            f"The launcher started {world_size} processes (WORLD_SIZE={world_size}) but Accelerate sees "
            f"{accelerator.num_processes} in its process group, so every process would train on its own. "
            "On a machine without GPUs set ACCELERATE_USE_CPU=true (or use --config_file "
            "accelerate_configs/cpu_2proc.yaml); on GPUs check that every process can see a device."
        )


def weight_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype of the frozen models: the compute dtype of the mixed-precision mode."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def make_optimizer(params, *, use_8bit: bool, **hyperparameters) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW when asked for (it keeps optimizer state in 8 bits)."""
    if not use_8bit:
        return torch.optim.AdamW(params, **hyperparameters)
    try:
        import bitsandbytes
    except ImportError as error:
        raise ImportError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from error
    return bitsandbytes.optim.AdamW8bit(params, **hyperparameters)


def too_many_bad_steps_message(count: int, args) -> str:
    return (
        f"The loss was not finite for {count} updates in a row, so training stopped (--max_bad_steps "
        f"{args.max_bad_steps}). Try a lower --learning_rate (now {args.learning_rate}), --mixed_precision bf16 "
        f"instead of fp16, a tighter --max_grad_norm (now {args.max_grad_norm}), or resume from an earlier "
        "checkpoint with --resume_from_checkpoint; check the data for blank or corrupt tiles."
    )
