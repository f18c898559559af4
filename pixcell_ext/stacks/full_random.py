"""The real-shape PixCell-256 stack with random weights, in the hub layouts, for rehearsing every script on a CPU.

No shape or dtype bug of the real models (28 blocks of width 1152, UNI2-h's 24 SwiGLU blocks of width 1536, the
SD3.5 VAE's four 128-512 channel blocks) can show with the tiny stack; this one has the real configs and goes
through the same loaders as the released checkpoints. Weights are stored in bf16 (2.7 GB instead of 5.5 GB);
the loaders cast them to the run's dtype.

    python -m pixcell_ext.stacks.full_random --output_dir full_random_assets/full
    python -m pixcell_ext.stacks.full_random --output_dir full_random_assets/reduced --reduced   # real widths, 2 blocks

`reduced` keeps every width and channel count that meets another model (1152, 1536, 16 latent channels) and
cuts the depth, and the VAE's internal widths, for a self-test in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from pixcell_ext import NCT_CLASSES
from pixcell_ext.files import write_folder_once, write_json_atomically
from pixcell_ext.stacks.tiny import write_tiny_dataset

# PixCell-256's transformer/config.json (604 tensors, 608.07 M values: /work/shared/docs/pixcell-facts.md).
PIXCELL_256_CONFIG = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 16,
    "out_channels": 32,
    "num_layers": 28,
    "cross_attention_dim": 1152,
    "sample_size": 32,
    "patch_size": 2,
    "caption_channels": 1536,
    "caption_num_tokens": 1,
    "interpolation_scale": 0.5,
    "use_additional_conditions": False,
    "norm_type": "ada_norm_single",
}
# stabilityai/stable-diffusion-3.5-large vae/config.json.
SD35_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
# PixCell's training noise schedule (IDDPM), as its scheduler/ folder gives it to DPM-Solver.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 1e-4,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
}
# Depth cuts of --reduced; every interface width stays real.
REDUCED_PIXCELL = {"num_layers": 2}
REDUCED_UNI = {"depth": 2}
REDUCED_VAE = {"block_out_channels": [32, 64, 128, 128], "layers_per_block": 1}
TILE_SIZE = 224  # NCT-CRC-HE tiles
DEFAULT_DIR = "full_random_assets"


@dataclass(frozen=True)
class FullRandomStack:
    pixcell: Path
    vae: Path
    uni: Path
    data: Path
    reduced: bool


def full_random_paths(root: str | os.PathLike, reduced: bool = False) -> FullRandomStack:
    root = Path(root)
    return FullRandomStack(root / "pixcell-256", root / "sd35-vae", root / "uni2-h", root / "tiles", reduced)


def _save_bf16(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state_dict.items()}, path)


def _write_pixcell(folder: Path, reduced: bool, device: torch.device) -> None:
    from diffusers import DPMSolverMultistepScheduler

    from pixcell_ext.model.networks import PixCellTransformer2DModel

    config = {**PIXCELL_256_CONFIG, **(REDUCED_PIXCELL if reduced else {})}
    with device:
        transformer = PixCellTransformer2DModel(**config).to(torch.bfloat16)
    with torch.no_grad():
        transformer.caption_projection.uncond_embedding.normal_()
    transformer.save_pretrained(folder / "transformer")  # bf16 tensors; from_pretrained casts to torch_dtype
    DPMSolverMultistepScheduler(**SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")


def _write_vae(folder: Path, reduced: bool, device: torch.device) -> None:
    from diffusers import AutoencoderKL

    with device:
        vae = AutoencoderKL(**{**SD35_VAE_CONFIG, **(REDUCED_VAE if reduced else {})})
    # A trained VAE has a narrow posterior; a random one has std ~1, which would bury the image under sampling noise.
    with torch.no_grad():
        vae.encoder.conv_out.bias[vae.config.latent_channels :].fill_(-8.0)
    vae.to(torch.bfloat16).save_pretrained(folder / "vae")


def _write_uni(folder: Path, reduced: bool, device: torch.device) -> None:
    """A hub-style folder: config.json (architecture + the JSON-expressible model args) and model.safetensors."""
    import timm

    from pixcell_ext.model.networks import UNI2H_ARCHITECTURE, uni2h_timm_kwargs

    kwargs = {**uni2h_timm_kwargs(), **(REDUCED_UNI if reduced else {})}
    with device:
        vit = timm.create_model(UNI2H_ARCHITECTURE, pretrained=False, **kwargs)
    _save_bf16(vit.state_dict(), folder / "model.safetensors")
    model_args = {k: v for k, v in kwargs.items() if isinstance(v, (int, float, bool))}
    config = {"architecture": UNI2H_ARCHITECTURE, "model_args": model_args, "num_features": kwargs["embed_dim"]}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def write_full_random_stack(
    root: str | os.PathLike,
    *,
    reduced: bool = False,
    images_per_class: int = 2,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> FullRandomStack:
    """Write (once) the three models and a small 224 px tile folder under `root`; complete parts are kept.

    `device` is where the random weights are drawn: a GPU does the 1.4 B draws in seconds, a CPU in minutes.
    """
    paths = full_random_paths(root, reduced)
    marker = Path(root) / "shapes.json"
    wanted = {"reduced": reduced}
    if marker.exists() and json.loads(marker.read_text()) != wanted:
        raise ValueError(
            f"'{root}' already holds a stack written with reduced={not reduced}: give another --output_dir for "
            f"reduced={reduced}."
        )
    Path(root).mkdir(parents=True, exist_ok=True)
    write_json_atomically(marker, wanted)
    for target, writer in ((paths.pixcell, _write_pixcell), (paths.vae, _write_vae), (paths.uni, _write_uni)):
        torch.manual_seed(seed)
        write_folder_once(target, lambda tmp, w=writer: w(tmp, reduced, torch.device(device)))
    write_tiny_dataset(paths.data, images_per_class=images_per_class, size=TILE_SIZE, seed=seed)
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=f"{DEFAULT_DIR}/full")
    parser.add_argument("--reduced", action="store_true", help="Real widths, 2 blocks per model: a quick self-test.")
    parser.add_argument("--images_per_class", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="Where to draw the random weights, e.g. cuda.")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    paths = write_full_random_stack(
        args.output_dir,
        reduced=args.reduced,
        images_per_class=args.images_per_class,
        seed=args.seed,
        device=args.device,
    )
    for name in ("pixcell", "vae", "uni", "data"):
        print(f"{name:8s} {getattr(paths, name)}")
    print(f"classes  {' '.join(NCT_CLASSES)}")


if __name__ == "__main__":
    main(parse_args())
