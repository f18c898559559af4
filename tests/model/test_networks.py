import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from pixcell_ext.model import compat
from pixcell_ext.model.adapter import AdapterConfig, UNIAdapter, load_adapter, save_adapter
from pixcell_ext.model.conditioning import AdaptedPixCell
from pixcell_ext.model.diffusion import RandomnessSpec, diffusion_loss, draw_step_randomness
from pixcell_ext.model.lora import LoRAConfig, inject_lora, lora_parameters
from pixcell_ext.model.networks import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    GatedModelError,
    PixCellTransformer2DModel,
    check_stack_compatible,
    decode_latents,
    encode_latent_distribution,
    load_pixcell_stack,
    load_remote_pipeline,
    load_transformer,
    load_uni,
    load_vae,
    posterior_latents,
    training_scheduler,
)
from pixcell_ext.model.sampling import sample_latents_cfg
from pixcell_ext.seeding import generator_for

# Key -> shape of the released PixCell-256 transformer, generated from the authors' class.
LAYOUT = Path(__file__).parents[1] / "data" / "pixcell256_state_dict_layout.json"


@pytest.fixture(scope="module")
def stack(tiny_stack):
    return load_pixcell_stack(str(tiny_stack.pixcell), str(tiny_stack.vae), str(tiny_stack.uni))


def test_pixcell256_state_dict_matches_released_layout():
    layout = json.loads(LAYOUT.read_text())
    with torch.device("meta"):
        model = PixCellTransformer2DModel(**layout["config"])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert set(ours) == set(layout["state_dict"])
    assert ours == layout["state_dict"]
    assert len(ours) == 604
    assert sum(math.prod(shape) for shape in ours.values()) == 608_074_496


def test_interpolation_scale_and_null_embedding_come_from_the_checkpoint(tiny_stack):
    transformer = load_transformer(str(tiny_stack.pixcell))
    assert transformer.config.interpolation_scale == 0.5
    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    default_scale = PixCellTransformer2DModel(**{**config, "interpolation_scale": None})
    assert not torch.equal(transformer.pos_embed.pos_embed, default_scale.pos_embed.pos_embed)
    from safetensors.torch import load_file

    weights = load_file(tiny_stack.pixcell / "transformer" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(transformer.caption_projection.uncond_embedding, weights["caption_projection.uncond_embedding"])
    null = transformer.unconditional_embedding(3)
    assert null.shape == (3, 1, transformer.config.caption_channels) and not null.requires_grad


def test_device_map_offloading_the_null_embedding_to_disk_is_refused(tmp_path):
    torch.manual_seed(0)
    model = PixCellTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=8, caption_channels=12,
    )  # fmt: skip
    with torch.no_grad():
        model.caption_projection.uncond_embedding.normal_()
    model.save_pretrained(tmp_path / "transformer")
    top_level = [name for name, _ in model.named_children()] + ["scale_shift_table"]
    on_cpu = dict.fromkeys(top_level, "cpu")
    load = {"subfolder": "transformer", "offload_folder": str(tmp_path / "offload")}

    # Everything on a device: the buffer is the checkpoint's.
    kept = PixCellTransformer2DModel.from_pretrained(tmp_path, device_map=on_cpu, **load)
    assert torch.equal(kept.caption_projection.uncond_embedding, model.caption_projection.uncond_embedding)
    # caption_projection on disk: accelerate would leave the buffer at zeros, so the load is refused.
    for device_map in ({**on_cpu, "caption_projection": "disk"}, {"": "disk"}):
        with pytest.raises(ValueError, match=r"caption_projection\.uncond_embedding to disk.*Keep caption_projection"):
            PixCellTransformer2DModel.from_pretrained(tmp_path, device_map=device_map, **load)


def test_transformer_is_frozen_and_runs_one_denoising_step_and_decode(stack):
    transformer, vae = stack.transformer, stack.vae
    assert not any(p.requires_grad for p in transformer.parameters())
    context = torch.randn(2, 1, transformer.config.caption_channels)
    latents = sample_latents_cfg(
        transformer,
        stack.scheduler_config,
        context,
        transformer.unconditional_embedding(2),
        [generator_for(0, i) for i in range(2)],
        guidance_scale=2.0,
        num_inference_steps=1,
    )
    images = decode_latents(vae, latents)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    assert images.min() >= -1 and images.max() <= 1


@torch.no_grad()
def test_transformer_accepts_latents_smaller_than_its_sample_size(stack):
    """What `--resolution 224` relies on (28x28 latents for PixCell-256's 32x32): here 6x6 for the tiny 8x8."""
    transformer = stack.transformer
    size = transformer.config.sample_size - 2
    latents = torch.randn(2, transformer.config.in_channels, size, size)
    context = torch.randn(2, 1, transformer.config.caption_channels)
    out = transformer(latents, context, timestep=torch.tensor([1, 500])).sample
    assert out.shape == (2, transformer.config.out_channels, size, size) and torch.isfinite(out).all()


