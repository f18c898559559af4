"""PixCell transformer without remote code, and loaders for the frozen stack: PixCell, SD3.5 VAE, UNI2-h.

Every loader takes either a hub id or a local folder, exactly as a user with access calls it. Values that shape
the computation (notably `interpolation_scale`, the VAE's `shift_factor`/`scaling_factor`) are read from the
checkpoint's own config, never hard-coded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PixArtTransformer2DModel,
)
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from torch import nn

from pixcell_ext import PIXCELL_256_ID, SAMPLER_NAMES, SD35_VAE_ID, UNI2H_ID
from pixcell_ext.data import UNI_IMAGE_SIZE
from pixcell_ext.errors import ExplainedError

UNI2H_ARCHITECTURE = "vit_giant_patch14_224"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def uni2h_timm_kwargs() -> dict:
    """UNI2-h's architecture as its model card builds it; the layer classes cannot live in a JSON config."""
    import timm

    return dict(
        img_size=UNI_IMAGE_SIZE,
        patch_size=14,
        depth=24,
        num_heads=24,
        init_values=1e-5,
        embed_dim=1536,
        mlp_ratio=2.66667 * 2,
        num_classes=0,
        no_embed_class=True,
        mlp_layer=timm.layers.SwiGLUPacked,
        act_layer=torch.nn.SiLU,
        reg_tokens=8,
        dynamic_img_size=True,
    )


class UNITokenPositions(nn.Module):
    """Sin-cos positions of the UNI tokens of PixCell-1024 (a 4x4 grid of 256 px crops), added before projection."""

    def __init__(self, num_tokens: int, channels: int):
        super().__init__()
        grid = int(round(num_tokens**0.5))
        table = get_2d_sincos_pos_embed(channels, grid, output_type="pt").float()
        self.register_buffer("y_pos_embed", table[:num_tokens].unsqueeze(0))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens + self.y_pos_embed.to(tokens.dtype)


def _placement(device_map: dict, name: str):
    """Where a device_map puts the tensor `name`: the entry of its longest enclosing module ("" is the model)."""
    owners = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
    return device_map[max(owners, key=len)] if owners else None


class PixCellTransformer2DModel(PixArtTransformer2DModel):
    """PixArt-Sigma transformer conditioned on UNI2-h embeddings, loadable from the released PixCell weights.

    The only additions to diffusers' PixArt model are those in the released checkpoints: the learned null UNI
    embedding `caption_projection.uncond_embedding` (used for classifier-free guidance) and, for PixCell-1024, the
    UNI token positions. The class name matches the released `config.json`, so `from_pretrained` needs no remote code.
    """

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 16,
        out_channels: int | None = 32,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        cross_attention_dim: int | None = 1152,
        attention_bias: bool = True,
        sample_size: int = 32,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_single",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        interpolation_scale: float | None = None,
        use_additional_conditions: bool | None = False,
        caption_channels: int | None = 1536,
        attention_type: str | None = "default",
        caption_num_tokens: int = 1,
    ):
        super().__init__(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            dropout=dropout,
            norm_num_groups=norm_num_groups,
            cross_attention_dim=cross_attention_dim,
            attention_bias=attention_bias,
            sample_size=sample_size,
            patch_size=patch_size,
            activation_fn=activation_fn,
            num_embeds_ada_norm=num_embeds_ada_norm,
            upcast_attention=upcast_attention,
            norm_type=norm_type,
            norm_elementwise_affine=norm_elementwise_affine,
            norm_eps=norm_eps,
            interpolation_scale=interpolation_scale,
            use_additional_conditions=use_additional_conditions,
            caption_channels=caption_channels,
            attention_type=attention_type,
        )
        self.caption_projection.register_buffer("uncond_embedding", torch.zeros(caption_num_tokens, caption_channels))
        self.y_pos_embed = UNITokenPositions(caption_num_tokens, caption_channels) if caption_num_tokens > 1 else None

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """diffusers' loader, refusing a `device_map` that offloads the checkpoint's buffers to disk.

        accelerate does not load persistent buffers of a disk-offloaded module back (checked on a plain module too):
        `uncond_embedding` would stay at zeros and guidance would silently contrast against a zero null embedding.
        """
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        device_map = getattr(model, "hf_device_map", None) or {}
        buffers = ["caption_projection.uncond_embedding"] + (["y_pos_embed.y_pos_embed"] if model.y_pos_embed else [])
        on_disk = [name for name in buffers if _placement(device_map, name) == "disk"]
        if on_disk:
            keep = " and ".join(dict.fromkeys(name.split(".")[0] for name in on_disk))
            raise ValueError(
                f"The device_map offloads {', '.join(on_disk)} to disk, and accelerate does not load buffers of "
                "disk-offloaded modules back, so they would stay at zeros (classifier-free guidance would use a zero "
                f"null embedding). Keep {keep} on a device (a few million parameters): name it in the device_map, "
                "e.g. {'caption_projection': 0, ...}, or give max_memory room for it."
            )
        return loaded

    def unconditional_embedding(self, batch_size: int) -> torch.Tensor:
        """The learned null UNI embedding, [B, T, C], detached (the released buffer may carry requires_grad)."""
        null = self.caption_projection.uncond_embedding.detach()
        return null.unsqueeze(0).expand(batch_size, -1, -1)

    def forward(self, hidden_states, encoder_hidden_states, timestep=None, added_cond_kwargs=None, **kwargs):
        if self.y_pos_embed is not None:
            encoder_hidden_states = self.y_pos_embed(encoder_hidden_states)
        if added_cond_kwargs is None:
            added_cond_kwargs = {"resolution": None, "aspect_ratio": None}
        return super().forward(
            hidden_states, encoder_hidden_states, timestep=timestep, added_cond_kwargs=added_cond_kwargs, **kwargs
        )


