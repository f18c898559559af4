"""What the mini stack's VAE, encoder and judge builds share: toy tiles as tensors, their augmentations, one AdamW loop.

A module of its own so that each part's builder (`mini_vae`, `mini_uni`, `judge.build_judge`) imports these without
importing another part; it stays apart from `toy_histology` so that drawing tiles does not need torch or diffusers.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from pixcell_ext import NCT_CLASSES
from pixcell_ext.data import dihedral, resized_uint8
from pixcell_ext.stacks.toy_histology import REFERENCE_SIZE, toy_tiles


def toy_arrays(domain: str, split: str, per_class: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, 3, size, size] tiles and their labels, resized from 224 px exactly as the data pipeline does."""
    images, labels = [], []
    tiles = toy_tiles(domain, split, per_class, REFERENCE_SIZE, seed)
    for class_index, _, tile in tqdm(tiles, total=per_class * len(NCT_CLASSES), desc=f"{domain} {split} tiles"):
        images.append(resized_uint8(Image.fromarray(tile), size))
        labels.append(class_index)
    return torch.stack(images), torch.tensor(labels)


def random_dihedral(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One of the eight flips and quarter turns per tile, drawn from `generator`: tissue has no up or left."""
    codes = torch.randint(0, 8, (len(pixels),), generator=generator).tolist()
    return torch.stack([dihedral(p, code) for p, code in zip(pixels, codes, strict=True)])


def stain_jitter(images: torch.Tensor, generator: torch.Generator, strength: float) -> torch.Tensor:
    """Scale each channel's optical density by a random factor: a lab's stain shift, not a change of tissue.

    `images` are floats in [0, 1]; the result too.
    """
    density = -torch.log(images.clamp(min=1 / 255))
    gains = torch.exp(strength * torch.randn(len(images), 3, 1, 1, generator=generator))
    bias = 0.5 * strength * torch.randn(len(images), 3, 1, 1, generator=generator).abs()
    return torch.exp(-(density * gains + bias)).clamp(0, 1)


def random_blur(images: torch.Tensor, generator: torch.Generator, max_sigma: float) -> torch.Tensor:
    """Gaussian blur of a random width in [0, max_sigma] px per image: the softening a 64 px VAE round trip adds.

    The judge must score morphology, not sharpness; without this it reads a decoded real TARGET tile as another
    class one time in four, which would cap the class fidelity any generator can reach.
    """
    radius = max(1, math.ceil(3 * max_sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    sigmas = max_sigma * torch.rand(len(images), generator=generator) + 1e-3
    kernels = torch.exp(-(offsets.view(1, -1) ** 2) / (2 * sigmas.view(-1, 1) ** 2))
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).repeat_interleave(3, dim=0)  # [3B, K]
    count, channels, height, width = images.shape
    flat = images.reshape(1, count * channels, height, width)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernels.view(-1, 1, 1, 2 * radius + 1),
                    groups=count * channels)  # fmt: skip
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernels.view(-1, 1, 2 * radius + 1, 1),
                    groups=count * channels)  # fmt: skip
    return flat.view(count, channels, height, width)


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_part(
    parameters: list[nn.Parameter],
    loss_fn: Callable[[int], torch.Tensor],
    steps: int,
    learning_rate: float,
    desc: str,
    weight_decay: float = 0.0,
) -> list[float]:
    """AdamW with warmup and cosine decay; `loss_fn(step)` draws its own batch. Returns the loss history."""
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _cosine_lr(step, steps, max(1, steps // 20)))
    history = []
    progress = tqdm(range(steps), desc=desc)
    for step in progress:
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        history.append(loss.item())
        if step % 10 == 0:
            progress.set_postfix(loss=f"{np.mean(history[-20:]):.4f}")
    return history