def test_latents_apply_shift_and_scale_both_ways(stack):
    vae = stack.vae
    image = torch.linspace(-1, 1, 3 * 64 * 64).view(1, 3, 64, 64)
    mean, std = encode_latent_distribution(vae, image)
    zero = torch.zeros_like(mean)
    latents = posterior_latents(vae.config, mean, std, zero)
    assert torch.allclose(latents, (mean - 0.0609) * 1.5305, atol=1e-6)
    # Scaling without the shift (the original notebook) is off by shift * scale in every latent.
    assert torch.allclose(mean * 1.5305 - latents, torch.full_like(mean, 0.0609 * 1.5305), atol=1e-5)
    with torch.no_grad():
        decoded = decode_latents(vae, latents)
        direct = vae.decode(mean).sample.clamp(-1, 1)
    assert torch.allclose(decoded, direct, atol=1e-5)
    noise = torch.randn_like(mean)
    assert torch.allclose(posterior_latents(vae.config, mean, std, noise), (mean + std * noise - 0.0609) * 1.5305)


def test_uni_preprocessing_is_imagenet_normalised_and_resizes_to_224(stack):
    uni = stack.uni
    mean_colour = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1).expand(1, 3, 224, 224)
    assert uni.preprocess(mean_colour).abs().max() < 1e-6
    tile = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    assert uni.preprocess(tile).shape == (2, 3, 224, 224)
    assert torch.allclose(uni(tile), uni(tile.float() / 255), atol=1e-6)
    assert uni(tile).shape == (2, 1, 32)


