"""LoRA-linear layers for the PixCell transformer, without peft at run time.

Files are written in the PEFT/diffusers layout (`transformer.<module>.lora_A.weight`, diffusers' prefixed
`lora_adapter_metadata`), so a checkpoint from here loads with `peft.set_peft_model_state_dict` or diffusers'
`load_lora_adapter`, while training and inference depend only on torch and safetensors.

The saved `lora_B` already holds the scaling (alpha/r, alpha/sqrt(r) for rsLoRA, per module), and the PEFT-facing
metadata says alpha = r: a loader that ignores the metadata and falls back to alpha = r (diffusers does for a bare
file) then builds the same weight update as one that reads it. The trained alpha is kept in our own config entry and
the scaling is divided back out on load, so training resumes in its own parametrisation. Files written before this
(format 1, no format entry) hold the raw B and are still read.

Default targets. PixCell-256 is conditioned on ONE token (the UNI2-h embedding), so the cross-attention softmax runs
over a single key and is identically 1: cross-attention output is `to_out(to_v(ctx))` whatever the queries and keys
are. LoRA on `attn2.to_q` / `attn2.to_k` therefore gets ~zero gradient (measured ~1e-10 vs ~5e-4 with 16 tokens)
and only costs memory and time; it is left out. `ff.net.0.proj` and `ff.net.2` are useful optional extra targets
(more capacity, roughly doubling the LoRA parameter count at equal rank).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from pixcell_ext.files import save_safetensors_atomically

DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_v",
    "attn2.to_out.0",
)
"""Self-attention fully, cross-attention only where gradient flows with one condition token (see module docstring)."""

OPTIONAL_TARGET_MODULES: tuple[str, ...] = ("ff.net.0.proj", "ff.net.2")

_BLOCK_NAME = re.compile(r"transformer_blocks\.(\d+)\.(.+)")
_METADATA_KEY = "lora_adapter_metadata"
_OUR_CONFIG_KEY = "pixcell_ext.config"
_FORMAT_KEY = "pixcell_ext.lora_format"
_FORMAT_RAW_B = 1  # no format entry: B stored unscaled, the scaling only in the metadata (portable at alpha = r only)
_FORMAT_SCALED_B = 2
_MAX_LISTED = 10


class LoRAMismatchError(ValueError):
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


def lora_scaling(alpha: float, rank: int, use_rslora: bool) -> float:
    """rsLoRA's alpha/sqrt(r) keeps the update's scale stable as the rank grows; plain LoRA's alpha/r does not."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def alpha_or_rank(alpha: float | None, rank: int) -> float:
    """`--lora_alpha` left unset means alpha = rank (scale 1), the value the PEFT-facing metadata states anyway."""
    return rank if alpha is None else alpha


@dataclass
class LoRAConfig:
    """Everything needed to rebuild the same LoRA layers on a fresh model; stored inside every saved file."""

    rank: int = 16
    alpha: float = 16.0
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    blocks: tuple[int, ...] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    dropout: float = 0.0
    use_rslora: bool = False

    def __post_init__(self) -> None:
        # Validate at construction so a typo fails before a long model load, not halfway through injection.
        if isinstance(self.target_modules, str):
            raise TypeError(
                f"target_modules must be a sequence of module-name suffixes, got the string {self.target_modules!r}"
            )
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules:
            raise ValueError("target_modules is empty: LoRA would be injected nowhere")
        if self.blocks is not None:
            self.blocks = tuple(int(b) for b in self.blocks)
            if not self.blocks or min(self.blocks) < 0:
                raise ValueError(f"blocks must be None (all) or non-empty non-negative indices, got {self.blocks}")
        if int(self.rank) != self.rank or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        self.rank_pattern = dict(self.rank_pattern)
        for pattern, rank in self.rank_pattern.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"rank_pattern key {pattern!r} is not a valid regex: {e}") from e
            if int(rank) != rank or rank < 1:
                raise ValueError(f"rank_pattern[{pattern!r}] must be a positive integer, got {rank}")

    def rank_for(self, module_name: str) -> int:
        """Same matching rule as PEFT's rank_pattern, so the saved metadata means the same thing to PEFT/diffusers."""
        for pattern, rank in self.rank_pattern.items():
            if re.fullmatch(rf"(.*\.)?({pattern})", module_name):
                return int(rank)
        return self.rank

    def scaling_for(self, rank: int) -> float:
        return lora_scaling(self.alpha, rank, self.use_rslora)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        d["blocks"] = None if self.blocks is None else list(self.blocks)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoRAConfig:
        # Unknown keys mean a file from a newer/other writer; guessing could rebuild different layers.
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown LoRAConfig fields {unknown}")
        return cls(**data)


