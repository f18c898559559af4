"""Reading and writing LoRA adapters as PEFT-format safetensors files, and the errors a bad file raises.

Kept apart from the layers (lora.py) so the file format, and the checks that make `load_lora` all-or-nothing, can
be read in one place. Files are written in the PEFT/diffusers layout (`transformer.<module>.lora_A.weight`,
diffusers' prefixed `lora_adapter_metadata`), so a checkpoint from here loads with `peft.set_peft_model_state_dict`
or diffusers' `load_lora_adapter`, while training and inference depend only on torch and safetensors.

The saved `lora_B` already holds the scaling (alpha/r, alpha/sqrt(r) for rsLoRA, per module), and the PEFT-facing
metadata says alpha = r: a loader that ignores the metadata and falls back to alpha = r (diffusers does for a bare
file) then builds the same weight update as one that reads it. The trained alpha is kept in our own config entry and
the scaling is divided back out on load, so training resumes in its own parametrisation. Files written before this
(format 1, no format entry) hold the raw B and are still read.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from pixcell_ext.errors import ExplainedError
from pixcell_ext.files import save_safetensors_atomically
from pixcell_ext.model.lora import (
    BLOCK_NAME,
    LoRAConfig,
    LoRALinear,
    inject_lora,
    lora_layers,
    name_listing,
    plan_injection,
    require_lora_layers,
)

_METADATA_KEY = "lora_adapter_metadata"
_OUR_CONFIG_KEY = "pixcell_ext.config"
_FORMAT_KEY = "pixcell_ext.lora_format"
_FORMAT_RAW_B = 1  # no format entry: B stored unscaled, the scaling only in the metadata (portable at alpha = r only)
_FORMAT_SCALED_B = 2


class LoRAMismatchError(ValueError, ExplainedError):
    """Raised instead of loading a LoRA file partially: a half-loaded adapter produces plausible but wrong images."""


class DamagedFileError(LoRAMismatchError):
    """A weights file that ends early or has a broken header (an interrupted copy or save): nothing is loaded.

    A LoRAMismatchError, so every caller that reports an unusable LoRA file reports this too; but the file, not the
    model, is at fault, so its message says to copy the file again rather than to change the model.
    """


@contextmanager
def reporting_damage(path: str | os.PathLike) -> Iterator[None]:
    """safetensors header errors ("incomplete metadata, file not fully covered") as a sentence naming the file."""
    try:
        yield
    except SafetensorError as error:
        raise DamagedFileError(
            f"'{path}' is damaged or incomplete ({error}), so nothing was loaded from it. It was probably cut short "
            "while being copied or written: copy it again from the run's output folder (or use another checkpoint), "
            "or retrain."
        ) from error


def _key(prefix: str, name: str, which: str) -> str:
    return f"{prefix}.{name}.{which}.weight" if prefix else f"{name}.{which}.weight"


def lora_state_dict(model: nn.Module, prefix: str = "transformer") -> dict[str, torch.Tensor]:
    """What `save_lora` writes: PEFT/diffusers keys, with each layer's scaling folded into lora_B (fp32 copies).

    PEFT at alpha = r (scale 1) then reproduces every layer, whatever its alpha, rsLoRA or rank.
    """
    out: dict[str, torch.Tensor] = {}
    for name, layer in require_lora_layers(model).items():
        out[_key(prefix, name, "lora_A")] = layer.lora_A.weight.detach().float().clone()
        # Scaled in float64 and rounded once, so dividing it back out on load is off by at most one fp32 ulp.
        out[_key(prefix, name, "lora_B")] = (layer.lora_B.weight.detach().double() * layer.scaling).float()
    return out


def _config_selects(config: LoRAConfig, module_name: str) -> bool:
    m = BLOCK_NAME.fullmatch(module_name)
    return (
        m is not None
        and m.group(2) in config.target_modules
        and (config.blocks is None or int(m.group(1)) in config.blocks)
    )


def _check_config_matches(model_layers: Mapping[str, LoRALinear], config: LoRAConfig) -> None:
    """A file whose metadata disagrees with its tensors would rebuild a different adapter on load."""
    problems = []
    for name, layer in model_layers.items():
        rank = config.rank_for(name)
        if not _config_selects(config, name):
            problems.append(f"{name}: not selected by the config")
        elif layer.rank != rank or not math.isclose(layer.scaling, config.scaling_for(rank)):
            problems.append(
                f"{name}: model rank {layer.rank}, scaling {layer.scaling:g}; config rank {rank}, "
                f"scaling {config.scaling_for(rank):g}"
            )
    if problems:
        raise ValueError(f"the LoRA config does not describe the model's LoRA layers: {name_listing(problems)}")


def save_lora(model: nn.Module, config: LoRAConfig, path: str | os.PathLike) -> Path:
    """Written atomically (files.py), so an interrupted save never leaves a truncated adapter."""
    layers = require_lora_layers(model)
    _check_config_matches(layers, config)
    tensors = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    adapter_metadata = {
        # alpha = r everywhere (scale 1): the scaling is in lora_B, see the module docstring.
        "transformer.r": config.rank,
        "transformer.lora_alpha": config.rank,
        # Full module names: PEFT matches a name equal to or ending in ".<entry>", so these select exactly the
        # wrapped layers even when `blocks` restricts them.
        "transformer.target_modules": sorted(layers),
        "transformer.rank_pattern": config.rank_pattern,
        "transformer.alpha_pattern": dict(config.rank_pattern),
        "transformer.use_rslora": False,
        "transformer.lora_dropout": config.dropout,
        _OUR_CONFIG_KEY: config.to_dict(),
        _FORMAT_KEY: _FORMAT_SCALED_B,
    }
    # No sort_keys: rank_pattern is first-match-wins, so its order is part of its meaning.
    metadata = {"format": "pt", _METADATA_KEY: json.dumps(adapter_metadata)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomically(tensors, path, metadata=metadata)
    return path


def read_lora_config(path: str | os.PathLike) -> LoRAConfig:
    """The config the adapter was trained with (its true alpha, even where the file's PEFT entries say alpha = r)."""
    return _read_header(Path(path))[0]


def _read_header(path: Path) -> tuple[LoRAConfig, int]:
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    with reporting_damage(path), safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    raw = metadata.get(_METADATA_KEY)
    if raw is None:
        raise ValueError(
            f"{path}: no '{_METADATA_KEY}' in the safetensors header (keys: {sorted(metadata)}); "
            "it was not written by pixcell_ext.model.lora_files.save_lora"
        )
    data = json.loads(raw)
    if _OUR_CONFIG_KEY not in data:
        raise ValueError(
            f"{path}: '{_METADATA_KEY}' has no '{_OUR_CONFIG_KEY}' entry (keys: {sorted(data)}); "
            "it was not written by pixcell_ext.model.lora_files.save_lora"
        )
    file_format = data.get(_FORMAT_KEY, _FORMAT_RAW_B)
    if file_format not in (_FORMAT_RAW_B, _FORMAT_SCALED_B):
        raise ValueError(
            f"{path}: LoRA file format {file_format!r} is newer than this pixcell_ext reads "
            f"({_FORMAT_RAW_B}-{_FORMAT_SCALED_B}); update pixcell_ext"
        )
    try:
        return LoRAConfig.from_dict(data[_OUR_CONFIG_KEY]), file_format
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid LoRA config in metadata: {e}") from e


def load_lora(model: nn.Module, path: str | os.PathLike, *, prefix: str = "transformer") -> LoRAConfig:
    """Load all-or-nothing: every key, shape and scaling must match, otherwise nothing is changed."""
    path = Path(path)
    config, file_format = _read_header(path)
    layers = lora_layers(model)
    if any(layer.merged for layer in layers.values()):
        raise RuntimeError(f"cannot load {path} into a merged model: call unmerge_lora(model) first")
    if layers:
        shapes = {
            name: (layer.base_layer.in_features, layer.base_layer.out_features, layer.rank)
            for name, layer in layers.items()
        }
        # Same shapes but another alpha (or rsLoRA) would load cleanly and silently change the output.
        scaling_errors = [
            f"{name}: file {config.scaling_for(layer.rank):g} vs model {layer.scaling:g}"
            for name, layer in layers.items()
            if layer.rank == config.rank_for(name) and not math.isclose(layer.scaling, config.scaling_for(layer.rank))
        ]
        plan = None
    else:
        try:
            plan = plan_injection(model, config)
        except ValueError as e:
            raise LoRAMismatchError(f"{path}: its LoRA config does not fit this model: {e}") from e
        shapes = {name: (lin.in_features, lin.out_features, r) for name, (lin, r) in plan.items()}
        scaling_errors = []

    expected: dict[str, tuple[int, ...]] = {}
    for name, (n_in, n_out, r) in shapes.items():
        expected[_key(prefix, name, "lora_A")] = (r, n_in)
        expected[_key(prefix, name, "lora_B")] = (n_out, r)
    with reporting_damage(path):
        file_sd = load_file(str(path))
    missing = sorted(expected.keys() - file_sd.keys())
    unexpected = sorted(file_sd.keys() - expected.keys())
    shape_errors = [
        f"{k}: file {list(file_sd[k].shape)} vs model {list(expected[k])}"
        for k in sorted(expected.keys() & file_sd.keys())
        if tuple(file_sd[k].shape) != expected[k]
    ]
    if missing or unexpected or shape_errors or scaling_errors:
        parts = [
            f"{title} ({len(items)}): {name_listing(items)}"
            for title, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", shape_errors),
                ("scaling mismatches", scaling_errors),
            )
            if items
        ]
        raise LoRAMismatchError(
            f"{path}: LoRA weights do not match the model (prefix {prefix!r}):\n  " + "\n  ".join(parts)
        )

    if plan is not None:
        inject_lora(model, config)
        layers = lora_layers(model)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A.weight.copy_(file_sd[_key(prefix, name, "lora_A")])
            b = file_sd[_key(prefix, name, "lora_B")]
            if file_format == _FORMAT_SCALED_B:
                b = b.double() / layer.scaling
            layer.lora_B.weight.copy_(b)
    return config
