"""Learning tests on the committed mini stack: the science works, and these tests fail when it breaks.

The mini PixCell was pretrained on the toy SOURCE domain; the judge is a classifier trained on TARGET tiles of
a stream of its own, which the generator never saw. A short `--preset mini` adaptation through the real scripts
(training, then generation with the LoRA merged) must move generated tiles towards TARGET in the judge's feature
space, the generated tiles must keep the class of their reference, generation must apply what training learned,
and base-model samples must look like SOURCE.

Measured with the committed stack and the judge rebuilt on its own stream (1 thread, 2026-12-07; the runs are
seeded, so the values repeat up to float noise): base samples FD(encoder) 1.67 to SOURCE vs 18.5 to TARGET (ratio
0.09, bound 0.3), judge class fidelity 0.39 (bound 0.25, chance 0.11); samples from the learned null alone 22.5 vs
43.7 (ratio 0.51, bound 0.75); reference similarity 0.834 at guidance 1, 0.884 at 1.5, 0.883 at 2, 0.853 at 3 (the
test compares 1.5 with 1: gain 0.050, bound 0.025; guidance reversed or cancelled gives a gain <= 0); after 150
updates FD(judge) 18.5 vs 30.4 for the base (ratio 0.61, bound 0.75) and class fidelity 0.57 (bound 0.35);
generation's merged model differs from the unmerged trained one by 4e-5 levels on average (bound 0.5) and from the
base model by 13.7 (bound 3) (these two measured 2026-12-02, with the earlier judge, which they do not use).

Bug injection (benchmarks/RESULTS.md, "Learning tests against injected bugs", has the list and the test that
fails for each; a dropped latent shift fails `test_mini_assets.py::test_mini_vae_constants_standardise_its_latents`):
reversed guidance, guidance against the condition itself, a dropped or sign-flipped latent shift,
the variance channels used as epsilon in the loss or in the sampler, a zero null embedding at sampling, UNI2-h fed
unnormalised pixels, a merged LoRA that ignores its scale, and an adapter or LoRA not applied at generation.
"""

from __future__ import annotations

import subprocess

import pytest
import torch

from conftest import REPO, launch_command
from pixcell_ext import data
from pixcell_ext.evaluation import metrics
from pixcell_ext.generation import pipeline
from pixcell_ext.model import networks
from pixcell_ext.stacks import mini
from pixcell_ext.stacks import mini_eval as me
from pixcell_ext.stacks.mini import MINI_RESOLUTION
from pixcell_ext.training import run_directory

TRAIN_STEPS = 150
# Not the rank: the LoRA scale is then 2, so a merge (generation merges) that drops the scale shows in the samples.
LORA_ALPHA = 16
IMAGES_PER_CLASS = 6
SAMPLING_STEPS = 20
# Margins (measured values and headroom in the module docstring).
BASE_FD_RATIO = 0.3
BASE_FIDELITY = 0.25
ADAPTED_FD_RATIO = 0.75
ADAPTED_FIDELITY = 0.35
UNCONDITIONAL_IMAGES = 54
UNCONDITIONAL_FD_RATIO = 0.75
GUIDANCE = 1.0  # the mini generation preset's
MERGED_DIFFERENCE = 0.5  # mean absolute difference, in 8-bit levels
BASE_DIFFERENCE = 3.0
GUIDANCE_HIGH = 1.5  # the strongest pull towards the reference (benchmarks/RESULTS.md, issue 23)
GUIDANCE_GAIN = 0.025
ASSETS = mini.MINI_ASSETS


def run(command: list[str]) -> None:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    return mini.write_mini_stack(tmp_path_factory.mktemp("mini"), ASSETS, train_per_class=24, heldout_per_class=16)


