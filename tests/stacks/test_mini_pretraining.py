"""The IDDPM objective of the mini PixCell pretraining, and the build writing a loadable PixCell folder."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from pixcell_ext.model import networks
from pixcell_ext.stacks.mini import PART_FOLDERS
from pixcell_ext.stacks.mini_pretraining import (
    GaussianDiffusion,
    PretrainingConfig,
    build_transformer,
    hybrid_loss,
    mini_transformer,
    normal_kl,
    null_embedding,
    vlb_term,
)
from pixcell_ext.stacks.mini_vae import VAEConfig, mini_vae


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion()


def test_schedule_matches_diffusers_ddpm(diffusion):
    """PixCell's betas as diffusers' scheduler defines them: the forward process and the posterior variance."""
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    x0, noise = torch.randn(4, 16, 8, 8), torch.randn(4, 16, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(diffusion.q_sample(x0, t, noise), scheduler.add_noise(x0, noise, t), atol=1e-5, rtol=0)
    for step in (1, 10, 500, 999):
        expected = scheduler._get_variance(step)  # float32 in diffusers
        assert math.isclose(diffusion.posterior_variance[step].item(), float(expected), rel_tol=1e-3)


def test_normal_kl_matches_torch(diffusion):
    m1, m2, lv1, lv2 = torch.randn(4, 10).double()
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)


def test_vlb_is_zero_for_exact_mean_and_posterior_variance(diffusion):
    """v = -1 selects the true posterior variance; with the true noise the mean is exact, so every L_t is 0."""
    x0, noise = torch.randn(5, 16, 8, 8).double(), torch.randn(5, 16, 8, 8).double()
    t = torch.tensor([0, 1, 250, 700, 999])
    x_t = diffusion.q_sample(x0, t, noise)
    exact = vlb_term(diffusion, noise, -torch.ones_like(x0), x0, x_t, t)
    torch.testing.assert_close(exact, torch.zeros(5, dtype=torch.float64), atol=1e-9, rtol=0)
    wrong_variance = vlb_term(diffusion, noise, torch.ones_like(x0), x0, x_t, t)
    wrong_mean = vlb_term(diffusion, noise + 0.1, -torch.ones_like(x0), x0, x_t, t)
    assert (wrong_variance[1:] > 0).all() and (wrong_mean > 0).all()


def test_learned_range_interpolates_between_beta_and_posterior_variance(diffusion):
    t = torch.tensor([3, 400])
    like = torch.zeros(2, 1, 1, 1)
    upper = diffusion.model_log_variance(torch.ones_like(like), t).flatten()
    lower = diffusion.model_log_variance(-torch.ones_like(like), t).flatten()
    middle = diffusion.model_log_variance(like, t).flatten()
    torch.testing.assert_close(upper, diffusion.betas[t].log().float())
    torch.testing.assert_close(lower, diffusion.posterior_variance[t].log().float())
    torch.testing.assert_close(middle, (upper + lower) / 2)


def test_hybrid_loss_trains_epsilon_by_mse_and_variance_by_vlb_only(diffusion):
    """L_hybrid's stop-gradient: the VLB term sends no gradient into the epsilon half."""
    x0, noise = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    t = torch.tensor([5, 300, 900])
    x_t = diffusion.q_sample(x0, t, noise)
    output = torch.randn(3, 32, 4, 4, requires_grad=True)
    loss = hybrid_loss(diffusion, output, x0, x_t, t, noise, vlb_weight=1e-3)
    (loss.vlb * 1e-3).backward()
    assert output.grad[:, :16].abs().max() == 0
    assert output.grad[:, 16:].abs().max() > 0
    output.grad = None
    loss = hybrid_loss(diffusion, output, x0, x_t, t, noise, vlb_weight=1e-3)
    loss.mse.backward()
    assert output.grad[:, 16:].abs().max() == 0
    torch.testing.assert_close(loss.total, loss.mse + 1e-3 * loss.vlb)


def test_build_writes_a_loadable_pixcell_folder(tiny_stack, tmp_path, one_thread):
    """The real loaders read the build; the null embedding is in the released buffer."""
    config = PretrainingConfig(num_layers=2, num_attention_heads=2, attention_head_dim=16, batch_size=8, num_steps=3)
    metrics = build_transformer(tmp_path, tiny_stack.vae, tiny_stack.uni, tiny_stack.data, seed=0, config=config)
    folder = tmp_path / PART_FOLDERS["transformer"]
    transformer = networks.load_transformer(str(folder))
    scheduler = networks.load_scheduler_config(str(folder))
    assert transformer.config.caption_channels == networks.load_uni(str(tiny_stack.uni)).embed_dim
    assert transformer.config.out_channels == 32 and transformer.config.sample_size == 8
    assert transformer.caption_projection.uncond_embedding.abs().sum() > 0
    assert scheduler["beta_schedule"] == "linear" and scheduler["prediction_type"] == "epsilon"
    assert metrics["num_tiles"] == 36 and math.isfinite(metrics["final_mse"])
    assert not list(tmp_path.glob(".*partial"))


