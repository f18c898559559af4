"""What limits the mini PixCell's conditioning: the base model measured on its own SOURCE domain.

PixCell is conditioned on the encoder's embedding of a reference tile, so a good base model turns a reference of
class c into a tile of class c, and guidance (`eps_u + g (eps_c - eps_u)`) makes that more likely, not less. These
measurements say how far the mini model is from that, and what caps the numbers:

- class fidelity: a logistic-regression probe on the encoder's embeddings, fitted on real SOURCE tiles, reads the
  generated tiles; the same probe on VAE round trips (encode, posterior mean, decode) of the references is the
  ceiling any generator decoded by this VAE can reach;
- similarity to the reference: the cosine between a generated tile's embedding and its reference's;
- the unconditional branch on its own (samples from the null embedding): guidance extrapolates away from it, so a
  weak one is amplified;
- how much the condition moves the prediction: ||eps_c - eps_u|| / ||eps_c|| by timestep.

Used by `benchmarks/bench_adaptation.py` (section `source`) and `benchmarks/ablate_pretraining.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pixcell_ext.evaluation import metrics
from pixcell_ext.model import networks
from pixcell_ext.model.conditioning import AdaptedPixCell
from pixcell_ext.stacks.mini_eval import Request, TileFeatures, generate, vae_round_trip
from pixcell_ext.stacks.mini_training import toy_arrays
from pixcell_ext.stacks.mini_uni import embed
from pixcell_ext.stacks.mini_vae import reconstruction_psnr
from pixcell_ext.stacks.toy_histology import DOMAINS

BATCH = 90  # encoder batches of the measurements in benchmarks/RESULTS.md (batching changes float rounding)


@dataclass
class EncoderProbe:
    """A linear probe on the encoder's embeddings and the references it is scored against.

    It is fitted on the tiles of `features` that are not references, so a reference is never in its training set.
    """

    classifier: object
    references: torch.Tensor  # row indices into the features

    def accuracy(self, embeddings: torch.Tensor, labels: torch.Tensor) -> float:
        predicted = self.classifier.predict(embeddings.flatten(1).numpy())
        return float((torch.as_tensor(predicted) == labels).float().mean())


def fit_encoder_probe(features: TileFeatures, references_per_class: int, seed: int = 0) -> EncoderProbe:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    generator = torch.Generator().manual_seed(seed)
    references, fit = [], []
    for label in range(len(features.class_names)):
        rows = torch.nonzero(features.labels == label).flatten()
        rows = rows[torch.randperm(len(rows), generator=generator)]
        references.append(rows[:references_per_class])
        fit.append(rows[references_per_class:])
    fit_rows = torch.cat(fit)
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    classifier.fit(features.embedding[fit_rows].flatten(1).numpy(), features.labels[fit_rows].numpy())
    return EncoderProbe(classifier, torch.cat(references))


def vae_ceiling(vae, uni: networks.UNIEncoder, features: TileFeatures, probe: EncoderProbe) -> dict[str, float]:
    """Probe accuracy on the references and on their VAE round trips, and the round trips' PSNR."""
    rows = probe.references
    labels = features.labels[rows]
    original = probe.accuracy(features.embedding[rows], labels)
    trip = probe.accuracy(embed(uni, vae_round_trip(vae, features, rows), BATCH), labels)
    return {
        "probe_references": original,
        "probe_round_trip": trip,
        "round_trip_probe_ratio": trip / original if original else float("nan"),
    }


def vae_psnr(vae, tiles: dict[str, tuple[torch.Tensor, torch.Tensor]], class_names: list[str]) -> dict[str, float]:
    """Pooled PSNR (dB) of VAE round trips per domain and over both, and the worst class's, from uint8 tiles."""
    result, errors = {}, []
    for domain, (pixels, labels) in tiles.items():
        result[f"psnr_{domain}"] = reconstruction_psnr(vae, pixels)
        mse = 10 ** (-result[f"psnr_{domain}"] / 10)
        errors.append((mse, len(pixels)))
        for label, name in enumerate(class_names):
            result[f"psnr_{domain}_{name}"] = reconstruction_psnr(vae, pixels[labels == label])
    pooled = sum(m * n for m, n in errors) / sum(n for _, n in errors)
    result["psnr_pooled"] = 10 * math.log10(1 / pooled)
    return result


@torch.no_grad()
def condition_strength(
    model: AdaptedPixCell, scheduler_config: dict, vae_config, features: TileFeatures, rows: torch.Tensor, seed: int = 0
) -> dict[str, float]:
    """||eps_c - eps_u|| / ||eps_c|| at a few timesteps on noised real latents: how much the condition steers."""
    transformer = model.transformer
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(features.latent_mean[rows].shape, generator=generator)
    latents = networks.posterior_latents(
        vae_config, features.latent_mean[rows], features.latent_std[rows], torch.zeros_like(noise)
    )
    alphas_cumprod = networks.training_scheduler(scheduler_config).alphas_cumprod
    context = model.context(features.embedding[rows])
    null = model.unconditional_context(len(rows))
    channels = transformer.config.in_channels
    result = {}
    for t in (100, 500, 900):
        abar = alphas_cumprod[t]
        noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
        timesteps = torch.full((len(rows),), t)
        eps_c = transformer(noisy, context, timestep=timesteps).sample[:, :channels]
        eps_u = transformer(noisy, null, timestep=timesteps).sample[:, :channels]
        result[f"condition_effect_t{t}"] = float((eps_c - eps_u).norm() / eps_c.norm())
    return result


def diagnose(
    model: AdaptedPixCell,
    scheduler_config: dict,
    vae,
    uni: networks.UNIEncoder,
    source: TileFeatures,
    probe: EncoderProbe,
    runs: Sequence[tuple[str, int, float]] = tuple(("dpm", 20, g) for g in (1.0, 1.5, 2.0, 3.0)),
    seed: int = 0,
) -> dict:
    """Reference-conditioned fidelity and similarity per (sampler, steps, guidance) run, the null branch alone, the
    condition's effect. Scores are in the encoder's space; FD against every held-out SOURCE tile."""
    rows = probe.references
    labels = source.labels[rows]
    real = source.embedding.flatten(1)
    reference_embeddings = torch.nn.functional.normalize(source.embedding[rows].flatten(1), dim=1)
    request = Request(labels, rows)
    result: dict = {"runs": []}
    for sampler, steps, scale in runs:
        images = generate(
            model, scheduler_config, vae, request, source,
            guidance_scale=scale, num_inference_steps=steps, seed=seed, sampler=sampler,
        )  # fmt: skip
        embeddings = embed(uni, images, BATCH)
        similarity = (torch.nn.functional.normalize(embeddings, dim=1) * reference_embeddings).sum(1)
        result["runs"].append(
            {
                "sampler": sampler,
                "steps": steps,
                "guidance": scale,
                "class_fidelity": probe.accuracy(embeddings, labels),
                "reference_similarity": float(similarity.mean()),
                "fd_encoder": metrics.frechet_distance(real, embeddings),
            }
        )
    null_images = generate(model, scheduler_config, vae, Request(labels, None), source, guidance_scale=1.0, seed=seed)
    result["fd_encoder_unconditional"] = metrics.frechet_distance(real, embed(uni, null_images, BATCH))
    result.update(condition_strength(model, scheduler_config, vae.config, source, rows, seed))
    best = max(result["runs"], key=lambda run: run["class_fidelity"])
    result["best"] = best
    return result


def source_and_target_tiles(per_class: int, size: int, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {domain: toy_arrays(domain, "heldout", per_class, size, seed) for domain in DOMAINS}