class UNIEncoder(nn.Module):
    """UNI2-h with its own preprocessing on the device: uint8 or [0, 1] images of any size -> [B, 1, C].

    The preprocessing is written out (resize to 224, ImageNet mean/std) because timm's resolved defaults for a
    model built without hub weights are the architecture's (mean/std 0.5, crop 0.9), which are wrong for UNI2-h.
    The resize is the authors' torchvision `Resize(224)` on PIL images: bilinear with antialiasing (PIL's filter),
    which torch's antialiased bilinear reproduces to within PIL's uint8 rounding.
    """

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if images.shape[-2:] != (UNI_IMAGE_SIZE, UNI_IMAGE_SIZE):
            images = F.interpolate(images, size=UNI_IMAGE_SIZE, mode="bilinear", antialias=True, align_corners=False)
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vit.parameters()).dtype
        return self.vit(self.preprocess(images).to(dtype)).unsqueeze(1)


class GatedModelError(OSError, ExplainedError):
    """A model could not be loaded from the hub: says which repository and how to get access or use a local copy."""


def _is_local(name_or_path: str) -> bool:
    return os.path.exists(name_or_path.removeprefix("local-dir:"))


def _hub_error(what: str, repo: str, flag: str, error: Exception) -> GatedModelError:
    repo_id = repo.removeprefix("hf-hub:")
    return GatedModelError(
        f"Could not load {what} from '{repo_id}': it is not a local folder, and '{repo_id}' is a gated repository on "
        f"the Hugging Face Hub. Accept its terms at https://huggingface.co/{repo_id}, log in with `hf auth login` "
        f"(or set HF_TOKEN), or download it once and pass the local folder with {flag}. "
        f"Underlying error: {type(error).__name__}: {error}"
    )


def load_transformer(
    name_or_path: str = PIXCELL_256_ID, *, dtype: torch.dtype = torch.float32, revision: str | None = None
) -> PixCellTransformer2DModel:
    """The PixCell transformer from `<name_or_path>/transformer`, frozen, in `dtype`."""
    try:
        model = PixCellTransformer2DModel.from_pretrained(
            name_or_path, subfolder="transformer", torch_dtype=dtype, revision=revision
        )
    except OSError as error:
        if _is_local(name_or_path):
            raise
        raise _hub_error("the PixCell transformer", name_or_path, "--pretrained_model_name_or_path", error) from error
    return model.requires_grad_(False).eval()


