"""The trainable model as one module: UNI embedding -> adapter -> (optionally dropped) context -> PixCell.

Keeping adapter and transformer in one `nn.Module` gives DDP a single wrapper and a single forward, and the
condition dropout is a per-sample `torch.where` between the adapted positive and the adapted null embedding, so
every parameter takes part in every step and all processes see the same graph.
"""

from __future__ import annotations

import torch
from torch import nn

from pixcell_ext.adapter import UNIAdapter
from pixcell_ext.models import PixCellTransformer2DModel


class AdaptedPixCell(nn.Module):
    def __init__(self, transformer: PixCellTransformer2DModel, adapter: UNIAdapter):
        super().__init__()
        self.transformer = transformer
        self.adapter = adapter

    def context(self, uni_embedding: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Adapted context [B, T, C]; rows where `drop` is True get the adapted unconditional embedding instead."""
        dtype = self.transformer.dtype
        positive = self.adapter(uni_embedding, output_dtype=dtype)
        if drop is None:
            return positive
        null = self.adapter(self.transformer.unconditional_embedding(positive.shape[0]), output_dtype=dtype)
        return torch.where(drop.view(-1, 1, 1), null, positive)

    def unconditional_context(self, batch_size: int) -> torch.Tensor:
        null = self.transformer.unconditional_embedding(batch_size)
        return self.adapter(null, output_dtype=self.transformer.dtype)

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        uni_embedding: torch.Tensor,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        context = self.context(uni_embedding, drop)
        return self.transformer(noisy_latents.to(self.transformer.dtype), context, timestep=timesteps).sample