def test_uni_resize_is_torchvisions_resize_224_on_a_pil_image(stack):
    """The authors' UNI2-h transform is `Resize(224)` (PIL bilinear, antialiased) then `ToTensor`."""
    from PIL import Image
    from torchvision import transforms

    tile = torch.randint(0, 256, (256, 256, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    reference = transforms.ToTensor()(transforms.Resize(224)(Image.fromarray(tile.numpy())))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    ours = stack.uni.preprocess(tile.permute(2, 0, 1)[None])[0] * std + mean
    # PIL rounds its result to uint8: one grey level at most. A bicubic resize of this noise is 45 grey levels off.
    difference = (ours - reference).abs() * 255
    assert difference.max() <= 1.01 and difference.mean() < 0.4


def test_adapter_is_identity_at_init_and_keeps_fp32_weights():
    adapter = UNIAdapter(AdapterConfig(embed_dim=16, num_tokens=3, hidden_dim=8))
    embedding = torch.randn(4, 1, 16)
    out = adapter(embedding, output_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.shape == (4, 3, 16)
    assert torch.equal(adapter(embedding), embedding.expand(4, 3, 16))
    assert all(p.dtype == torch.float32 for p in adapter.parameters())
    with pytest.raises(ValueError, match="one UNI token"):
        adapter(torch.randn(2, 4, 16))


def test_adapter_round_trips_through_safetensors(tmp_path):
    adapter = UNIAdapter(AdapterConfig(embed_dim=16, num_tokens=2, hidden_dim=8))
    torch.nn.init.normal_(adapter.fc2.weight)
    save_adapter(adapter, tmp_path / "adapter.safetensors")
    loaded = load_adapter(tmp_path / "adapter.safetensors")
    x = torch.randn(3, 1, 16)
    assert torch.equal(adapter(x), loaded(x))
    assert not list(tmp_path.glob("*.tmp"))


def test_one_optimiser_step_changes_only_adapter_and_lora(tiny_stack):
    transformer = load_transformer(str(tiny_stack.pixcell))
    scheduler_config = load_pixcell_stack(
        str(tiny_stack.pixcell), str(tiny_stack.vae), str(tiny_stack.uni), with_vae=False, with_uni=False
    ).scheduler_config
    inject_lora(transformer, LoRAConfig(rank=2))
    adapter = UNIAdapter(AdapterConfig(embed_dim=32, hidden_dim=16))
    model = AdaptedPixCell(transformer, adapter)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [*adapter.parameters(), *lora_parameters(transformer)]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    randomness = draw_step_randomness(
        torch.arange(4),
        epoch=0,
        spec=RandomnessSpec(seed=0, latent_shape=(16, 8, 8), num_train_timesteps=1000, cond_dropout=0.5),
        device=torch.device("cpu"),
    )
    loss = diffusion_loss(
        model, training_scheduler(scheduler_config), torch.randn(4, 16, 8, 8), torch.randn(4, 1, 32), randomness
    )
    loss.total.backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "the step changed nothing"
    assert all(k.startswith("adapter.") or ".lora_" in k for k in changed), sorted(changed)
    assert any(".lora_B." in k for k in changed) and "adapter.fc2.weight" in changed


def test_ensure_gradient_checkpointing_layer_keeps_the_real_class():
    from transformers.modeling_layers import GradientCheckpointingLayer

    assert compat.ensure_gradient_checkpointing_layer() is GradientCheckpointingLayer
    assert compat.ensure_gradient_checkpointing_layer() is GradientCheckpointingLayer


def test_ensure_gradient_checkpointing_layer_installs_a_shim_when_missing(monkeypatch):
    import transformers

    monkeypatch.setitem(sys.modules, "transformers.modeling_layers", None)  # import now raises ImportError
    monkeypatch.delattr(transformers, "modeling_layers", raising=False)
    shim = compat.ensure_gradient_checkpointing_layer()
    assert isinstance(sys.modules["transformers.modeling_layers"], types.ModuleType)
    assert compat.ensure_gradient_checkpointing_layer() is shim  # idempotent
    from transformers.modeling_layers import GradientCheckpointingLayer

    assert GradientCheckpointingLayer is shim

    class Block(shim):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.tanh(self.linear(x))

    block = Block().train()
    x = torch.randn(3, 4, requires_grad=True)
    block(x).sum().backward()
    plain = x.grad.clone()
    x.grad = None
    block.gradient_checkpointing = True
    block(x).sum().backward()
    assert torch.allclose(plain, x.grad)


@pytest.mark.parametrize(
    "load, repo, flag",
    [
        (
            lambda: load_vae("stabilityai/stable-diffusion-3.5-large"),
            "stabilityai/stable-diffusion-3.5-large",
            "--vae_name_or_path",
        ),
        (lambda: load_uni("hf-hub:MahmoodLab/UNI2-h"), "MahmoodLab/UNI2-h", "--uni_model_name_or_path"),
        (
            lambda: load_transformer("StonyBrook-CVLab/PixCell-256"),
            "StonyBrook-CVLab/PixCell-256",
            "--pretrained_model_name_or_path",
        ),
    ],
)
def test_unreachable_gated_repo_names_repo_and_the_way_out(load, repo, flag):
    with pytest.raises(GatedModelError) as error:
        load()
    message = str(error.value)
    assert repo in message and "gated" in message and "hf auth login" in message and flag in message


def test_local_path_errors_are_not_disguised_as_hub_errors(tmp_path):
    with pytest.raises(OSError) as error:
        load_vae(str(tmp_path))
    assert not isinstance(error.value, GatedModelError)


def test_mismatched_uni_and_transformer_are_refused_at_load(stack):
    small = PixCellTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        cross_attention_dim=16,
        sample_size=8,
        caption_channels=48,
    )
    with pytest.raises(ValueError, match="48"):
        check_stack_compatible(small, stack.uni, None)


def test_remote_pipeline_needs_explicit_opt_in():
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_remote_pipeline("StonyBrook-CVLab/PixCell-256", vae=None)


def test_remote_pipeline_code_can_import_modeling_layers_on_an_old_transformers(monkeypatch):
    import diffusers
    import transformers

    monkeypatch.setitem(sys.modules, "transformers.modeling_layers", None)  # as on a transformers without it
    monkeypatch.delattr(transformers, "modeling_layers", raising=False)
    calls = []

    def remote_code_loader(name, **kwargs):  # what the hub pipeline's module does first
        from transformers.modeling_layers import GradientCheckpointingLayer

        calls.append((name, kwargs["custom_pipeline"], GradientCheckpointingLayer.__name__))

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", remote_code_loader)
    load_remote_pipeline("StonyBrook-CVLab/PixCell-256", vae=None, trust_remote_code=True)
    repo, pipeline = "StonyBrook-CVLab/PixCell-256", "StonyBrook-CVLab/PixCell-pipeline"
    assert calls == [(repo, pipeline, "GradientCheckpointingLayer")]


def test_min_snr_weights_and_v_prediction_target(tiny_stack):
    from diffusers import DDPMScheduler

    from pixcell_ext.model.diffusion import snr_weights

    epsilon = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    t = torch.tensor([0, 100, 500, 999])
    snr = epsilon.alphas_cumprod[t] / (1 - epsilon.alphas_cumprod[t])
    assert torch.allclose(snr_weights(epsilon, t, 5.0), torch.clamp(snr, max=5.0) / snr)
    assert snr_weights(epsilon, t, 5.0)[-1] == 1.0  # high noise: SNR < gamma, weight 1
    v = DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type="v_prediction")
    assert torch.allclose(snr_weights(v, t, 5.0), torch.clamp(snr, max=5.0) / (snr + 1))

    class Oracle(torch.nn.Module):
        """Predicts exactly the v target, so the loss must be zero if the target follows prediction_type."""

        def forward(self, noisy, timesteps, uni, drop, labels, uni_drop):
            return torch.cat([v.get_velocity(latents, randomness.noise, timesteps)] * 2, dim=1), None

    latents = torch.randn(3, 16, 8, 8)
    spec = RandomnessSpec(seed=1, latent_shape=(16, 8, 8), num_train_timesteps=1000, cond_dropout=0.1)
    randomness = draw_step_randomness(torch.arange(3), epoch=0, spec=spec, device=torch.device("cpu"))
    assert diffusion_loss(Oracle(), v, latents, torch.randn(3, 1, 32), randomness).total == 0
    assert diffusion_loss(Oracle(), epsilon, latents, torch.randn(3, 1, 32), randomness).total > 0