@pytest.fixture(scope="module")
def parts(stack):
    torch.set_num_threads(2)
    vae = networks.load_vae(str(stack.vae))
    uni = networks.load_uni(str(stack.uni))
    return {
        "vae": vae,
        "uni": uni,
        "scheduler": networks.load_scheduler_config(str(stack.pixcell)),
        "judge": me.load_mini_judge(stack.judge),
        "target_train": me.encode_tiles(stack.target_train, vae, uni, MINI_RESOLUTION),
        "target_heldout": me.encode_tiles(stack.target_heldout, vae, uni, MINI_RESOLUTION),
        "source_heldout": me.encode_tiles(stack.source_heldout, vae, uni, MINI_RESOLUTION),
    }


def base_samples(stack, parts, references: me.TileFeatures, guidance_scale: float = GUIDANCE):
    """(images, class ids, reference rows) of the base model conditioned on `references`."""
    request = me.reference_request(references, IMAGES_PER_CLASS)
    images = me.generate(
        me.base_model(stack.pixcell), parts["scheduler"], parts["vae"], request, references,
        guidance_scale=guidance_scale, num_inference_steps=SAMPLING_STEPS,
    )  # fmt: skip
    return images, request.class_ids, request.references


@pytest.fixture(scope="module")
def adapted_samples(stack, tmp_path_factory):
    """`--preset mini` through the real scripts, briefly: train, then generate with the LoRA merged."""
    root = tmp_path_factory.mktemp("mini-run")
    common = ["--preset", "mini", "--mini_dir", str(stack.target_train.parent),
              *(f"--{flag}={value}" for flag, value in mini.mini_models(stack).items())]  # fmt: skip
    run(launch_command(1, "train_adapter_lora.py", *common, "--output_dir", str(root / "run"),
                       "--max_train_steps", str(TRAIN_STEPS), "--lora_alpha", str(LORA_ALPHA),
                       "--feature_cache", str(root / "cache"), "--checkpointing_steps", "100000",
                       "--validation_steps", "100000", "--report_to", "none"))  # fmt: skip
    run(launch_command(1, "generate_synthetic.py", *common, "--lora_dir", str(root / "run"),
                       "--output_dir", str(root / "synthetic"), "--num_images_per_class", str(IMAGES_PER_CLASS),
                       "--num_inference_steps", str(SAMPLING_STEPS)))  # fmt: skip
    index = data.scan_image_folder(root / "synthetic")
    images = torch.stack([data.load_tile(r.path, MINI_RESOLUTION) for r in index.records])
    return images, torch.tensor([r.label for r in index.records]), root / "run"


def encoder_fd_to_source_and_target(parts, images: torch.Tensor) -> tuple[float, float]:
    """FD of `images` to held-out SOURCE and to held-out TARGET tiles in the encoder's space."""
    embedding = parts["uni"](images).flatten(1)
    return tuple(
        metrics.frechet_distance(parts[name].embedding.flatten(1), embedding)
        for name in ("source_heldout", "target_heldout")
    )


def judge_fd(parts, real: me.TileFeatures, images: torch.Tensor) -> float:
    return metrics.frechet_distance(parts["judge"](real.pixels)[1], parts["judge"](images)[1])


def test_base_samples_are_source_tissue(stack, parts):
    """Reference-conditioned samples of the SOURCE-pretrained base model: closer to SOURCE than to TARGET tiles in
    the encoder's space, and of the reference's class."""
    source = parts["source_heldout"]
    images, class_ids, _ = base_samples(stack, parts, source)
    to_source, to_target = encoder_fd_to_source_and_target(parts, images)
    fidelity = me.class_fidelity(parts["judge"], images, class_ids, source.class_names)
    measured = {"fd_to_source": to_source, "fd_to_target": to_target, "fidelity": fidelity}
    assert to_source < BASE_FD_RATIO * to_target, measured
    assert fidelity >= BASE_FIDELITY, measured


def test_unconditional_samples_are_source_tissue(stack, parts):
    """Samples from the learned null embedding alone (guidance 1): the base model's unconditional distribution, which
    guidance contrasts against. A mistrained null leaves the tissue manifold; a zero null does not on this model (it
    lies close to the learned one), which `test_guidance_contrasts_with_the_learned_null_embedding` checks instead."""
    model = me.base_model(stack.pixcell)
    request = me.Request(torch.zeros(UNCONDITIONAL_IMAGES, dtype=torch.long), None)
    images = me.generate(model, parts["scheduler"], parts["vae"], request, parts["source_heldout"],
                         guidance_scale=1.0, num_inference_steps=SAMPLING_STEPS)  # fmt: skip
    to_source, to_target = encoder_fd_to_source_and_target(parts, images)
    assert to_source < UNCONDITIONAL_FD_RATIO * to_target, (to_source, to_target)


