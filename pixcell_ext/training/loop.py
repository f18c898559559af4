"""The model that is trained and one training step on it, named once: the training script and the training benchmark
run exactly this code, so the benchmark times what training does.

A step is one micro-batch: features (cached or encoded on the fly), the diffusion loss with its optional class and
min-SNR terms, backward, and, at the end of an accumulation window, the guarded optimiser update. The non-finite
guard is decided without a host sync per micro-batch: each micro-batch's loss statistics stay on the device, and at
the end of the window they are gathered once, so every process takes the same skip decision from the same numbers and
the host waits for the device once per optimiser update.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch.profiler import record_function
from torch.utils.data import DataLoader, Dataset

from pixcell_ext import data
from pixcell_ext.model import diffusion, networks
from pixcell_ext.model.adapter import AdapterConfig, UNIAdapter
from pixcell_ext.model.conditioning import AdaptedPixCell
from pixcell_ext.model.lora import LoRAConfig, inject_lora, lora_parameters
from pixcell_ext.model.networks import PixCellTransformer2DModel
from pixcell_ext.training import feature_cache


def build_adapted_model(
    transformer: PixCellTransformer2DModel,
    lora_config: LoRAConfig,
    adapter_config: AdapterConfig,
    *,
    gradient_checkpointing: bool = False,
) -> AdaptedPixCell:
    """LoRA into the frozen transformer, then a fresh adapter on its device: the order fixes the initial weights drawn
    from the global RNG, so seed it right before."""
    inject_lora(transformer, lora_config)
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return AdaptedPixCell(transformer, UNIAdapter(adapter_config).to(transformer.device))


def trainable_parameters(model: AdaptedPixCell) -> list[torch.nn.Parameter]:
    return [*model.adapter.parameters(), *lora_parameters(model.transformer)]


def make_optimizer(params, *, use_8bit: bool, **hyperparameters) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW when asked for (it keeps optimizer state in 8 bits)."""
    if not use_8bit:
        return torch.optim.AdamW(params, **hyperparameters)
    try:
        import bitsandbytes
    except ImportError as error:
        raise ImportError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from error
    return bitsandbytes.optim.AdamW8bit(params, **hyperparameters)


def step_randomness_spec(
    transformer: PixCellTransformer2DModel,
    vae: torch.nn.Module,
    noise_scheduler,
    resolution: int,
    *,
    seed: int,
    cond_dropout: float,
    reference_dropout: float = 0.0,
) -> diffusion.RandomnessSpec:
    """The per-sample draws of a step on `resolution` px tiles: noise of the transformer's latent shape, timesteps of
    the training schedule."""
    latent_size = resolution // networks.vae_scale_factor(vae)
    return diffusion.RandomnessSpec(
        seed=seed,
        latent_shape=(transformer.config.in_channels, latent_size, latent_size),
        num_train_timesteps=noise_scheduler.config.num_train_timesteps,
        cond_dropout=cond_dropout,
        reference_dropout=reference_dropout,
    )


def training_dataloader(
    dataset: Dataset,
    labels: list[int],
    spec: diffusion.RandomnessSpec,
    *,
    batch_size: int,
    class_balanced: bool = False,
    num_workers: int = 0,
) -> DataLoader:
    """Batches of `dataset` in an order fixed by (spec.seed, epoch), each sample carrying its step randomness, drawn
    in the loader workers from (seed, epoch, index) (`diffusion.WithStepRandomness`)."""
    return DataLoader(
        diffusion.WithStepRandomness(dataset, spec),
        batch_size=batch_size,
        sampler=data.EpochSampler(labels, spec.seed, class_balanced=class_balanced),
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


@dataclass(frozen=True)
class StepConfig:
    """What shapes the loss and the update (the script's flags of the same names)."""

    max_grad_norm: float = 1.0
    snr_gamma: float | None = None
    class_loss_weight: float = 0.0
    augment: bool = False


@dataclass
class StepStats:
    """`updated` is False inside an accumulation window; at its end, whether the update was `skipped` (a non-finite
    loss on some process) and the window's mean of `diffusion.LOGGED_TERMS`, over every process and micro-batch."""

    updated: bool
    skipped: bool = False
    terms: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainingModules:
    """Everything a step touches besides the batch."""

    model: torch.nn.Module  # an AdaptedPixCell, prepared by accelerate
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    noise_scheduler: object
    vae: torch.nn.Module
    uni: torch.nn.Module | None
    window: list[torch.Tensor] = field(default_factory=list)  # loss statistics of the open accumulation window


def train_step(accelerator: Accelerator, modules: TrainingModules, batch: dict, config: StepConfig) -> StepStats:
    """One micro-batch: `batch` is what the training data loader gives (pixels or cached features, plus the draws of
    `diffusion.WithStepRandomness`)."""
    device = accelerator.device
    with accelerator.accumulate(modules.model):
        with record_function("features"):
            randomness = diffusion.StepRandomness.from_batch(batch, device)
            latents, embedding = feature_cache.batch_features(
                batch,
                vae=modules.vae,
                uni=modules.uni,
                vae_config=modules.vae.config,
                posterior_noise=randomness.posterior_noise,
                augment_codes=randomness.augment_codes if config.augment else None,
            )
        with record_function("loss+backward"):
            terms = diffusion.diffusion_loss(
                modules.model,
                modules.noise_scheduler,
                latents,
                embedding,
                randomness,
                snr_gamma=config.snr_gamma,
                labels=batch["label"].to(device),
                class_loss_weight=config.class_loss_weight,
            )
            modules.window.append(diffusion.loss_statistics(terms))
            accelerator.backward(terms.total)
        if not accelerator.sync_gradients:
            return StepStats(updated=False)
        with record_function("update"):
            # One collective and one host read per update: every process sees every micro-batch's statistics, so all
            # agree to skip (DDP would hang or drift if some stepped and others did not).
            everyone = accelerator.gather(torch.cat(modules.window)).cpu()
            modules.window.clear()
            skipped = bool(everyone[:, 0].min() == 0)
            if not skipped:
                accelerator.clip_grad_norm_(modules.trainable, config.max_grad_norm)
                modules.optimizer.step()
                if not accelerator.optimizer_step_was_skipped:
                    modules.lr_scheduler.step()
            modules.optimizer.zero_grad(set_to_none=True)
    names = diffusion.LOGGED_TERMS if config.class_loss_weight > 0 else diffusion.LOGGED_TERMS[:2]
    means = everyone[:, 1:].mean(dim=0).tolist()
    return StepStats(updated=True, skipped=skipped, terms=dict(zip(names, means, strict=False)))
