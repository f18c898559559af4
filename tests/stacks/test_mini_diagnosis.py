"""The base-model diagnosis: its probe never sees a reference, its ceiling and PSNR are what they say."""

import math

import pytest
import torch

from pixcell_ext.model import networks
from pixcell_ext.stacks import mini_diagnosis as md
from pixcell_ext.stacks import mini_eval as me
from pixcell_ext.stacks.mini_vae import reconstruction_psnr
from pixcell_ext.stacks.tiny import TINY_RESOLUTION


@pytest.fixture(scope="module")
def tiny_parts(tiny_stack):
    vae = networks.load_vae(str(tiny_stack.vae))
    uni = networks.load_uni(str(tiny_stack.uni))
    return vae, uni, me.encode_tiles(tiny_stack.data, vae, uni, TINY_RESOLUTION)


def test_probe_is_fitted_without_the_references(tiny_parts):
    _, _, features = tiny_parts
    probe = md.fit_encoder_probe(features, references_per_class=1, seed=0)
    references = set(probe.references.tolist())
    counts = torch.bincount(features.labels[probe.references], minlength=len(features.class_names))
    assert counts.tolist() == [1] * len(features.class_names)
    fitted_on = probe.classifier[0].n_samples_seen_  # the scaler saw exactly the non-reference rows
    assert fitted_on == len(features.labels) - len(references)
    again = md.fit_encoder_probe(features, references_per_class=1, seed=0)
    assert torch.equal(again.references, probe.references)


def test_round_trip_is_the_vae_alone_and_psnr_pools_the_squared_error(tiny_parts, one_thread):
    vae, _, features = tiny_parts
    pixels = features.pixels
    trip = me.vae_round_trip(vae, features, torch.arange(len(pixels)))
    assert trip.shape == pixels.shape and trip.dtype == torch.uint8
    direct = 10 * math.log10(1 / ((trip.float() - pixels.float()) / 255).pow(2).mean().item())
    assert abs(direct - reconstruction_psnr(vae, pixels)) < 0.1  # uint8 rounding of the decoded tile only
    halves = {"a": (pixels[::2], features.labels[::2]), "b": (pixels[1::2], features.labels[1::2])}
    scores = md.vae_psnr(vae, halves, features.class_names)
    assert scores["psnr_pooled"] == pytest.approx(reconstruction_psnr(vae, pixels), abs=1e-3)
    assert min(scores["psnr_a"], scores["psnr_b"]) <= scores["psnr_pooled"] <= max(scores["psnr_a"], scores["psnr_b"])