def load_scheduler_config(name_or_path: str = PIXCELL_256_ID, revision: str | None = None) -> dict:
    """The checkpoint's scheduler config: betas, number of steps and `prediction_type` come from here."""
    try:
        return dict(DDPMScheduler.load_config(name_or_path, subfolder="scheduler", revision=revision))
    except OSError as error:
        if _is_local(name_or_path):
            raise
        raise _hub_error("the PixCell scheduler", name_or_path, "--pretrained_model_name_or_path", error) from error


def training_scheduler(scheduler_config: dict) -> DDPMScheduler:
    """A DDPM scheduler with the checkpoint's betas, used only to add noise and read `prediction_type`."""
    config = {k: v for k, v in scheduler_config.items() if k != "variance_type"}
    return DDPMScheduler.from_config(config)


SAMPLERS = dict(zip(SAMPLER_NAMES, (DPMSolverMultistepScheduler, EulerDiscreteScheduler, DDPMScheduler), strict=True))


def sampling_scheduler(scheduler_config: dict, kind: str = "dpm"):
    """A sampler on the checkpoint's betas. Learned variance is dropped before `step`, so `variance_type` is reset.

    DDPM's default `clip_sample=True` clamps the predicted x0 to [-1, 1], which suits pixel-space models; scaled
    SD3.5 latents have unit std, so clipping would cut their tails at every step. It is switched off.
    """
    config = {k: v for k, v in scheduler_config.items() if k != "variance_type"}
    if kind == "ddpm":
        config.update(clip_sample=False, thresholding=False)
    return SAMPLERS[kind].from_config(config)


def load_vae(
    name_or_path: str = SD35_VAE_ID,
    *,
    subfolder: str | None = "vae",
    dtype: torch.dtype = torch.float32,
    decoder_only: bool = False,
) -> AutoencoderKL:
    """The SD3.5 VAE, frozen. `decoder_only` drops the encoder before the caller moves it to a device (training
    from a feature cache only decodes, for validation panels)."""
    try:
        vae = AutoencoderKL.from_pretrained(name_or_path, subfolder=subfolder, torch_dtype=dtype)
    except OSError as error:
        if _is_local(name_or_path):
            raise
        raise _hub_error("the SD3.5 VAE", name_or_path, "--vae_name_or_path", error) from error
    if vae.config.get("shift_factor") is None:
        raise ValueError(
            f"The VAE at '{name_or_path}' has no shift_factor in its config: PixCell needs the SD3.5 VAE "
            "(16 latent channels, shift 0.0609, scale 1.5305)."
        )
    if decoder_only:
        vae.encoder = None
    return vae.requires_grad_(False).eval()


def _read_uni_checkpoint(path: Path) -> tuple[str, dict, Path]:
    """Architecture, numeric kwargs and weights file of a local UNI copy: a hub-style folder or a weights file."""
    if path.is_file():
        return UNI2H_ARCHITECTURE, {}, path
    config_file = path / "config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    for weights in ("model.safetensors", "pytorch_model.bin"):
        if (path / weights).exists():
            return config.get("architecture", UNI2H_ARCHITECTURE), config.get("model_args", {}), path / weights
    raise FileNotFoundError(f"No model.safetensors or pytorch_model.bin in the UNI folder '{path}'.")


def load_uni(name_or_path: str = UNI2H_ID, *, dtype: torch.dtype = torch.float32) -> UNIEncoder:
    """UNI2-h from the hub (`hf-hub:MahmoodLab/UNI2-h`) or a local copy (hub-style folder or a weights file)."""
    import timm

    kwargs = uni2h_timm_kwargs()
    if not _is_local(name_or_path):
        try:
            vit = timm.create_model(name_or_path, pretrained=True, **kwargs)
        except Exception as error:  # timm surfaces hub failures as many exception types
            raise _hub_error("UNI2-h", name_or_path, "--uni_model_name_or_path", error) from error
    else:
        architecture, model_args, weights = _read_uni_checkpoint(Path(name_or_path.removeprefix("local-dir:")))
        vit = timm.create_model(architecture, pretrained=False, **{**kwargs, **model_args})
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(weights)
        else:
            state_dict = torch.load(weights, map_location="cpu", weights_only=True)
        vit.load_state_dict(state_dict, strict=True)
    return UNIEncoder(vit.to(dtype)).requires_grad_(False).eval()


