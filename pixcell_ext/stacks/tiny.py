"""A complete tiny local stack with random weights, and a tiny 9-class tile folder, for offline runs and tests.

The snapshot has the real classes and file layout (PixCell `transformer/` + `scheduler/`, SD3.5-style `vae/`,
a hub-style UNI2-h folder), so it goes through exactly the loaders that real checkpoints use.

    python -m pixcell_ext.stacks.tiny --output_dir tiny_assets
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from pixcell_ext import NCT_CLASSES
from pixcell_ext.files import write_folder_once

TINY_RESOLUTION = 64
TINY_UNI_WIDTH = 32


@dataclass(frozen=True)
class TinyStack:
    pixcell: Path
    vae: Path
    uni: Path
    data: Path


def tiny_stack_paths(root: str | os.PathLike) -> TinyStack:
    root = Path(root)
    return TinyStack(root / "pixcell-256-tiny", root / "sd35-vae-tiny", root / "uni2h-tiny", root / "nct-tiny")


def _write_pixcell(folder: Path) -> None:
    from diffusers import DPMSolverMultistepScheduler

    from pixcell_ext.model.networks import PixCellTransformer2DModel

    transformer = PixCellTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=16,
        out_channels=32,
        num_layers=4,
        cross_attention_dim=32,
        sample_size=TINY_RESOLUTION // 8,
        caption_channels=TINY_UNI_WIDTH,
        interpolation_scale=0.5,
    )
    with torch.no_grad():
        transformer.caption_projection.uncond_embedding.normal_()
    transformer.save_pretrained(folder / "transformer")
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon"
    )
    scheduler.save_pretrained(folder / "scheduler")


def _write_vae(folder: Path) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        sample_size=TINY_RESOLUTION,
        scaling_factor=1.5305,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    # A trained VAE has a narrow posterior; a random one has std ~1, which would bury the image under sampling noise.
    with torch.no_grad():
        vae.encoder.conv_out.bias[16:].fill_(-8.0)
    vae.save_pretrained(folder / "vae")


def _write_uni(folder: Path) -> None:
    import timm

    from pixcell_ext.model.networks import UNI2H_ARCHITECTURE, uni2h_timm_kwargs

    model_args = {"depth": 2, "num_heads": 2, "embed_dim": TINY_UNI_WIDTH}
    vit = timm.create_model(UNI2H_ARCHITECTURE, pretrained=False, **{**uni2h_timm_kwargs(), **model_args})
    # UNI2-h's LayerScale starts at 1e-5, which makes an untrained twin map every image to nearly the same vector.
    # Trained UNI2-h separates tissues; a tiny twin should too, or nothing downstream of it can be tested.
    with torch.no_grad():
        for name, parameter in vit.named_parameters():
            if name.endswith((".ls1.gamma", ".ls2.gamma")):
                parameter.fill_(1.0)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(
        json.dumps({"architecture": UNI2H_ARCHITECTURE, "model_args": model_args, "num_features": TINY_UNI_WIDTH})
    )


def _tile(rng: np.random.Generator, class_index: int, size: int) -> np.ndarray:
    """A tile whose colour and stripe frequency depend on its class, so a simple classifier can tell classes apart."""
    hue = np.array([(class_index * 97) % 256, (class_index * 53 + 80) % 256, (class_index * 31 + 160) % 256])
    yy, xx = np.mgrid[0:size, 0:size]
    angle = rng.uniform(0, np.pi)
    stripes = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * (0.05 + 0.03 * class_index))
    image = hue[None, None, :] * (0.75 + 0.25 * stripes[..., None]) + rng.normal(0, 12, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_tiny_dataset(folder: str | os.PathLike, images_per_class: int = 4, size: int = 224, seed: int = 0) -> Path:
    """Nine NCT class folders of RGB tiles; every other tile is a TIFF, as in NCT-CRC-HE-100K."""
    folder = Path(folder)

    def write(tmp: Path) -> None:
        rng = np.random.default_rng(seed)
        for class_index, name in enumerate(NCT_CLASSES):
            (tmp / name).mkdir()
            for i in range(images_per_class):
                suffix = "tif" if i % 2 == 0 else "png"
                Image.fromarray(_tile(rng, class_index, size)).save(tmp / name / f"{name}-{i:08d}.{suffix}")

    return write_folder_once(folder, write)


def write_tiny_stack(root: str | os.PathLike, seed: int = 0) -> TinyStack:
    """Write (once) every tiny model and the tiny dataset under `root`; existing complete parts are kept."""
    paths = tiny_stack_paths(root)
    for target, writer in ((paths.pixcell, _write_pixcell), (paths.vae, _write_vae), (paths.uni, _write_uni)):
        torch.manual_seed(seed)
        write_folder_once(target, writer)
    write_tiny_dataset(paths.data, seed=seed)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the tiny random-weight PixCell stack and a tiny NCT-like set.")
    parser.add_argument("--output_dir", default="tiny_assets")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    paths = write_tiny_stack(args.output_dir, seed=args.seed)
    for name, path in vars(paths).items():
        print(f"{name:8s} {path}")


if __name__ == "__main__":
    main()
