"""Cross-attention over a single condition token, computed as what it is: `to_out(to_v(context))`, once per image.

PixCell-256 is conditioned on one token (the adapted UNI2-h embedding). A softmax over one key is identically 1, so
every image token's cross-attention output is that key's value, projected: one row per image, whatever the queries
and keys are. diffusers' standard processor still projects all image tokens with `to_q`, runs the attention and
applies `to_out` to rows that are all equal, which is 2 of the 14 d² multiply-adds per token of a block (about 14 %
of its linear work) in every forward, and again in every backward.

`SingleTokenCrossAttnProcessor` computes the row once per image and broadcasts it (a stride-0 view; the residual add
that follows in the block materialises it, and autograd sums the gradient over the tokens). It decides at every call:
with more than one context token, an attention mask, or an `Attention` configured with anything that acts per image
token (group or spatial norm, a residual connection, output rescaling), it runs diffusers' `AttnProcessor2_0`
unchanged. Installing it therefore changes how a model computes, never what.

`attn.to_v` and `attn.to_out[0]` are called as modules, so LoRA layers wrapping them keep training. LoRA on
`attn2.to_q` / `attn2.to_k` would receive no gradient with one context token (on the standard path it gets rounding
noise, ~1e-10 against ~5e-4 with 16 tokens); `install_single_token_attention` refuses it instead of training
parameters that cannot learn.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from pixcell_ext.model.lora import lora_layers

UNTRAINABLE_WITH_ONE_TOKEN = ("attn2.to_q", "attn2.to_k")


class SingleTokenCrossAttnProcessor:
    """`to_out(to_v(context))` broadcast over the image tokens when the context has one token; else diffusers' own."""

    def __init__(self) -> None:
        self.standard = AttnProcessor2_0()

    @staticmethod
    def applies(
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> bool:
        """True when the output is exactly the projected value of one key. A mask falls back even though a finite
        bias over one key would not change the softmax: for a fully masked key (-inf) the standard kernels return
        zeros or NaN, not the value."""
        return (
            encoder_hidden_states is not None
            and encoder_hidden_states.ndim == 3
            and encoder_hidden_states.shape[1] == 1
            and hidden_states.ndim == 3
            and attention_mask is None
            and attn.spatial_norm is None
            and attn.group_norm is None
            and not attn.residual_connection
            and attn.rescale_output_factor == 1.0
        )

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        if args or kwargs or not self.applies(attn, hidden_states, encoder_hidden_states, attention_mask):
            return self.standard(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        context = encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        row = attn.to_out[0](attn.to_v(context))  # [B, 1, C]
        # Dropout (if any) after the broadcast, so that each token draws its own mask as on the standard path.
        return attn.to_out[1](row.expand(-1, hidden_states.shape[1], -1))


def _cross_attention_names(transformer: nn.Module) -> list[str]:
    """Processor keys (`<module>.processor`, as `attn_processors` names them) of the cross-attention modules."""
    return [
        f"{name}.processor"
        for name, module in transformer.named_modules()
        if isinstance(module, Attention) and module.is_cross_attention
    ]


def _set_cross_attention_processor(transformer: nn.Module, make_processor) -> None:
    processors = dict(transformer.attn_processors)
    cross = _cross_attention_names(transformer)
    if not cross:
        raise ValueError(f"{type(transformer).__name__} has no cross-attention modules to set a processor on")
    processors.update({name: make_processor() for name in cross})
    transformer.set_attn_processor(processors)


def check_lora_targets(names: Iterable[str], context_tokens: int) -> None:
    """Refuse LoRA on the cross-attention queries or keys when the context has one token: they could not learn.

    `names` are LoRA targets (`attn2.to_q`, as `--lora_targets` gives them) or full layer names; the scripts call
    this on their flags before loading any model, `install_single_token_attention` on the layers themselves.
    """
    if context_tokens != 1:
        return
    useless = sorted(n for n in names for t in UNTRAINABLE_WITH_ONE_TOKEN if n == t or n.endswith(f".{t}"))
    if useless:
        raise ValueError(
            f"LoRA on {', '.join(UNTRAINABLE_WITH_ONE_TOKEN)} cannot learn with a single condition token: the "
            "cross-attention softmax runs over one key and is 1 whatever the queries and keys are, so the output "
            "is to_out(to_v(context)) and these layers get no gradient. Remove them from the LoRA targets "
            f"(--lora_targets; the defaults leave them out), or condition on several tokens (--adapter_tokens). "
            f"Found: {', '.join(useless[:4])}{' ...' if len(useless) > 4 else ''}"
        )


def install_single_token_attention(transformer: nn.Module, context_tokens: int) -> None:
    """Put `SingleTokenCrossAttnProcessor` on every cross-attention module; self-attention keeps its processor.

    `context_tokens` is what the caller will feed (the adapter's `num_tokens`): with 1, LoRA layers already on
    `attn2.to_q` / `attn2.to_k` are refused (`check_lora_targets`). The processor itself re-checks the context at
    every call, so a model given several tokens later still computes standard attention.
    """
    check_lora_targets(lora_layers(transformer), context_tokens)
    _set_cross_attention_processor(transformer, SingleTokenCrossAttnProcessor)


def install_standard_attention(transformer: nn.Module) -> None:
    """diffusers' `AttnProcessor2_0` on every cross-attention module: the reference for tests and benchmarks."""
    _set_cross_attention_processor(transformer, AttnProcessor2_0)