def test_build_is_a_function_of_its_seed(tiny_stack, tmp_path, one_thread):
    """README: the stack is rebuilt deterministically. Same seed, same weights (threads fixed); another seed differs."""
    config = PretrainingConfig(num_layers=2, num_attention_heads=2, attention_head_dim=16, batch_size=8, num_steps=3)

    def build(name: str, seed: int) -> dict[str, torch.Tensor]:
        build_transformer(tmp_path / name, tiny_stack.vae, tiny_stack.uni, tiny_stack.data, seed=seed, config=config)
        folder = tmp_path / name / PART_FOLDERS["transformer"]
        return networks.load_transformer(str(folder)).state_dict()

    first, again, other = build("a", 0), build("b", 0), build("c", 1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_fixed_null_is_pixcells_untrained_random_vector(tiny_stack, tmp_path, one_thread):
    """`null_embedding="fixed"`: the saved null is `randn / sqrt(C)` from its own generator, untouched by training
    (PixCell's); a learned null moves from its start, the mean embedding."""
    small = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, batch_size=8, num_steps=3)

    def saved_null(name: str, kind: str) -> torch.Tensor:
        config = PretrainingConfig(**small, null_embedding=kind, learning_rate=1e-2, warmup_steps=1)
        build_transformer(tmp_path / name, tiny_stack.vae, tiny_stack.uni, tiny_stack.data, seed=0, config=config)
        folder = tmp_path / name / PART_FOLDERS["transformer"]
        return networks.load_transformer(str(folder)).caption_projection.uncond_embedding

    fixed, learned = saved_null("fixed", "fixed"), saved_null("learned", "learned")
    channels = fixed.shape[-1]
    expected = null_embedding(PretrainingConfig(null_embedding="fixed"), torch.zeros(1, 1, channels))
    torch.testing.assert_close(fixed, expected, rtol=0, atol=0)
    assert 0.5 < expected.norm() < 1.5  # randn / sqrt(C) has norm ~1 whatever C
    assert not torch.allclose(learned, fixed)


def test_a_snapshot_is_the_shorter_build(tiny_stack, tmp_path, one_thread):
    """The step-2 snapshot of a 4-step build equals a 2-step build: the schedule, EMA and draws do not depend on the
    run's length, so a training-length study needs one run, and a chosen snapshot is reproduced by `num_steps`."""
    small = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, batch_size=8, null_embedding="fixed")
    snapshots = {}

    def keep(step: int, model) -> None:
        snapshots[step] = {k: v.clone() for k, v in model.state_dict().items()}

    data = (tiny_stack.vae, tiny_stack.uni, tiny_stack.data)
    build_transformer(tmp_path / "long", *data, seed=0, config=PretrainingConfig(**small, num_steps=4),
                      on_snapshot=keep, snapshot_every=2)  # fmt: skip
    build_transformer(tmp_path / "short", *data, seed=0, config=PretrainingConfig(**small, num_steps=2))
    short = networks.load_transformer(str(tmp_path / "short" / PART_FOLDERS["transformer"])).state_dict()
    long = networks.load_transformer(str(tmp_path / "long" / PART_FOLDERS["transformer"])).state_dict()
    assert sorted(snapshots) == [2, 4]
    assert all(torch.equal(snapshots[2][k], short[k]) for k in short)
    assert all(torch.equal(snapshots[4][k], long[k]) for k in long)
    assert any(not torch.equal(short[k], long[k]) for k in short)


def test_caption_scale_only_scales_the_condition_token_at_initialisation():
    """`caption_scale` (an ablation of how loudly the condition enters the blocks) multiplies what the caption
    projection puts out, and nothing else: the rest of the initialisation is the same draw."""

    def build(scale: float):
        torch.manual_seed(0)
        config = PretrainingConfig(num_layers=2, caption_scale=scale)
        return mini_transformer(config, caption_channels=24, latent_size=8)

    plain, loud = build(1.0), build(4.0)
    condition = torch.randn(3, 1, 24)
    torch.testing.assert_close(loud.caption_projection(condition), 4 * plain.caption_projection(condition))
    others = {k: v for k, v in plain.state_dict().items() if not k.startswith("caption_projection.linear_2")}
    assert all(torch.equal(v, loud.state_dict()[k]) for k, v in others.items())


def test_build_reads_the_latent_size_off_the_vae(tiny_stack, tmp_path, one_thread):
    """A 4x VAE (the latent-size ablation) gives 16x16 latents at the mini resolution; the build must size the
    transformer from the VAE, not from SD3.5's factor of 8 (which would train on 32 px tiles)."""
    vae = mini_vae(VAEConfig(block_out_channels=(8, 8, 8), norm_num_groups=4))
    vae.register_to_config(shift_factor=0.0, scaling_factor=1.0)
    vae.save_pretrained(tmp_path / "vae4x" / "vae")
    config = PretrainingConfig(num_layers=1, num_attention_heads=2, attention_head_dim=16, batch_size=4, num_steps=1,
                               patch_size=2)  # fmt: skip
    build_transformer(tmp_path / "out", tmp_path / "vae4x", tiny_stack.uni, tiny_stack.data, seed=0, config=config)
    transformer = networks.load_transformer(str(tmp_path / "out" / PART_FOLDERS["transformer"]))
    assert networks.vae_scale_factor(vae) == 4
    assert transformer.config.sample_size == 16
