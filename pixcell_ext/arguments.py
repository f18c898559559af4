"""Every command-line value checked in one pass, right after parsing and before any model loads.

A wrong value must stop the run in a second with one sentence naming the flag and the fix: not after 1.3 B
parameters have loaded, not as a `ZeroDivisionError` at the first checkpoint, and never as a run that "succeeds"
with untrained weights (`--max_train_steps -5` used to). Checks of the model's layout read its `config.json` only.
Free of torch at import: the scripts import this at the top and `--help` must answer at once.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pixcell_ext.errors import ExplainedError
from pixcell_ext.model.lora_targets import BLOCK_LINEAR_LAYERS, block_rank_pattern, parse_block_spec

logger = logging.getLogger(__name__)


class ArgumentError(ValueError, ExplainedError):
    """A command-line value that cannot work; the message names the flag and what to give instead."""


@dataclass(frozen=True)
class Limits:
    """The flags of a script that must hold each kind of value; a flag left at None (not given) always passes."""

    at_least_one: tuple[str, ...] = ()
    non_negative: tuple[str, ...] = ()
    positive: tuple[str, ...] = ()
    probability: tuple[str, ...] = ()
    below_one: tuple[str, ...] = ()
    open_unit: tuple[str, ...] = ()


RULES: dict[str, tuple[str, Callable[[float], bool]]] = {
    "at_least_one": ("at least 1", lambda v: v >= 1),
    "non_negative": ("a finite number, 0 or more", lambda v: math.isfinite(v) and v >= 0),
    "positive": ("a finite number above 0", lambda v: math.isfinite(v) and v > 0),
    "probability": ("a probability, from 0 to 1", lambda v: 0 <= v <= 1),
    "below_one": ("from 0 up to (not including) 1", lambda v: 0 <= v < 1),
    "open_unit": ("a number above 0 and below 1", lambda v: 0 < v < 1),
}

TRAINING_LIMITS = Limits(
    at_least_one=(
        "train_batch_size",
        "gradient_accumulation_steps",
        "num_train_epochs",
        "max_train_steps",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "validation_steps",
        "num_validation_inference_steps",
        "lora_rank",
        "adapter_tokens",
        "adapter_hidden_dim",
        "max_bad_steps",
        "resolution",
    ),
    non_negative=(
        "lr_warmup_steps",
        "dataloader_num_workers",
        "adam_weight_decay",
        "class_loss_weight",
        "validation_guidance_scale",
    ),
    positive=("learning_rate", "adam_epsilon", "max_grad_norm", "lora_alpha", "snr_gamma"),
    probability=("cond_dropout", "reference_dropout"),
    below_one=("adam_beta1", "adam_beta2", "lora_dropout"),
)
GENERATION_LIMITS = Limits(
    at_least_one=("num_images_per_class", "num_inference_steps", "batch_size"),
    non_negative=("guidance_scale",),
)
EVALUATION_LIMITS = Limits(
    at_least_one=(
        "kid_subsets",
        "pr_k",
        "dc_k",
        "matched_draws",
        "half_samples",
        "bootstrap_replicates",
        "probe_max_per_class",
        "low_data_draws",
        "lpips_resolution",
        "lpips_max_pairs",
        "batch_size",
        "plot_max_points",
        "timm_image_size",
    ),
    non_negative=("dataloader_num_workers",),
    open_unit=("confidence", "real_test_fraction"),
)


def check_ranges(values: Mapping[str, Any], limits: Limits, defaults: Mapping[str, Any]) -> None:
    """Refuse the first flag whose value breaks its rule, naming the rule and the default to fall back on."""
    for kind, flags in asdict(limits).items():
        rule, holds = RULES[kind]
        for flag in flags:
            value = values[flag]
            if value is None or holds(value):
                continue
            default = defaults.get(flag)
            fix = f"the default is {default}" if default is not None else "or leave it out"
            raise ArgumentError(f"--{flag} {value} is not usable: give {rule} ({fix}).")


def check_output_folder(flag: str, path: str | None) -> None:
    """An output folder that names an existing file is refused now, not as a `FileExistsError` after loading."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise ArgumentError(f"--{flag} '{path}' is a file, not a folder: name a folder (new or existing) instead.")


