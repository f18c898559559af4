"""The independent judge of the mini stack: a small classifier trained on TARGET tiles, never used for conditioning.

It scores the class fidelity of generated tiles (does a tile generated for LYM look like LYM to a model that learnt
TARGET's classes?) and gives a second feature space for FD/KID that the generator never saw. Saved as a timm state
dict plus `config.json`, so the evaluation's timm encoder path can read it too (`--timm_encoder <architecture>
--timm_encoder_weights judge/model.safetensors --timm_encoder_kwargs <model_args> --timm_image_size <image_size>
--timm_mean ... --timm_std ...`, all read from that config).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pixcell_ext.models import IMAGENET_MEAN, IMAGENET_STD

JUDGE_MEAN = IMAGENET_MEAN
JUDGE_STD = IMAGENET_STD


def judge_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 or [0, 1] images [B, 3, H, W] -> [0, 1] at `size` px (bicubic, antialiased, as UNIEncoder resizes)."""
    images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return images


class Judge(nn.Module):
    """Images of any size -> class logits; resizing and normalisation are part of the model."""

    def __init__(self, network: nn.Module, image_size: int, mean, std):
        super().__init__()
        self.network = network
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network((judge_input(images, self.image_size) - self.mean) / self.std)


def judge_config(path: str | os.PathLike) -> dict:
    """The judge's `config.json`: architecture, model_args, image_size, mean, std, class_names."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"'{path}' is not a judge folder: it has no config.json (build it with "
            "`python -m pixcell_ext.mini_stack --parts judge`)."
        )
    return json.loads(config_file.read_text())


def load_judge(path: str | os.PathLike) -> tuple[Judge, list[str]]:
    """The frozen judge in eval mode and its class names (the order of its logits)."""
    import timm
    from safetensors.torch import load_file

    config = judge_config(path)
    network = timm.create_model(
        config["architecture"], pretrained=False, num_classes=config["num_classes"], **config["model_args"]
    )
    network.load_state_dict(load_file(Path(path) / "model.safetensors"), strict=True)
    judge = Judge(network, config["image_size"], config["mean"], config["std"])
    return judge.requires_grad_(False).eval(), list(config["class_names"])


def timm_extractor_arguments(path: str | os.PathLike) -> tuple[str, str, dict]:
    """(architecture, weights file, options) for `timm_extractor`: the judge's pooled features as a feature space.

    The options carry its input size and normalisation; timm's defaults for the architecture would be wrong here.
    """
    config = judge_config(path)
    options = {
        "image_size": config["image_size"],
        "mean": tuple(config["mean"]),
        "std": tuple(config["std"]),
        "model_kwargs": dict(config["model_args"]),
    }
    return config["architecture"], str(Path(path) / "model.safetensors"), options