def encode_latent_distribution(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior for images in [-1, 1]; a cache stores these and samples at load time."""
    dist = vae.encode(images.to(vae.dtype)).latent_dist
    return dist.mean.float(), dist.std.float()


def posterior_latents(vae_config, mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A posterior sample in PixCell's latent space, `(mean + std * noise - shift_factor) * scaling_factor`.

    The noise is the caller's, so that training draws it per sample (see `diffusion.draw_step_randomness`).
    """
    return (mean.float() + std.float() * noise.float() - vae_config.shift_factor) * vae_config.scaling_factor


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent cell: 8 for the SD3.5 VAE."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] from PixCell latents (the inverse of `posterior_latents`)."""
    raw = latents / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(raw.to(vae.dtype)).sample.float().clamp(-1, 1)


def decode_posterior_mean(vae: AutoencoderKL, mean: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] from a raw posterior mean, through PixCell's latent space as generated latents are: a round
    trip (encode, posterior mean, decode) differs from a generated tile only in where its latents came from."""
    return decode_latents(vae, (mean.float() - vae.config.shift_factor) * vae.config.scaling_factor)


@dataclass
class PixCellStack:
    """The frozen models of one run. `uni` and `vae` may be None when features come from a cache."""

    transformer: PixCellTransformer2DModel
    scheduler_config: dict
    vae: AutoencoderKL | None
    uni: UNIEncoder | None


def load_pixcell_stack(
    pretrained_model_name_or_path: str = PIXCELL_256_ID,
    vae_name_or_path: str = SD35_VAE_ID,
    uni_model_name_or_path: str = UNI2H_ID,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    with_vae: bool = True,
    with_uni: bool = True,
    vae_decoder_only: bool = False,
    revision: str | None = None,
) -> PixCellStack:
    """Every frozen model of the pipeline, in the caller's dtype and device."""
    transformer = load_transformer(pretrained_model_name_or_path, dtype=dtype, revision=revision).to(device)
    scheduler_config = load_scheduler_config(pretrained_model_name_or_path, revision=revision)
    vae = load_vae(vae_name_or_path, dtype=dtype, decoder_only=vae_decoder_only).to(device) if with_vae else None
    uni = load_uni(uni_model_name_or_path, dtype=dtype).to(device) if with_uni else None
    check_stack_compatible(transformer, uni, vae)
    return PixCellStack(transformer, scheduler_config, vae, uni)


def check_stack_compatible(
    transformer: PixCellTransformer2DModel, uni: UNIEncoder | None, vae: AutoencoderKL | None
) -> None:
    """Fail at load time, not at the first step, when models of different families are mixed."""
    if uni is not None and uni.embed_dim != transformer.config.caption_channels:
        raise ValueError(
            f"UNI embeddings have {uni.embed_dim} channels but the transformer expects "
            f"{transformer.config.caption_channels}: the UNI model and PixCell checkpoint do not belong together."
        )
    if vae is not None and vae.config.latent_channels != transformer.config.in_channels:
        raise ValueError(
            f"The VAE has {vae.config.latent_channels} latent channels but the transformer expects "
            f"{transformer.config.in_channels}: PixCell needs the SD3.5 VAE."
        )


def load_remote_pipeline(pretrained_model_name_or_path: str, vae: AutoencoderKL, *, trust_remote_code: bool = False):
    """The authors' hub pipeline (remote code). Only for comparison with the reference; never used by our scripts.

    Its code imports `transformers.modeling_layers`, absent from older transformers; a stand-in is installed first.
    """
    if not trust_remote_code:
        raise ValueError(
            "The PixCell hub pipeline runs code downloaded from the hub; pass trust_remote_code=True to opt in. "
            "Everything in this project works without it."
        )
    from diffusers import DiffusionPipeline

    from pixcell_ext.model.compat import ensure_gradient_checkpointing_layer

    ensure_gradient_checkpointing_layer()

    return DiffusionPipeline.from_pretrained(
        pretrained_model_name_or_path,
        vae=vae,
        custom_pipeline="StonyBrook-CVLab/PixCell-pipeline",
        trust_remote_code=True,
    )
