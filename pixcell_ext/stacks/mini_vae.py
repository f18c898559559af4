"""Build the mini stack's VAE: a diffusers `AutoencoderKL` in SD3.5's layout, small enough to train on two CPU cores.

The committed VAE down-samples 8x, as SD3.5's does; `VAEConfig(block_out_channels=(16, 32, 64))` builds a 4x one
(16x16 latents at 64 px), an ablation of the latent size (benchmarks/RESULTS.md, issue 23).

It is trained on SOURCE and TARGET tiles (the real SD3.5 VAE was trained on broad data and must represent any lab's
tiles, or adaptation to TARGET could not show). Its `shift_factor`/`scaling_factor` are the mean and 1 / std of its
latents on the training tiles, as for SD3, so `(z - shift) * scale` is standardised. `python -m
pixcell_ext.stacks.mini_stack --parts vae` runs `build_vae` and writes `sd35-vae-mini/`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pixcell_ext.data import vae_input
from pixcell_ext.model import networks
from pixcell_ext.seeding import derived_seed
from pixcell_ext.stacks.mini import MINI_RESOLUTION
from pixcell_ext.stacks.mini_training import random_dihedral, toy_arrays, train_part
from pixcell_ext.stacks.toy_histology import DOMAINS


@dataclass(frozen=True)
class VAEConfig:
    block_out_channels: tuple[int, ...] = (16, 32, 64, 64)
    norm_num_groups: int = 8
    tiles_per_class: int = 64  # per domain
    steps: int = 1000
    batch_size: int = 16
    learning_rate: float = 2e-3
    kl_weight: float = 2e-7  # on the summed KL per tile: small, as in the LDM/SD autoencoders
    # The trained latents come out nearly standard (mean ~0, std ~0.93), so a dropped shift or scale would change
    # nothing. SD3.5's raw latents are not (shift 0.0609, scale 1.5305), and the mini stack must show such bugs: the
    # raw latent space is re-expressed as gain * z + offset, which moves shift * scale to about 0.5.
    latent_gain: float = 0.6
    latent_offset: float = 0.3
    decoder_steps: int = 600  # decoder-only fine-tuning after the re-expression (the encoder is then final)
    decoder_learning_rate: float = 5e-4


def mini_vae(config: VAEConfig):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(config.block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(config.block_out_channels),
        block_out_channels=config.block_out_channels,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=config.norm_num_groups,
        sample_size=MINI_RESOLUTION,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    # Start with a narrow posterior (std ~0.05), as a trained VAE has: at the default std ~1 the sampled latents are
    # mostly noise and the first hundreds of steps only learn to shrink it.
    with torch.no_grad():
        vae.encoder.conv_out.bias[16:].fill_(-6.0)
    return vae


@torch.no_grad()
def latent_statistics(
    vae, pixels: torch.Tensor, generator: torch.Generator, batch_size: int = 64
) -> tuple[float, float]:
    """Mean and std of posterior samples over `pixels`: SD3's `shift_factor` and 1 / `scaling_factor`."""
    samples = []
    for start in range(0, len(pixels), batch_size):
        dist = vae.encode(vae_input(pixels[start : start + batch_size])).latent_dist
        samples.append(dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator))
    latents = torch.cat(samples)
    return latents.mean().item(), latents.std().item()


@torch.no_grad()
def reconstruction_psnr(vae, pixels: torch.Tensor, batch_size: int = 64, sample: bool = False) -> float:
    """PSNR (dB, images in [0, 1]) of the pooled squared error, through the PixCell latent path.

    Encode to PixCell latents `(z - shift) * scale` and decode back (`networks.decode_latents`); with `sample` the
    posterior is sampled as training does, otherwise its mean is used.
    """
    errors = []
    generator = torch.Generator().manual_seed(0)
    for start in range(0, len(pixels), batch_size):
        images = vae_input(pixels[start : start + batch_size])
        mean, std = networks.encode_latent_distribution(vae, images)
        noise = torch.randn(mean.shape, generator=generator) if sample else torch.zeros_like(mean)
        latents = networks.posterior_latents(vae.config, mean, std, noise)
        decoded = networks.decode_latents(vae, latents)
        errors.append(((decoded - images) / 2).pow(2).flatten(1).mean(1))
    return 10 * math.log10(1 / torch.cat(errors).mean().item())


