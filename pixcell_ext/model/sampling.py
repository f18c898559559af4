"""Classifier-free-guided sampling from adapted contexts, batched, with one noise generator per image.

The initial noise of every image, and the step noise of stochastic samplers (DDPM), come from its own CPU
generator, so an image does not depend on which batch or process produced it, nor on the global RNG. Conditional
and unconditional branches go through the transformer in one batched forward.
"""

from __future__ import annotations

import torch

from pixcell_ext.model.networks import PixCellTransformer2DModel, sampling_scheduler


@torch.no_grad()
def sample_latents_cfg(
    transformer: PixCellTransformer2DModel,
    scheduler_config: dict,
    context: torch.Tensor,
    null_context: torch.Tensor,
    generators: list[torch.Generator],
    *,
    guidance_scale: float = 2.0,
    num_inference_steps: int = 20,
    sampler: str = "dpm",
) -> torch.Tensor:
    """Latents [B, C, H, W] for contexts [B, T, C'], guided by `eps_u + g * (eps_c - eps_u)`."""
    if len(generators) != context.shape[0]:
        raise ValueError(f"One generator per image: got {len(generators)} for a batch of {context.shape[0]}.")
    config = transformer.config
    channels, size = config.in_channels, config.sample_size
    device, dtype = context.device, transformer.dtype
    scheduler = sampling_scheduler(scheduler_config, sampler)
    scheduler.set_timesteps(num_inference_steps, device=device)
    noise = torch.stack([torch.randn((channels, size, size), generator=g) for g in generators])
    latents = noise.to(device) * scheduler.init_noise_sigma
    guided = guidance_scale != 1.0
    contexts = torch.cat([null_context, context]).to(dtype) if guided else context.to(dtype)
    for t in scheduler.timesteps:
        model_input = torch.cat([latents, latents]) if guided else latents
        model_input = scheduler.scale_model_input(model_input, t)
        timesteps = t.expand(model_input.shape[0])
        prediction = transformer(model_input.to(dtype), contexts, timestep=timesteps).sample[:, :channels].float()
        if guided:
            unconditional, conditional = prediction.chunk(2)
            prediction = unconditional + guidance_scale * (conditional - unconditional)
        latents = scheduler.step(prediction, t, latents, generator=generators).prev_sample
    return latents


def to_uint8_images(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 [B, H, W, 3] on the CPU, rounded the same way everywhere."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
