"""Pretrain the mini PixCell transformer on SOURCE tiles the way PixCell itself was pretrained.

PixCell is an IDDPM (Nichol & Dhariwal 2021): 1000 steps, linear betas 1e-4..0.02, an epsilon half and a
learned-variance half in the output, trained with L_hybrid = L_simple + lambda * L_vlb (lambda = 0.001), the
variance interpolating in log space between beta_t and the true posterior variance, and the VLB term seeing the
mean through a stop-gradient so that it only trains the variance. The condition is one embedding token of the
encoder, dropped to a learned null embedding for 10 % of the samples (the embedding later used for guidance).
Writing the objective here, instead of borrowing the MSE-only fine-tuning loss, gives the mini model a variance
half that means what PixCell's does, so code that confuses the two halves is caught by tests.

Features are computed once (VAE posterior mean/std and the encoder embedding of every tile) and training draws
posterior samples, timesteps, noise and dropout from one seeded generator, so the build is a function of its seed.

    python -m pixcell_ext.stacks.mini_stack --output_dir pixcell_ext/assets/mini --parts transformer
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pixcell_ext import data
from pixcell_ext.files import replace_folder
from pixcell_ext.model import networks
from pixcell_ext.model.networks import PixCellTransformer2DModel
from pixcell_ext.seeding import derived_seed
from pixcell_ext.stacks.mini import MINI_RESOLUTION, PART_FOLDERS

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02


@dataclass(frozen=True)
class PretrainingConfig:
    """Architecture and optimisation of the mini transformer. The defaults are the committed build."""

    num_layers: int = 6
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    # One token per latent pixel (an 8x8 grid). Patch 2 (16 tokens) reached twice the judge-space FD after 2000 steps
    # (65.8 vs 33.5 on held-out SOURCE, guidance 1): too little room for morphology at this width.
    patch_size: int = 1
    # PixCell-256 steps its sin-cos positions by one per patch; a scale of 1 keeps that step on the 8x8 grid.
    interpolation_scale: float = 1.0
    batch_size: int = 32
    num_steps: int = 8000
    learning_rate: float = 5e-4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    cond_dropout: float = 0.1
    # "fixed": PixCell's null, a random vector (randn / sqrt(C)) the optimiser never sees; "learned": trained from the
    # mean embedding.
    null_embedding: str = "learned"
    # Multiplies the caption projection's output layer at initialisation: how loudly the condition token enters every
    # block's cross-attention against the timestep-modulated residual stream when training starts.
    caption_scale: float = 1.0
    vlb_weight: float = 1e-3
    ema_decay: float = 0.998
    seed: int = 0


# ------------------------------------------------------------------------------------------------------------------
# IDDPM objective
# ------------------------------------------------------------------------------------------------------------------


class GaussianDiffusion:
    """The IDDPM quantities of a linear beta schedule, in float64 and indexed by integer timesteps in [0, T)."""

    def __init__(
        self, num_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = BETA_START, beta_end: float = BETA_END
    ):
        self.num_timesteps = num_timesteps
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self.posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # The posterior variance is 0 at t = 0; as in IDDPM its log is clipped to the value at t = 1.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod)

    def _at(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.to(like.device)[t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        abar = self._at(self.alphas_cumprod, t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def predicted_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        abar = self._at(self.alphas_cumprod, t, x_t)
        return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean of q(x_{t-1} | x_t, x_0)."""
        return self._at(self.posterior_mean_coef1, t, x_t) * x0 + self._at(self.posterior_mean_coef2, t, x_t) * x_t

    def posterior_log_variance(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self._at(self.posterior_log_variance_clipped, t, like)

    def model_log_variance(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """IDDPM's learned range: log sigma^2 = f log beta_t + (1 - f) log beta~_t with f = (v + 1) / 2."""
        fraction = (v + 1) / 2
        max_log = self._at(torch.log(self.betas), t, v)
        min_log = self._at(self.posterior_log_variance_clipped, t, v)
        return fraction * max_log + (1 - fraction) * min_log


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def vlb_term(
    diffusion: GaussianDiffusion,
    eps: torch.Tensor,
    v: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
) -> torch.Tensor:
    """Per-sample L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) in bits per dimension.

    The model mean comes from a detached epsilon (L_hybrid's stop-gradient: the VLB trains the variance only).
    Latents are continuous, so pixel-space IDDPM's discretised decoder term at t = 0 has no counterpart here; t = 0
    uses the same KL with the clipped posterior variance.
    """
    true_mean = diffusion.posterior_mean(x0, x_t, t)
    true_log_variance = diffusion.posterior_log_variance(t, x_t).expand_as(x_t)
    model_mean = diffusion.posterior_mean(diffusion.predicted_x0(x_t, t, eps.detach()), x_t, t)
    model_log_variance = diffusion.model_log_variance(v, t)
    kl = normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)
    return kl.flatten(1).mean(dim=1) / math.log(2.0)


@dataclass
class HybridLoss:
    total: torch.Tensor
    mse: torch.Tensor
    vlb: torch.Tensor


def hybrid_loss(
    diffusion: GaussianDiffusion,
    model_output: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    vlb_weight: float = 1e-3,
) -> HybridLoss:
    """L_hybrid for an output [B, 2C, H, W] = [epsilon | variance]; all terms are batch means.

    L_vlb sums L_t over the T timesteps, so a uniformly drawn t estimates it as T * L_t: the VLB term is
    `vlb_weight * T * L_t` (with T = 1000 and lambda = 0.001 that is L_t itself, as in IDDPM's code).
    """
    channels = x0.shape[1]
    eps, v = model_output[:, :channels].float(), model_output[:, channels:].float()
    mse = F.mse_loss(eps, noise.float(), reduction="none").flatten(1).mean(dim=1)
    vlb = vlb_term(diffusion, eps, v, x0.float(), x_t.float(), t) * diffusion.num_timesteps
    return HybridLoss((mse + vlb_weight * vlb).mean(), mse.mean(), vlb.mean())


# ------------------------------------------------------------------------------------------------------------------
# Features
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class SourceFeatures:
    latent_mean: torch.Tensor  # [N, C, h, w] raw VAE posterior mean
    latent_std: torch.Tensor  # [N, C, h, w]
    embedding: torch.Tensor  # [N, 1, D] encoder embedding
    labels: torch.Tensor  # [N]
    class_names: list[str]


@torch.no_grad()
def encode_folder(
    folder: str | os.PathLike, vae, uni: networks.UNIEncoder, resolution: int, batch_size: int = 64
) -> SourceFeatures:
    """VAE posterior and encoder embedding of every tile of a class folder, through the project's own readers."""
    index = data.scan_image_folder(folder)
    dataset = data.TileDataset(index, resolution)
    means, stds, embeddings = [], [], []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        vae_pixels = torch.stack([item["vae_pixels"] for item in items])
        mean, std = networks.encode_latent_distribution(vae, data.vae_input(vae_pixels))
        means.append(mean)
        stds.append(std)
        embeddings.append(uni(torch.stack([item["uni_pixels"] for item in items])).float())
    labels = torch.tensor([record.label for record in index.records])
    return SourceFeatures(torch.cat(means), torch.cat(stds), torch.cat(embeddings), labels, list(index.class_names))


# ------------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------------


def mini_transformer(config: PretrainingConfig, caption_channels: int, latent_size: int) -> PixCellTransformer2DModel:
    width = config.num_attention_heads * config.attention_head_dim
    transformer = PixCellTransformer2DModel(
        num_attention_heads=config.num_attention_heads,
        attention_head_dim=config.attention_head_dim,
        in_channels=16,
        out_channels=32,
        num_layers=config.num_layers,
        cross_attention_dim=width,
        sample_size=latent_size,
        patch_size=config.patch_size,
        caption_channels=caption_channels,
        interpolation_scale=config.interpolation_scale,
    )
    with torch.no_grad():
        transformer.caption_projection.linear_2.weight.mul_(config.caption_scale)
        transformer.caption_projection.linear_2.bias.mul_(config.caption_scale)
    return transformer


def null_embedding(config: PretrainingConfig, embedding: torch.Tensor) -> torch.Tensor:
    """The starting null embedding [1, C]: PixCell's fixed `randn / sqrt(C)` (from a generator of its own, so the
    training draws are the same either way), or the mean embedding, a neutral point to learn from."""
    if config.null_embedding == "fixed":
        channels = embedding.shape[-1]
        generator = torch.Generator().manual_seed(derived_seed(config.seed, "null-embedding"))
        return torch.randn(1, channels, generator=generator) / math.sqrt(channels)
    if config.null_embedding == "learned":
        return embedding.mean(dim=(0, 1)).view(1, -1).clone()
    raise ValueError(f"null_embedding must be 'fixed' or 'learned', not {config.null_embedding!r}.")


def pretrain(
    transformer: PixCellTransformer2DModel,
    features: SourceFeatures,
    vae_config,
    config: PretrainingConfig,
    log: Callable[[str], None] = print,
    on_snapshot: Callable[[int, PixCellTransformer2DModel], None] | None = None,
    snapshot_every: int = 0,
) -> dict:
    """Train `transformer` in place on the features; its weights end as the EMA, its null embedding as configured.

    The null embedding is a buffer in the released class; a learned one is trained here as a parameter and copied
    into the buffer at the end. `on_snapshot(step, model)` receives an EMA copy every `snapshot_every` updates, for
    studies of training length that need not retrain.
    """
    generator = torch.Generator().manual_seed(config.seed)
    diffusion = GaussianDiffusion()
    null = nn.Parameter(null_embedding(config, features.embedding), requires_grad=config.null_embedding == "learned")
    parameters = [*transformer.parameters(), null] if null.requires_grad else list(transformer.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / config.warmup_steps))
    ema = [p.detach().clone() for p in parameters]
    transformer.train()
    count = features.labels.shape[0]
    started = time.perf_counter()
    history = []
    for step in range(config.num_steps):
        ids = torch.randint(0, count, (config.batch_size,), generator=generator)
        posterior_noise = torch.randn(features.latent_mean[ids].shape, generator=generator)
        x0 = networks.posterior_latents(
            vae_config, features.latent_mean[ids], features.latent_std[ids], posterior_noise
        )
        t = torch.randint(0, diffusion.num_timesteps, (config.batch_size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        drop = torch.rand(config.batch_size, generator=generator) < config.cond_dropout
        x_t = diffusion.q_sample(x0, t, noise)
        condition = torch.where(drop.view(-1, 1, 1), null.unsqueeze(0), features.embedding[ids])
        output = transformer(x_t, condition, timestep=t).sample
        loss = hybrid_loss(diffusion, output, x0, x_t, t, noise, config.vlb_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            for average, parameter in zip(ema, parameters, strict=True):
                average.lerp_(parameter.detach(), 1 - decay)
        history.append((loss.mse.item(), loss.vlb.item()))
        if (step + 1) % 100 == 0 or step + 1 == config.num_steps:
            recent = torch.tensor(history[-100:]).mean(dim=0).tolist()
            elapsed = time.perf_counter() - started
            log(f"step {step + 1}/{config.num_steps}: mse {recent[0]:.4f} vlb {recent[1]:.4f} ({elapsed:.0f} s)")
        if on_snapshot is not None and snapshot_every and (step + 1) % snapshot_every == 0:
            on_snapshot(step + 1, _with_averages(copy.deepcopy(transformer), ema, parameters, null, transformer))
    _with_averages(transformer, ema, parameters, null, transformer)
    final = torch.tensor(history[-200:]).mean(dim=0).tolist()
    return {
        "train_seconds": round(time.perf_counter() - started, 1),
        "final_mse": round(final[0], 5),
        "final_vlb_bits_per_dim_times_T": round(final[1], 5),
        "num_tiles": count,
    }


@torch.no_grad()
def _with_averages(target, ema, parameters, null, source) -> PixCellTransformer2DModel:
    """`target` (the trained transformer or a copy of it) given the EMA weights and the null embedding, for sampling."""
    by_identity = {id(p): average for p, average in zip(parameters, ema, strict=True)}
    for parameter, original in zip(target.parameters(), source.parameters(), strict=True):
        parameter.copy_(by_identity[id(original)])
    average_null = by_identity.get(id(null), null)
    target.caption_projection.uncond_embedding.copy_(average_null.detach())
    return target.eval()


def scheduler_for_sampling():
    """The `scheduler/` folder of the real checkpoint: DPM-Solver++ on IDDPM's betas, epsilon prediction."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="linear",
        prediction_type="epsilon",
    )


def build_transformer(
    output_dir: Path,
    vae_dir: Path,
    uni_dir: Path,
    source_data: Path,
    seed: int,
    config: PretrainingConfig | None = None,
    on_snapshot: Callable[[int, PixCellTransformer2DModel], None] | None = None,
    snapshot_every: int = 0,
) -> dict:
    """Pretrain on `source_data` and write `output_dir/pixcell-256-mini/{transformer,scheduler}` atomically.

    `vae_dir` holds `vae/` (the mini SD3.5-style VAE), `uni_dir` the mini UNI2-h folder. Returns the build metrics.
    `config` defaults to the committed build's, with `seed`; `on_snapshot` is passed to `pretrain`.
    """
    config = PretrainingConfig(seed=seed) if config is None else config
    torch.manual_seed(seed)
    vae = networks.load_vae(str(vae_dir))
    uni = networks.load_uni(str(uni_dir))
    resolution = MINI_RESOLUTION
    latent_size = resolution // networks.vae_scale_factor(vae)
    started = time.perf_counter()
    features = encode_folder(source_data, vae, uni, resolution)
    encode_seconds = time.perf_counter() - started
    transformer = mini_transformer(config, uni.embed_dim, latent_size)
    metrics = pretrain(
        transformer, features, vae.config, config, on_snapshot=on_snapshot, snapshot_every=snapshot_every
    )
    target = Path(output_dir) / PART_FOLDERS["transformer"]
    tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    transformer.save_pretrained(tmp / "transformer")
    scheduler_for_sampling().save_pretrained(tmp / "scheduler")
    replace_folder(tmp, target)
    return {
        **metrics,
        "encode_seconds": round(encode_seconds, 1),
        "config": asdict(config),
        "parameters": sum(p.numel() for p in transformer.parameters()),
    }