def transformer_config(name_or_path: str, revision: str | None) -> dict | None:
    """The PixCell transformer's `config.json` (a few kB): a local folder's, or the hub's through its cache.
    None, with one log line, when the hub cannot be reached: the layout is then checked when the model loads."""
    folder = Path(name_or_path)
    if folder.is_dir():
        path = folder / "transformer" / "config.json"
        if not path.is_file():
            raise ArgumentError(
                f"--pretrained_model_name_or_path '{name_or_path}' has no transformer/config.json: give a PixCell "
                "folder (holding transformer/ and scheduler/) or a hub id."
            )
        return json.loads(path.read_text())
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(name_or_path, "config.json", subfolder="transformer", revision=revision)
    except Exception as error:  # offline, gated, or no such repository: the model loader reports those properly
        logger.warning(
            "LoRA targets and blocks are checked when the model loads: %s's config could not be read now (%s).",
            name_or_path,
            type(error).__name__,
        )
        return None
    return json.loads(Path(path).read_text())


def check_lora_targets(targets: list[str], adapter_tokens: int) -> None:
    """LoRA targets against the layers of a PixCell block, and against what can learn with one condition token."""
    from pixcell_ext.model.attention import check_lora_targets as check_trainable

    unknown = [target for target in targets if target not in BLOCK_LINEAR_LAYERS]
    if unknown:
        raise ArgumentError(
            f"--lora_targets {' '.join(unknown)}: no such layer in a PixCell block; choose from "
            f"{' '.join(BLOCK_LINEAR_LAYERS)}."
        )
    try:
        check_trainable(targets, adapter_tokens)
    except ValueError as error:
        raise ArgumentError(str(error)) from error


def check_lora_blocks(blocks: str, block_ranks: str | None, num_layers: int) -> None:
    """--lora_blocks and --lora_block_ranks against the model's `num_layers` (from its config.json)."""
    for flag, value, check in (
        ("lora_blocks", blocks, parse_block_spec),
        ("lora_block_ranks", block_ranks, block_rank_pattern),
    ):
        try:
            check(value, num_layers)
        except ValueError as error:
            raise ArgumentError(f"--{flag} {value}: {error} (the model has {num_layers} blocks).") from error


def check_training(values: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """All of train_adapter_lora.py's values that can be judged without data or weights."""
    check_ranges(values, TRAINING_LIMITS, defaults)
    check_lora_targets(values["lora_targets"], values["adapter_tokens"])
    config = transformer_config(values["pretrained_model_name_or_path"], values["revision"])
    if config is not None:
        check_lora_blocks(values["lora_blocks"], values["lora_block_ranks"], config["num_layers"])


def check_generation(values: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    check_ranges(values, GENERATION_LIMITS, defaults)
    check_output_folder("output_dir", values["output_dir"])


def check_evaluation(values: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    check_ranges(values, EVALUATION_LIMITS, defaults)
    if any(k < 1 for k in values["low_data_ks"]):
        raise ArgumentError(f"--low_data_ks {values['low_data_ks']} is not usable: every value must be at least 1.")
    check_output_folder("output_dir", values["output_dir"])
    vae = values.get("vae_name_or_path")
    if vae is not None and Path(vae).exists() and not (Path(vae) / "vae" / "config.json").is_file():
        raise ArgumentError(
            f"--vae_name_or_path '{vae}' holds no vae/config.json: give the folder that holds vae/ (the one given to "
            "generate_synthetic.py), or the hub id."
        )
    for flag in ("inception_weights", "timm_encoder_weights", "lpips_backbone", "baseline_metrics"):
        path = values[flag]
        if path is not None and not Path(path).is_file():
            raise ArgumentError(f"--{flag} '{path}' is not a file: give the path of the weights file, or leave it out.")