def offset_raw_latents(vae, gain: float, offset: float) -> None:
    """Re-express the VAE's raw latents as `gain * z + offset` without changing what they encode.

    The encoder side is exact (the posterior mean is scaled and offset, its std scaled). The decoder's first
    convolution takes the inverse, which is exact except where its zero padding now stands for a different latent
    value, on the border cells: the decoder fine-tuning that follows absorbs that.
    """
    with torch.no_grad():
        head = vae.encoder.conv_out
        channels = vae.config.latent_channels
        head.weight[:channels] *= gain
        head.bias[:channels] = gain * head.bias[:channels] + offset
        head.bias[channels:] += 2 * math.log(gain)
        first = vae.decoder.conv_in
        first.bias -= (offset / gain) * first.weight.sum(dim=(1, 2, 3))
        first.weight /= gain


def finish_vae(vae, train: torch.Tensor, seed: int, shift: float, std: float, config: VAEConfig) -> list[float]:
    """Second stage of the build, from the first stage's VAE and raw latent statistics `shift`, `std`.

    Re-expresses the raw latents (`offset_raw_latents`), writes the matching constants (the same statistics, moved
    by the same affine map, so PixCell latents `(z - shift) * scale` are unchanged), then fine-tunes the decoder alone.
    """
    offset_raw_latents(vae, config.latent_gain, config.latent_offset)
    vae.register_to_config(
        shift_factor=config.latent_gain * shift + config.latent_offset,
        scaling_factor=1.0 / (config.latent_gain * std),
    )
    generator = torch.Generator().manual_seed(derived_seed(seed, "vae-decoder"))
    vae.encoder.requires_grad_(False)

    def loss_fn(step: int) -> torch.Tensor:
        ids = torch.randint(0, len(train), (config.batch_size,), generator=generator)
        images = vae_input(random_dihedral(train[ids], generator))
        with torch.no_grad():
            dist = vae.encode(images).latent_dist
            latents = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator)
        return F.mse_loss(vae.decode(latents).sample, images)

    vae.decoder.train()
    history = train_part(
        list(vae.decoder.parameters()), loss_fn, config.decoder_steps, config.decoder_learning_rate, "vae decoder"
    )
    vae.eval()
    return history


def heldout_psnr(vae, seed: int, suffix: str = "") -> dict:
    metrics = {}
    for domain in DOMAINS:
        heldout, _ = toy_arrays(domain, "heldout", 8, MINI_RESOLUTION, seed)
        metrics[f"psnr_heldout_{domain}{suffix}"] = round(reconstruction_psnr(vae, heldout), 2)
        metrics[f"psnr_heldout_{domain}{suffix}_sampled"] = round(reconstruction_psnr(vae, heldout, sample=True), 2)
    return metrics


def build_vae(folder: Path, seed: int, config: VAEConfig = VAEConfig()) -> dict:
    """Train the mini VAE on SOURCE + TARGET train tiles and save it to `folder/vae` with measured latent constants."""
    torch.manual_seed(seed)
    train = torch.cat([toy_arrays(d, "train", config.tiles_per_class, MINI_RESOLUTION, seed)[0] for d in DOMAINS])
    vae = mini_vae(config)
    generator = torch.Generator().manual_seed(seed)

    def loss_fn(step: int) -> torch.Tensor:
        ids = torch.randint(0, len(train), (config.batch_size,), generator=generator)
        images = vae_input(random_dihedral(train[ids], generator))
        dist = vae.encode(images).latent_dist
        latents = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator)
        decoded = vae.decode(latents).sample
        return F.mse_loss(decoded, images) + config.kl_weight * dist.kl().mean()

    vae.train()
    history = train_part(list(vae.parameters()), loss_fn, config.steps, config.learning_rate, "vae")
    vae.eval()
    shift, std = latent_statistics(vae, train, generator)
    vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / std)
    metrics = {"first_stage_shift_factor": shift, "first_stage_scaling_factor": 1.0 / std}
    metrics.update(heldout_psnr(vae, seed, "_first_stage"))
    metrics["final_train_mse_first_stage"] = float(np.mean(history[-50:]))
    decoder_history = finish_vae(vae, train, seed, shift, std, config)
    vae.save_pretrained(folder / "vae")
    metrics.update(
        shift_factor=vae.config.shift_factor,
        scaling_factor=vae.config.scaling_factor,
        final_train_mse=float(np.mean(decoder_history[-50:])),
        **heldout_psnr(vae, seed),
    )
    return {"metrics": metrics, "config": asdict(config), "train_tiles": len(train)}
