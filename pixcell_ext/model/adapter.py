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

import torch
from safetensors.torch import load_file
from torch import nn

from pixcell_ext.files import save_safetensors_atomically
from pixcell_ext.model.lora_files import reporting_damage

ADAPTER_FILE = "adapter.safetensors"


@dataclass
class AdapterConfig:
    embed_dim: int = 1536
    num_tokens: int = 1
    hidden_dim: int = 1024
    # Class-aware parts (absent in adapters saved before they existed; the defaults keep those loading).
    class_names: tuple[str, ...] = ()
    class_conditioning: bool = False
    class_head: bool = False

    def __post_init__(self) -> None:
        self.class_names = tuple(self.class_names)
        if (self.class_conditioning or self.class_head) and not self.class_names:
            raise ValueError("Class conditioning and the class head need the list of class names.")


class UNIAdapter(nn.Module):
    """[B, 1, C] UNI embedding -> [B, T, C] context tokens, `x + MLP(LayerNorm(x))` per token.

    Parameters stay fp32 under mixed precision (they are what is trained); the output is cast to `output_dtype`,
    the transformer's dtype. Optional class parts: a class embedding added to every context token (zero at start,
    so step 0 is still exactly PixCell) and a linear class head that reads the adapted context before the class
    embedding is added (after it, the head could just read the label back).
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
        num_classes = len(config.class_names)
        self.class_embedding = nn.Embedding(num_classes, config.embed_dim) if config.class_conditioning else None
        if self.class_embedding is not None:
            nn.init.zeros_(self.class_embedding.weight)
        self.class_head = nn.Linear(config.embed_dim, num_classes) if config.class_head else None

    def class_ids(self, names: list[str]) -> torch.Tensor:
        """Indices of class names in this adapter's own class list; refuses classes it was not trained on."""
        unknown = sorted(set(names) - set(self.config.class_names))
        if unknown:
            raise ValueError(
                f"This adapter was trained on the classes {list(self.config.class_names)}; it has no class "
                f"{unknown}. Use those class names, or an adapter trained with these classes."
            )
        return torch.tensor([self.config.class_names.index(n) for n in names], device=self.fc1.weight.device)

    def adapt(self, embedding: torch.Tensor) -> torch.Tensor:
        """The residual MLP alone: [B, 1, C] -> fp32 [B, T, C]."""
        if embedding.ndim == 2:
            embedding = embedding.unsqueeze(1)
        if embedding.shape[1] != 1:
            raise ValueError(f"The adapter takes one UNI token per image, [B, 1, C]; got {tuple(embedding.shape)}.")
        x = embedding.to(self.fc1.weight.dtype)
        batch, tokens, dim = x.shape[0], self.config.num_tokens, self.config.embed_dim
        delta = self.fc2(self.act(self.fc1(self.norm(x)))).view(batch, tokens, dim)
        return x.expand(batch, tokens, dim) + delta

    def classify(self, context: torch.Tensor) -> torch.Tensor:
        return self.class_head(context.mean(dim=1))

    def forward(
        self,
        embedding: torch.Tensor,
        output_dtype: torch.dtype | None = None,
        class_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        context = self.adapt(embedding)
        if class_ids is not None:
            if self.class_embedding is None:
                raise ValueError("Class ids were given to an adapter trained without --class_conditioning.")
            context = context + self.class_embedding(class_ids).unsqueeze(1)
        return context.to(output_dtype or embedding.dtype)


def save_adapter(adapter: UNIAdapter, path: str | os.PathLike) -> None:
    """Safetensors with the config in the metadata, written to a temporary name and renamed (never half-written)."""
    state = {k: v.detach().float().contiguous().cpu() for k, v in adapter.state_dict().items()}
    metadata = {"format": "pt", "adapter_config": json.dumps(asdict(adapter.config))}
    save_safetensors_atomically(state, path, metadata=metadata)


def read_adapter_config(path: str | os.PathLike) -> AdapterConfig:
    """The config stored in an adapter file, without loading its weights."""
    from safetensors import safe_open

    with reporting_damage(path), safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "adapter_config" not in metadata:
        raise ValueError(f"'{path}' has no adapter_config metadata: it was not written by save_adapter.")
    return AdapterConfig(**json.loads(metadata["adapter_config"]))


def load_adapter(path: str | os.PathLike) -> UNIAdapter:
    adapter = UNIAdapter(read_adapter_config(path))
    with reporting_damage(path):
        state = load_file(str(path))
    adapter.load_state_dict(state, strict=True)
    return adapter
