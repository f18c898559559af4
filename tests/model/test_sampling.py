"""Samplers: DDPM on latents is not clipped, and every image's randomness comes from its own generator."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from pixcell_ext.model.networks import load_transformer, sampling_scheduler
from pixcell_ext.model.sampling import sample_latents_cfg
from pixcell_ext.seeding import generator_for

pytestmark = pytest.mark.usefixtures("one_thread")

# What a checkpoint's scheduler folder may say; diffusers' DDPM default is clip_sample=True.
CHECKPOINT_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "variance_type": "learned_range",
    "clip_sample": True,
}


def test_ddpm_sampler_does_not_clip_latents():
    scheduler = sampling_scheduler(CHECKPOINT_SCHEDULER, "ddpm")
    assert isinstance(scheduler, DDPMScheduler)
    assert scheduler.config.clip_sample is False and scheduler.config.thresholding is False
    # The last step (t = 0) adds no noise and returns the predicted x0 = (x - sqrt(1 - abar) eps) / sqrt(abar).
    # Latents with unit std have values beyond +-1; a clipping sampler would return them clamped to [-1, 1].
    sample = torch.linspace(-3.0, 3.0, 16).view(1, 1, 4, 4)
    eps = torch.full_like(sample, 0.5)
    abar = scheduler.alphas_cumprod[0]
    expected = (sample - (1 - abar).sqrt() * eps) / abar.sqrt()
    out = scheduler.step(eps, 0, sample).prev_sample
    torch.testing.assert_close(out, expected)
    assert out.abs().max() > 3.0
    clipping = DDPMScheduler.from_config({**CHECKPOINT_SCHEDULER, "variance_type": "fixed_small"})
    assert clipping.step(eps, 0, sample).prev_sample.abs().max() == 1.0  # what the default would have done


@pytest.fixture(scope="module")
def transformer(tiny_stack):
    return load_transformer(str(tiny_stack.pixcell))


def ddpm_latents(transformer, seeds: list[int]) -> torch.Tensor:
    context = torch.randn(
        len(seeds), 1, transformer.config.caption_channels, generator=torch.Generator().manual_seed(5)
    )
    return sample_latents_cfg(
        transformer,
        CHECKPOINT_SCHEDULER,
        context,
        transformer.unconditional_embedding(len(seeds)),
        [generator_for(seed, "image") for seed in seeds],
        num_inference_steps=3,
        sampler="ddpm",
    )


def test_ddpm_step_noise_comes_from_each_images_generator(transformer):
    torch.manual_seed(0)
    first = ddpm_latents(transformer, [0, 1])
    torch.manual_seed(1)
    before = torch.get_rng_state()
    again = ddpm_latents(transformer, [0, 1])
    assert torch.equal(first, again)  # the global RNG plays no part ...
    assert torch.equal(torch.get_rng_state(), before)  # ... and is not even drawn from
    # An image does not depend on its neighbour's generator (one generator shared by the batch would make it so).
    other_neighbour = ddpm_latents(transformer, [0, 2])
    assert torch.equal(first[0], other_neighbour[0]) and not torch.equal(first[1], other_neighbour[1])
