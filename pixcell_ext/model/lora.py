"""LoRA-linear layers for the PixCell transformer, without peft at run time.

Saving and loading in the PEFT/diffusers file format is in lora_files.py.

Default targets. PixCell-256 is conditioned on ONE token (the UNI2-h embedding), so the cross-attention softmax runs
over a single key and is identically 1: cross-attention output is `to_out(to_v(ctx))` whatever the queries and keys
are. LoRA on `attn2.to_q` / `attn2.to_k` therefore gets ~zero gradient (measured ~1e-10 vs ~5e-4 with 16 tokens)
and only costs memory and time; it is left out. `ff.net.0.proj` and `ff.net.2` are useful optional extra targets
(more capacity, roughly doubling the LoRA parameter count at equal rank).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from pixcell_ext.model.lora_targets import DEFAULT_TARGET_MODULES

BLOCK_NAME = re.compile(r"transformer_blocks\.(\d+)\.(.+)")
_MAX_LISTED = 10


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


def name_listing(items: Iterable[str]) -> str:
    """Names for an error message, the first ten and a count of the rest: errors stay one readable line."""
    items = list(items)
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f", ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def plan_injection(model: nn.Module, config: LoRAConfig) -> dict[str, tuple[nn.Linear, int]]:
    """Resolve and validate every target before touching the model, so a bad config leaves it unchanged."""
    modules = dict(model.named_modules())
    block_ids = sorted({int(m.group(1)) for name in modules if (m := BLOCK_NAME.fullmatch(name))})
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
            f"{name_listing(missing)}; nn.Linear layers in a block: {available}"
        )
    return plan


def inject_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze the whole model and wrap the selected Linears, so only LoRA trains unless the caller unfreezes more.

    The wrapped base weights move to `<name>.base_layer.weight` in `model.state_dict()` (PEFT's layout too).
    """
    if lora_layers(model):
        raise RuntimeError("the model already has LoRA layers; build a fresh model to inject a different adapter")
    plan = plan_injection(model, config)
    model.requires_grad_(False)
    for name, (linear, rank) in plan.items():
        parent_name, _, child = name.rpartition(".")
        layer = LoRALinear(linear, rank, config.alpha, dropout=config.dropout, use_rslora=config.use_rslora)
        setattr(model.get_submodule(parent_name), child, layer)
    return sorted(plan)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def require_lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRA layers of `model`; an empty model is a caller error, named here rather than as a silent no-op."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers (call inject_lora or load_lora first)")
    return layers


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Explicit list for the optimizer, so frozen base weights are never handed to it."""
    return [p for layer in require_lora_layers(model).values() for p in (layer.lora_A.weight, layer.lora_B.weight)]


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRA update into its fp32 base weight (refused for half-precision weights, see LoRALinear.merge)."""
    for layer in require_lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in require_lora_layers(model).values():
        layer.unmerge()