def parse_block_spec(spec: str, num_blocks: int) -> tuple[int, ...]:
    """Turn a CLI block selection ("all", "0-13", "0-3,10,20-27") into sorted unique block indices."""
    valid = f"valid blocks are 0-{num_blocks - 1}"
    if spec.strip().lower() == "all":
        return tuple(range(num_blocks))
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if m is None:
            raise ValueError(
                f"bad block spec part {part!r} in {spec!r}: expected 'all', 'N' or 'N-M' separated by commas; {valid}"
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if lo > hi:
            raise ValueError(f"bad block spec part {part!r} in {spec!r}: range start > end; {valid}")
        if hi >= num_blocks:
            raise ValueError(f"bad block spec part {part!r} in {spec!r}: out of range; {valid}")
        out.update(range(lo, hi + 1))
    return tuple(sorted(out))


def block_rank_pattern(spec: str | None, num_blocks: int) -> dict[str, int]:
    """Per-block ranks from the CLI ("0-13=16,14-27=4") as `LoRAConfig.rank_pattern` regexes over block names.

    Each entry is `BLOCKS=RANK` with BLOCKS a single block or a range; entries are separated by commas.
    """
    if not spec:
        return {}
    pattern: dict[str, int] = {}
    for entry in spec.split(","):
        blocks, _, rank = entry.partition("=")
        if not rank.strip().isdigit() or int(rank) < 1:
            raise ValueError(f"bad per-block rank {entry!r} in {spec!r}: expected 'N=RANK' or 'N-M=RANK'")
        indices = "|".join(str(i) for i in parse_block_spec(blocks, num_blocks))
        pattern[rf"transformer_blocks\.({indices})\..*"] = int(rank)
    return pattern


class LoRALinear(nn.Module):
    """`base_layer(x) + scaling * B(A(dropout(x)))` with a frozen base, so the pretrained weight stays intact.

    A and B live in fp32 whatever the base dtype: bf16/fp16 would round away small optimizer updates. They are
    created in fp32 on the base layer's device, and casting the model later (`.to(torch.bfloat16)`, `.half()`)
    leaves them in fp32 (see `_apply`).

    merge()/unmerge() are idempotent (a second call is a no-op). Merging needs an fp32 base (see merge()). While
    merged, the forward is the base layer alone and A/B get no gradient: do not train a merged model.
    """

    def __init__(
        self, base_layer: nn.Linear, rank: int, alpha: float, *, dropout: float = 0.0, use_rslora: bool = False
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer.requires_grad_(False)
        self.rank = int(rank)
        self.scaling = lora_scaling(alpha, self.rank, use_rslora)
        device = base_layer.weight.device
        self.lora_A = nn.Linear(base_layer.in_features, self.rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(self.rank, base_layer.out_features, bias=False, device=device, dtype=torch.float32)
        # PEFT's init: random A, zero B, so the wrapped model starts exactly at the pretrained function.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        # Under autocast, A and B run in the autocast dtype whatever the input's: an fp32 copy of a bf16 input would be
        # cast straight back, one wasted activation copy per layer. Without autocast the input must match fp32 A.
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.weight.dtype)
        lora = self.lora_B(self.lora_A(self.dropout(x)))
        # In place: linear's backward does not need its output, and this skips two [tokens, out] temporaries.
        # With a bf16 result the sum is formed in fp32 and rounded once.
        return result.add_(lora, alpha=self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """fp32 so that merge followed by unmerge restores an fp32 base to rounding error."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Only into fp32 weights: bf16 keeps 8 bits of mantissa, and a LoRA update is mostly below one ulp of the
        weight it is added to (at RMS ΔW 7e-5 on weights of std 0.02, 44 % of the merged weights do not change and
        the merged update is 43 % off ΔW; `benchmarks/bench_lora.py --merge_precision`). Unmerged, the update runs
        in fp32 beside a half-precision base and is kept whole."""
        if self.merged:
            return
        w = self.base_layer.weight
        if w.dtype != torch.float32:
            raise ValueError(
                f"cannot merge LoRA into {w.dtype} weights: rounding W + ΔW to {w.dtype} erases most of a small LoRA "
                "update. Keep the LoRA unmerged in half precision (it then runs in fp32 beside the base), or cast "
                "the model to float32 before merging."
            )
        w.copy_(w.float() + self.delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Exact to one fp32 rounding (~1e-7 relative)."""
        if not self.merged:
            return
        w = self.base_layer.weight
        w.copy_(w.float() - self.delta_weight())
        self.merged = False

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> LoRALinear:
        # Module-wide casts (model.to(bfloat16), .half()) would silently turn the trainable weights into bf16.
        super()._apply(fn, recurse)
        for p in (self.lora_A.weight, self.lora_B.weight):
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
                if p.grad is not None:
                    p.grad = p.grad.float()
        return self

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, merged={self.merged}"


def _plan_injection(model: nn.Module, config: LoRAConfig) -> dict[str, tuple[nn.Linear, int]]:
    """Resolve and validate every target before touching the model, so a bad config leaves it unchanged."""
    modules = dict(model.named_modules())
    block_ids = sorted({int(m.group(1)) for name in modules if (m := _BLOCK_NAME.fullmatch(name))})
    if not block_ids:
        raise ValueError("the model has no 'transformer_blocks.<i>.' modules to put LoRA on")
    blocks = block_ids if config.blocks is None else sorted(set(config.blocks))
    bad_blocks = sorted(set(blocks) - set(block_ids))
    if bad_blocks:
        raise ValueError(f"LoRA blocks {bad_blocks} do not exist; the model has blocks {block_ids[0]}-{block_ids[-1]}")
    plan: dict[str, tuple[nn.Linear, int]] = {}
    missing: list[str] = []
    for block in blocks:
        for target in config.target_modules:
            name = f"transformer_blocks.{block}.{target}"
            module = modules.get(name)
            if isinstance(module, nn.Linear):
                plan[name] = (module, config.rank_for(name))
            else:
                missing.append(name if module is None else f"{name} ({type(module).__name__}, not nn.Linear)")
    if missing:
        prefix = f"transformer_blocks.{blocks[0]}."
        available = sorted(
            n[len(prefix) :] for n, m in modules.items() if n.startswith(prefix) and isinstance(m, nn.Linear)
        )
        raise ValueError(
            f"LoRA targets {list(config.target_modules)} not found as nn.Linear in blocks {blocks}: "
            f"{_listing(missing)}; nn.Linear layers in a block: {available}"
        )
    return plan


def inject_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze the whole model and wrap the selected Linears, so only LoRA trains unless the caller unfreezes more.

    The wrapped base weights move to `<name>.base_layer.weight` in `model.state_dict()` (PEFT's layout too).
    """
    if lora_layers(model):
        raise RuntimeError("the model already has LoRA layers; build a fresh model to inject a different adapter")
    plan = _plan_injection(model, config)
    model.requires_grad_(False)
    for name, (linear, rank) in plan.items():
        parent_name, _, child = name.rpartition(".")
        layer = LoRALinear(linear, rank, config.alpha, dropout=config.dropout, use_rslora=config.use_rslora)
        setattr(model.get_submodule(parent_name), child, layer)
    return sorted(plan)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _require_lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers (call inject_lora or load_lora first)")
    return layers


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Explicit list for the optimizer, so frozen base weights are never handed to it."""
    return [p for layer in _require_lora_layers(model).values() for p in (layer.lora_A.weight, layer.lora_B.weight)]


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA update into its fp32 base weight (refused for half-precision weights, see LoRALinear.merge)."""
    for layer in _require_lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in _require_lora_layers(model).values():
        layer.unmerge()


def _key(prefix: str, name: str, which: str) -> str:
    return f"{prefix}.{name}.{which}.weight" if prefix else f"{name}.{which}.weight"


def lora_state_dict(model: nn.Module, prefix: str = "transformer") -> dict[str, torch.Tensor]:
    """What `save_lora` writes: PEFT/diffusers keys, with each layer's scaling folded into lora_B (fp32 copies).

    PEFT at alpha = r (scale 1) then reproduces every layer, whatever its alpha, rsLoRA or rank.
    """
    out: dict[str, torch.Tensor] = {}
    for name, layer in _require_lora_layers(model).items():
        out[_key(prefix, name, "lora_A")] = layer.lora_A.weight.detach().float().clone()
        # Scaled in float64 and rounded once, so dividing it back out on load is off by at most one fp32 ulp.
        out[_key(prefix, name, "lora_B")] = (layer.lora_B.weight.detach().double() * layer.scaling).float()
    return out


def _config_selects(config: LoRAConfig, module_name: str) -> bool:
    m = _BLOCK_NAME.fullmatch(module_name)
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
        raise ValueError(f"the LoRA config does not describe the model's LoRA layers: {_listing(problems)}")


def save_lora(model: nn.Module, config: LoRAConfig, path: str | os.PathLike) -> Path:
    """Written atomically (files.py), so an interrupted save never leaves a truncated adapter."""
    layers = _require_lora_layers(model)
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
            "it was not written by pixcell_ext.lora.save_lora"
        )
    data = json.loads(raw)
    if _OUR_CONFIG_KEY not in data:
        raise ValueError(
            f"{path}: '{_METADATA_KEY}' has no '{_OUR_CONFIG_KEY}' entry (keys: {sorted(data)}); "
            "it was not written by pixcell_ext.lora.save_lora"
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


def _listing(items: Iterable[str]) -> str:
    items = list(items)
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


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
            plan = _plan_injection(model, config)
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
            f"{title} ({len(items)}): {_listing(items)}"
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
