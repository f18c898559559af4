"""The trainable model as one module: UNI embedding -> adapter -> (optionally dropped) context -> PixCell.

Keeping adapter and transformer in one `nn.Module` gives DDP a single wrapper and a single forward, and the
condition dropout is a per-sample `torch.where` between the adapted positive and the adapted null embedding, so
every parameter takes part in every step and all processes see the same graph.

With class conditioning there are three kinds of context: reference + class (the UNI embedding of a real tile plus
the class embedding), class alone (the null UNI embedding plus the class embedding, learned by replacing the
reference with the null embedding for a fraction of samples, `uni_drop`) and unconditional (null, no class), which
classifier-free guidance contrasts with the other two.
"""

from __future__ import annotations

import torch
from torch import nn

from pixcell_ext.model.adapter import UNIAdapter
from pixcell_ext.model.attention import install_single_token_attention
from pixcell_ext.model.networks import PixCellTransformer2DModel


class AdaptedPixCell(nn.Module):
    def __init__(self, transformer: PixCellTransformer2DModel, adapter: UNIAdapter):
        super().__init__()
        install_single_token_attention(transformer, adapter.config.num_tokens)
        self.transformer = transformer
        self.adapter = adapter

    def context(
        self,
        uni_embedding: torch.Tensor,
        drop: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        uni_drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Adapted context [B, T, C] in the transformer's dtype.

        Rows where `drop` is True get the adapted unconditional embedding; with class conditioning, `labels` add the
        class embedding and rows where `uni_drop` is True keep the class but lose the reference.
        """
        dtype = self.transformer.dtype
        class_ids = labels if self.adapter.class_embedding is not None else None
        null = self.transformer.unconditional_embedding(uni_embedding.shape[0])
        if uni_drop is not None and class_ids is not None:
            uni_embedding = torch.where(uni_drop.view(-1, 1, 1), null.to(uni_embedding.dtype), uni_embedding)
        positive = self.adapter(uni_embedding, output_dtype=dtype, class_ids=class_ids)
        if drop is None:
            return positive
        return torch.where(drop.view(-1, 1, 1), self.adapter(null, output_dtype=dtype), positive)

    def unconditional_context(self, batch_size: int) -> torch.Tensor:
        null = self.transformer.unconditional_embedding(batch_size)
        return self.adapter(null, output_dtype=self.transformer.dtype)

    def class_only_context(self, class_ids: torch.Tensor) -> torch.Tensor:
        """Context for a class with no reference tile: the null UNI embedding plus the class embedding."""
        null = self.transformer.unconditional_embedding(class_ids.shape[0])
        return self.adapter(null, output_dtype=self.transformer.dtype, class_ids=class_ids)

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        uni_embedding: torch.Tensor,
        drop: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        uni_drop: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(transformer output, class logits of the adapted reference or None without a class head)."""
        context = self.context(uni_embedding, drop, labels, uni_drop)
        prediction = self.transformer(noisy_latents.to(self.transformer.dtype), context, timestep=timesteps).sample
        logits = None
        if self.adapter.class_head is not None:
            logits = self.adapter.classify(self.adapter.adapt(uni_embedding))
        return prediction, logits
