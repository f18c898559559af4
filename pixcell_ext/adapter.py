"""The trainable UNI2-h -> PixCell adapter: a residual MLP in UNI space that starts as the identity.

Starting as the identity (last layer zero) means step 0 of training is exactly the released PixCell, so anything the
adapter learns is a correction to a model that already works, never a re-learning of the conditioning. The adapter
is applied to the positive and to the unconditional embedding alike, so classifier-free guidance compares two points
of the same adapted space.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

ADAPTER_FILE = "adapter.safetensors"


@dataclass
class AdapterConfig:
    embed_dim: int = 1536
    num_tokens: int = 1
    hidden_dim: int = 1024


class UNIAdapter(nn.Module):
    """[B, 1, C] UNI embedding -> [B, T, C] context tokens, `x + MLP(LayerNorm(x))` per token.

    Parameters stay fp32 under mixed precision (they are what is trained); the output is cast to `output_dtype`,
    the transformer's dtype.
    """

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config
        self.norm = nn.LayerNorm(config.embed_dim)
        self.fc1 = nn.Linear(config.embed_dim, config.hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.hidden_dim, config.num_tokens * config.embed_dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, embedding: torch.Tensor, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        if embedding.ndim == 2:
            embedding = embedding.unsqueeze(1)
        if embedding.shape[1] != 1:
            raise ValueError(f"The adapter takes one UNI token per image, [B, 1, C]; got {tuple(embedding.shape)}.")
        x = embedding.to(self.fc1.weight.dtype)
        batch, tokens, dim = x.shape[0], self.config.num_tokens, self.config.embed_dim
        delta = self.fc2(self.act(self.fc1(self.norm(x)))).view(batch, tokens, dim)
        context = x.expand(batch, tokens, dim) + delta
        return context.to(output_dtype or embedding.dtype)


def save_adapter(adapter: UNIAdapter, path: str | os.PathLike) -> None:
    """Safetensors with the config in the metadata, written to a temporary name and renamed (never half-written)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().float().contiguous().cpu() for k, v in adapter.state_dict().items()}
    save_file(state, tmp, metadata={"format": "pt", "adapter_config": json.dumps(asdict(adapter.config))})
    os.replace(tmp, path)


def load_adapter(path: str | os.PathLike) -> UNIAdapter:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "adapter_config" not in metadata:
        raise ValueError(f"'{path}' has no adapter_config metadata: it was not written by save_adapter.")
    adapter = UNIAdapter(AdapterConfig(**json.loads(metadata["adapter_config"])))
    adapter.load_state_dict(load_file(str(path)), strict=True)
    return adapter