def test_guidance_pulls_samples_towards_their_reference(stack, parts):
    """Classifier-free guidance strengthens the condition: at a higher scale, a sample's embedding is closer to its
    reference's (cosine similarity, mean over samples)."""
    source = parts["source_heldout"]

    def similarity(guidance_scale: float) -> float:
        images, _, references = base_samples(stack, parts, source, guidance_scale)
        generated = torch.nn.functional.normalize(parts["uni"](images).flatten(1), dim=1)
        reference = torch.nn.functional.normalize(source.embedding[references].flatten(1), dim=1)
        return (generated * reference).sum(dim=1).mean().item()

    weak, strong = similarity(1.0), similarity(GUIDANCE_HIGH)
    assert strong >= weak + GUIDANCE_GAIN, (weak, strong)


def test_short_adaptation_moves_samples_to_target(stack, parts, adapted_samples):
    target = parts["target_heldout"]
    base_images, _, _ = base_samples(stack, parts, parts["target_train"])
    base_fd = judge_fd(parts, target, base_images)
    adapted_fd = judge_fd(parts, target, adapted_samples[0])
    assert adapted_fd <= ADAPTED_FD_RATIO * base_fd, (adapted_fd, base_fd)


def test_adapted_samples_keep_the_class_of_their_reference(parts, adapted_samples):
    images, labels, _ = adapted_samples
    fidelity = me.class_fidelity(parts["judge"], images, labels, parts["target_train"].class_names)
    assert fidelity >= ADAPTED_FIDELITY, fidelity


def test_generation_applies_what_training_learned(stack, parts, adapted_samples):
    """The generation script's model (LoRA merged into the weights) makes the tiles that the trained adapter + LoRA
    make unmerged, as training's validation saw them, and not the base model's. The run's LoRA alpha is not its
    rank, so a merge that drops the LoRA scale, a LoRA or an adapter left out at generation all show here."""
    run_dir = adapted_samples[2]
    request = me.reference_request(parts["target_train"], 2)

    def tiles(model) -> torch.Tensor:
        return me.generate(model, parts["scheduler"], parts["vae"], request, parts["target_train"],
                           guidance_scale=GUIDANCE, num_inference_steps=SAMPLING_STEPS).int()  # fmt: skip

    merged = pipeline.load_generation_model(networks.load_transformer(str(stack.pixcell)), str(run_dir), "mini")
    unmerged = run_directory.load_trained(run_dir, networks.load_transformer(str(stack.pixcell))).eval()
    trained = tiles(unmerged)
    merged_difference = (tiles(merged) - trained).abs().float().mean().item()
    base_difference = (tiles(me.base_model(stack.pixcell)) - trained).abs().float().mean().item()
    assert merged_difference < MERGED_DIFFERENCE, (merged_difference, base_difference)
    assert base_difference > BASE_DIFFERENCE, (merged_difference, base_difference)


def test_guidance_contrasts_with_the_learned_null_embedding(stack):
    """The unconditional branch is the checkpoint's learned null embedding, adapted. Checked directly: the mini
    model's null lies close to zero in its encoder's space (norm 1.9 against a spread of 7.9), so samples alone
    cannot tell a zero null from the learned one here, though for PixCell-256 they differ."""
    model = me.base_model(stack.pixcell)
    null = model.transformer.caption_projection.uncond_embedding
    assert null.norm() > 1.0, null.norm()
    expected = model.adapter(null.unsqueeze(0).expand(3, -1, -1), output_dtype=model.transformer.dtype)
    torch.testing.assert_close(model.unconditional_context(3), expected, rtol=0, atol=0)
