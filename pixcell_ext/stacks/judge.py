"""The independent judge of the mini stack: a small classifier trained on TARGET tiles, never used for conditioning.

Its training tiles come from a toy stream of their own (split ``"judge"``), disjoint from the TARGET train tiles
the generator adapts on and from every held-out set the benchmarks compare with: the generator never saw them.

It scores the class fidelity of generated tiles (does a tile generated for LYM look like LYM to a model that learnt
TARGET's classes?) and gives a second feature space for FD/KID that the generator never saw. Saved as a timm state
dict plus `config.json`, so the evaluation's timm encoder path can read it too (`--timm_encoder <architecture>
--timm_encoder_weights judge/model.safetensors --timm_encoder_kwargs <model_args> --timm_image_size <image_size>
--timm_mean ... --timm_std ...`, all read from that config).

The loader and the builder (`build_judge`, run by `python -m pixcell_ext.stacks.mini_stack --parts judge`) live together
so that the config the one writes and the other reads are defined in one place.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pixcell_ext import NCT_CLASSES
from pixcell_ext.files import write_json_atomically
from pixcell_ext.model.networks import IMAGENET_MEAN, IMAGENET_STD

JUDGE_MEAN = IMAGENET_MEAN
JUDGE_STD = IMAGENET_STD
JUDGE_ARCHITECTURE = "resnet10t"
JUDGE_MODEL_ARGS = {"channels": [16, 32, 64, 128], "stem_width": 16}
JUDGE_IMAGE_SIZE = 64


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
            "`python -m pixcell_ext.stacks.mini_stack --parts judge`)."
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


@dataclass(frozen=True)
class JudgeConfig:
    tiles_per_class: int = 80
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 3e-3
    stain_jitter: float = 0.05
    blur_sigma: float = 1.5
    train_split: str = "judge"  # the toy stream; "train" would be the adaptation tiles themselves


def build_judge(folder: Path, seed: int, config: JudgeConfig = JudgeConfig()) -> dict:
    """Train a small timm ResNet on TARGET tiles of its own stream at JUDGE_IMAGE_SIZE px; save weights and a config."""
    import timm
    from safetensors.torch import save_file

    from pixcell_ext.stacks.mini_training import random_blur, random_dihedral, stain_jitter, toy_arrays, train_part
    from pixcell_ext.stacks.toy_histology import DOMAINS, REFERENCE_SIZE

    torch.manual_seed(seed)
    pixels, labels = toy_arrays("target", config.train_split, config.tiles_per_class, REFERENCE_SIZE, seed)
    small = judge_input(pixels, JUDGE_IMAGE_SIZE)  # [0, 1] at the judge's size, resized as load_judge does
    network = timm.create_model(JUDGE_ARCHITECTURE, pretrained=False, num_classes=len(NCT_CLASSES), **JUDGE_MODEL_ARGS)
    mean = torch.tensor(JUDGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(JUDGE_STD).view(1, 3, 1, 1)
    generator = torch.Generator().manual_seed(seed)

    def loss_fn(step: int) -> torch.Tensor:
        ids = torch.randint(0, len(small), (config.batch_size,), generator=generator)
        images = stain_jitter(random_dihedral(small[ids], generator), generator, config.stain_jitter)
        images = random_blur(images, generator, config.blur_sigma)
        return F.cross_entropy(network((images - mean) / std), labels[ids])

    network.train()
    history = train_part(list(network.parameters()), loss_fn, config.steps, config.learning_rate, "judge", 0.01)
    network.eval()
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, folder / "model.safetensors")
    write_json_atomically(
        folder / "config.json",
        {
            "architecture": JUDGE_ARCHITECTURE,
            "model_args": JUDGE_MODEL_ARGS,
            "num_classes": len(NCT_CLASSES),
            "class_names": list(NCT_CLASSES),
            "image_size": JUDGE_IMAGE_SIZE,
            "mean": list(JUDGE_MEAN),
            "std": list(JUDGE_STD),
        },
    )
    judge, class_names = load_judge(folder)
    metrics = {"final_train_loss": float(np.mean(history[-50:]))}
    for domain in DOMAINS:
        test_x, test_y = toy_arrays(domain, "heldout", 20, REFERENCE_SIZE, seed)
        with torch.no_grad():
            predicted = judge(test_x).argmax(1)
        metrics[f"accuracy_heldout_{domain}"] = round((predicted == test_y).float().mean().item(), 4)
    return {"metrics": metrics, "config": asdict(config), "train_tiles": len(pixels)}
