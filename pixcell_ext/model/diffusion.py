"""The training objective: PixCell's IDDPM noise schedule, epsilon or v targets, optional min-SNR-gamma weighting.

All randomness of a step (timestep, noise, posterior sample, condition dropout, augmentation) is drawn per sample
from a generator seeded by (seed, epoch, sample index), in the data-loader workers, so a step's loss does not depend
on how samples were batched, accumulated or spread over processes, and a resumed run draws exactly what an
uninterrupted one would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from pixcell_ext.seeding import generator_for

RANDOMNESS_FIELDS = ("timesteps", "noise", "posterior_noise", "drop", "augment_codes", "uni_drop")


@dataclass
class StepRandomness:
    timesteps: torch.Tensor  # [B] long
    noise: torch.Tensor  # [B, C, H, W] diffusion noise
    posterior_noise: torch.Tensor  # [B, C, H, W] for sampling the VAE posterior
    drop: torch.Tensor  # [B] bool, replace the condition by the null embedding
    augment_codes: torch.Tensor  # [B] in 0..7, a dihedral transform (used only with --augment)
    uni_drop: torch.Tensor  # [B] bool, keep the class but replace the reference (class conditioning only)

    @classmethod
    def from_batch(cls, batch: dict, device: torch.device) -> StepRandomness:
        """The draws a `WithStepRandomness` dataset put into a collated batch; the augment codes stay on the CPU."""
        moved = {name: batch[name] if name == "augment_codes" else batch[name].to(device) for name in RANDOMNESS_FIELDS}
        return cls(**moved)


@dataclass(frozen=True)
class RandomnessSpec:
    seed: int
    latent_shape: tuple[int, int, int]
    num_train_timesteps: int
    cond_dropout: float
    reference_dropout: float = 0.0

    def draw(self, epoch: int, sample_id: int) -> dict[str, torch.Tensor]:
        """One sample's draws, from its own generator; the order of the draws is part of the format."""
        generator = generator_for(self.seed, epoch, sample_id)
        return {
            "timesteps": torch.randint(0, self.num_train_timesteps, (), generator=generator),
            "noise": torch.randn(self.latent_shape, generator=generator),
            "posterior_noise": torch.randn(self.latent_shape, generator=generator),
            "drop": torch.rand((), generator=generator) < self.cond_dropout,
            "augment_codes": torch.randint(0, 8, (), generator=generator),
            "uni_drop": torch.rand((), generator=generator) < self.reference_dropout,
        }


class WithStepRandomness(torch.utils.data.Dataset):
    """Adds each sample's draws to it, in the loader workers instead of the training loop.

    The sampler yields (index, epoch) pairs (`data.EpochSampler`), so the draws need no state in the workers and
    stay a pure function of (seed, epoch, index) however the batches are split, accumulated or resumed.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, spec: RandomnessSpec):
        self.dataset = dataset
        self.spec = spec

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        return {**self.dataset[index], **self.spec.draw(epoch, index)}


def draw_step_randomness(
    sample_ids: torch.Tensor, *, epoch: int, spec: RandomnessSpec, device: torch.device
) -> StepRandomness:
    """The draws of a batch of samples, as `WithStepRandomness` gives them (for code without a data loader)."""
    draws = [spec.draw(epoch, sample_id) for sample_id in sample_ids.tolist()]
    batch = {name: torch.stack([d[name] for d in draws]) for name in RANDOMNESS_FIELDS}
    return StepRandomness.from_batch(batch, device)


def snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR, gamma) / SNR for epsilon targets, min(SNR, gamma) / (SNR + 1) for v targets (Hang et al. 2023)."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    clipped = torch.clamp(snr, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


@dataclass
class LossTerms:
    total: torch.Tensor
    diffusion: torch.Tensor
    class_loss: torch.Tensor | None = None
    class_accuracy: torch.Tensor | None = None


def diffusion_loss(
    model: torch.nn.Module,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    uni_embedding: torch.Tensor,
    randomness: StepRandomness,
    snr_gamma: float | None = None,
    labels: torch.Tensor | None = None,
    class_loss_weight: float = 0.0,
) -> LossTerms:
    """Mean loss over the batch; `model` is an `AdaptedPixCell` (possibly wrapped by DDP).

    With learned variance (PixCell outputs 2C channels: [epsilon | variance]) the loss uses the epsilon half only,
    as the authors' fine-tuning does. With a class head, `class_loss_weight` times its cross-entropy is added.
    """
    noisy = scheduler.add_noise(latents, randomness.noise, randomness.timesteps)
    prediction, logits = model(noisy, randomness.timesteps, uni_embedding, randomness.drop, labels, randomness.uni_drop)
    prediction = prediction[:, : latents.shape[1]].float()
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = randomness.noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, randomness.noise, randomness.timesteps)
    else:
        raise ValueError(f"Unsupported prediction_type '{prediction_type}' in the scheduler config.")
    per_sample = F.mse_loss(prediction, target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        per_sample = per_sample * snr_weights(scheduler, randomness.timesteps, snr_gamma)
    loss = per_sample.mean()
    if logits is None:
        return LossTerms(total=loss, diffusion=loss)
    class_loss = F.cross_entropy(logits.float(), labels)
    accuracy = (logits.argmax(dim=1) == labels).float().mean()
    return LossTerms(loss + class_loss_weight * class_loss, loss, class_loss, accuracy)


LOGGED_TERMS = ("loss", "diffusion_loss", "class_loss", "class_accuracy")


def loss_statistics(terms: LossTerms) -> torch.Tensor:
    """[finite, *LOGGED_TERMS] as one detached vector, to be gathered across processes in one collective.

    Terms a model does not have (the class terms without a class head) are NaN and not logged."""
    values = [terms.total, terms.diffusion, terms.class_loss, terms.class_accuracy]
    values = [torch.full_like(terms.total, float("nan")) if v is None else v for v in values]
    stats = torch.stack([torch.isfinite(terms.total).to(terms.total.dtype), *values]).detach().float()
    return stats.view(1, -1)
