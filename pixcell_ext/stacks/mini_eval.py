"""Measurements on the mini stack: does adaptation move generated tiles towards TARGET, do they keep their class?

Shared by `benchmarks/bench_adaptation.py` and the learning tests. Features of real tiles are computed once; an
adaptation variant is trained in process on cached features with the package's own loss, randomness and LoRA code,
and sampled with the package's guided sampler, so a bug in any of them moves these numbers.

Scores use the independent judge (`pixcell_ext.stacks.judge`, a classifier trained on real TARGET tiles, which the
generator never saw): its logits give class fidelity, its penultimate activations a second feature space for FD/KID.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pixcell_ext import data
from pixcell_ext.evaluation import metrics
from pixcell_ext.files import write_png_atomically
from pixcell_ext.model import diffusion, networks
from pixcell_ext.model.adapter import AdapterConfig, UNIAdapter
from pixcell_ext.model.conditioning import AdaptedPixCell
from pixcell_ext.model.lora import LoRAConfig, inject_lora, lora_parameters
from pixcell_ext.model.sampling import sample_latents_cfg, to_uint8_images
from pixcell_ext.seeding import generator_for

SELF_ATTENTION = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
CROSS_ATTENTION = ("attn2.to_v", "attn2.to_out.0")


@dataclass
class TileFeatures:
    """One folder of tiles, encoded once: VAE posterior, encoder embedding, labels, and the pixels."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    embedding: torch.Tensor  # [N, 1, D]
    labels: torch.Tensor
    class_names: list[str]
    pixels: torch.Tensor  # uint8 [N, 3, r, r] at the VAE's resolution: what a generated tile is compared with


@torch.no_grad()
def encode_tiles(folder: str | os.PathLike, vae, uni: networks.UNIEncoder, resolution: int, batch_size: int = 90):
    index = data.scan_image_folder(folder)
    dataset = data.TileDataset(index, resolution)
    parts: dict[str, list[torch.Tensor]] = {"mean": [], "std": [], "embedding": [], "pixels": []}
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        vae_pixels = torch.stack([item["vae_pixels"] for item in items])
        mean, std = networks.encode_latent_distribution(vae, data.vae_input(vae_pixels))
        parts["mean"].append(mean)
        parts["std"].append(std)
        parts["embedding"].append(uni(torch.stack([item["uni_pixels"] for item in items])).float())
        parts["pixels"].append(vae_pixels)
    labels = torch.tensor([record.label for record in index.records])
    joined = {name: torch.cat(values) for name, values in parts.items()}
    return TileFeatures(
        joined["mean"], joined["std"], joined["embedding"], labels, list(index.class_names), joined["pixels"]
    )


# ---------------------------------------------------------------------------------------------- judge


class JudgeScores:
    """Logits and penultimate features of a classifier, for uint8 [B, 3, H, W] images.

    The features are the input of the classifier's last linear layer, captured by a hook, so any architecture
    whose head is a final `nn.Linear` works.
    """

    def __init__(self, model: nn.Module, class_names: list[str]):
        self.model = model.eval()
        self.class_names = list(class_names)
        self.head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 90) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = [], []
        captured: list[torch.Tensor] = []
        handle = self.head.register_forward_hook(lambda module, args, output: captured.append(args[0].detach()))
        try:
            for start in range(0, images.shape[0], batch_size):
                captured.clear()
                logits.append(self.model(images[start : start + batch_size]).float())
                features.append(captured[-1].flatten(1).float())
        finally:
            handle.remove()
        return torch.cat(logits), torch.cat(features)


def load_mini_judge(path: str | os.PathLike) -> JudgeScores:
    from pixcell_ext.stacks.judge import load_judge

    model, class_names = load_judge(path)
    return JudgeScores(model, class_names)


# ---------------------------------------------------------------------------------------------- adaptation


@dataclass(frozen=True)
class Variant:
    """One adaptation at a fixed budget: which parts train, where LoRA goes, the class-aware options."""

    name: str
    adapter: bool = True
    lora: bool = True
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = SELF_ATTENTION + CROSS_ATTENTION
    lora_blocks: tuple[int, ...] | None = None
    class_conditioning: bool = False
    class_loss_weight: float = 0.0


@dataclass(frozen=True)
class Budget:
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    adapter_hidden_dim: int = 256
    cond_dropout: float = 0.1
    reference_dropout: float = 0.1
    seed: int = 0


@dataclass
class Adapted:
    model: AdaptedPixCell
    trainable_adapter: int
    trainable_lora: int
    final_loss: float
    losses: list[float] = field(default_factory=list)


def _batches(sampler: data.EpochSampler, batch_size: int) -> Iterator[tuple[torch.Tensor, int]]:
    """(sample ids, epoch) of full batches, epoch after epoch, as the training script's sampler orders them."""
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        ids = [index for index, _ in sampler]
        for start in range(0, len(ids) - batch_size + 1, batch_size):
            yield torch.tensor(ids[start : start + batch_size]), epoch


def adapt(
    pixcell: str | os.PathLike,
    scheduler_config: dict,
    vae_config,
    train: TileFeatures,
    variant: Variant,
    budget: Budget,
) -> Adapted:
    """Adapt a fresh copy of the base model on cached TARGET features, with the training script's loss and draws."""
    transformer = networks.load_transformer(str(pixcell))
    torch.manual_seed(budget.seed)
    if variant.lora:
        inject_lora(
            transformer,
            LoRAConfig(variant.lora_rank, variant.lora_rank, variant.lora_targets, blocks=variant.lora_blocks),
        )
    class_names = tuple(train.class_names) if variant.class_conditioning or variant.class_loss_weight > 0 else ()
    adapter = UNIAdapter(
        AdapterConfig(
            transformer.config.caption_channels,
            1,
            budget.adapter_hidden_dim,
            class_names=class_names,
            class_conditioning=variant.class_conditioning,
            class_head=variant.class_loss_weight > 0,
        )
    )
    adapter.requires_grad_(variant.adapter)
    model = AdaptedPixCell(transformer, adapter)
    lora = lora_parameters(transformer) if variant.lora else []
    trainable = [p for p in adapter.parameters() if p.requires_grad] + lora
    optimizer = torch.optim.AdamW(trainable, lr=budget.learning_rate, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / budget.warmup_steps))
    noise_scheduler = networks.training_scheduler(scheduler_config)
    spec = diffusion.RandomnessSpec(
        seed=budget.seed,
        latent_shape=tuple(train.latent_mean.shape[1:]),
        num_train_timesteps=noise_scheduler.config.num_train_timesteps,
        cond_dropout=budget.cond_dropout,
        reference_dropout=budget.reference_dropout if variant.class_conditioning else 0.0,
    )
    batches = _batches(data.EpochSampler(train.labels.tolist(), budget.seed), budget.batch_size)
    losses = []
    model.train()
    for _ in range(budget.steps):
        ids, epoch = next(batches)
        randomness = diffusion.draw_step_randomness(ids, epoch=epoch, spec=spec, device=torch.device("cpu"))
        latents = networks.posterior_latents(
            vae_config, train.latent_mean[ids], train.latent_std[ids], randomness.posterior_noise
        )
        terms = diffusion.diffusion_loss(
            model,
            noise_scheduler,
            latents,
            train.embedding[ids],
            randomness,
            labels=train.labels[ids],
            class_loss_weight=variant.class_loss_weight,
        )
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(terms.diffusion.item())
    model.eval()
    return Adapted(
        model,
        sum(p.numel() for p in adapter.parameters() if p.requires_grad),
        sum(p.numel() for p in lora),
        float(np.mean(losses[-50:])) if losses else float("nan"),
        losses,
    )


def base_model(pixcell: str | os.PathLike) -> AdaptedPixCell:
    """The pretrained model with an identity adapter: exactly the base PixCell."""
    transformer = networks.load_transformer(str(pixcell))
    return AdaptedPixCell(transformer, UNIAdapter(AdapterConfig(transformer.config.caption_channels, 1, 8))).eval()


# ---------------------------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class Request:
    """What to generate: one image per row of `references` (indices into a TileFeatures) or per class id."""

    class_ids: torch.Tensor
    references: torch.Tensor | None  # None: class-only (class conditioning) or unconditional


def reference_request(features: TileFeatures, per_class: int, seed: int = 0) -> Request:
    """The first `per_class` tiles of each class in a seeded order, as references."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in range(len(features.class_names)):
        rows = torch.nonzero(features.labels == label).flatten()
        chosen.append(rows[torch.randperm(len(rows), generator=generator)[:per_class]])
    references = torch.cat(chosen)
    return Request(features.labels[references], references)


@torch.no_grad()
def generate(
    model: AdaptedPixCell,
    scheduler_config: dict,
    vae,
    request: Request,
    features: TileFeatures,
    *,
    guidance_scale: float = 2.0,
    num_inference_steps: int = 20,
    seed: int = 0,
    batch_size: int = 90,
    sampler: str = "dpm",
) -> torch.Tensor:
    """uint8 [N, 3, r, r]: reference-conditioned, class-only (class conditioning) or unconditional samples."""
    images = []
    for start in range(0, len(request.class_ids), batch_size):
        class_ids = request.class_ids[start : start + batch_size]
        count = len(class_ids)
        labels = class_ids if model.adapter.class_embedding is not None else None
        if request.references is not None:
            context = model.context(features.embedding[request.references[start : start + batch_size]], labels=labels)
        elif labels is not None:
            context = model.class_only_context(labels)
        else:
            context = model.unconditional_context(count)
        generators = [generator_for(seed, "mini-eval", start + i) for i in range(count)]
        latents = sample_latents_cfg(
            model.transformer,
            scheduler_config,
            context,
            model.unconditional_context(count),
            generators,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            sampler=sampler,
        )
        images.append(to_uint8_images(networks.decode_latents(vae, latents)).permute(0, 3, 1, 2))
    return torch.cat(images)


# ---------------------------------------------------------------------------------------------- scores


def distribution_scores(
    real: torch.Tensor, fake: torch.Tensor, prefix: str, *, real_labels: torch.Tensor, fake_labels: torch.Tensor
) -> dict[str, float]:
    """FD, KID (x1000) and k-NN precision/recall between two class-stratified feature sets.

    KID is the evaluation's class-reweighted whole-set estimate (`metrics.mmd2_unbiased`): the plain U-statistic
    under-weights same-class pairs of stratified sets, reads below zero for equal distributions and drifts further
    as generated classes separate, which would favour class-faithful variants."""
    kid = metrics.mmd2_unbiased(real, fake, real_groups=real_labels.tolist(), fake_groups=fake_labels.tolist())
    precision, recall = metrics.precision_recall(real, fake)
    return {
        f"fd_{prefix}": metrics.frechet_distance(real, fake),
        f"kid_{prefix}_x1000": 1000 * kid,
        f"precision_{prefix}": precision,
        f"recall_{prefix}": recall,
    }


@torch.no_grad()
def vae_round_trip(vae, features: TileFeatures, rows: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, r, r]: the tiles of ``rows`` encoded (posterior mean) and decoded, nothing else.

    Scored like a generator's samples, they show the part of a gap to real tiles that is the autoencoder's, which no
    adapter or LoRA can close: a generator that matched the real latents exactly would score about this. (Not a
    strict bound per metric: a generator's decodings need not look like round trips.)"""
    return to_uint8_images(networks.decode_posterior_mean(vae, features.latent_mean[rows])).permute(0, 3, 1, 2)


def class_fidelity(judge: JudgeScores, images: torch.Tensor, class_ids: torch.Tensor, class_names: list[str]) -> float:
    """Fraction of generated tiles that the judge assigns to the class they were generated for."""
    logits, _ = judge(images)
    judged = [class_names.index(judge.class_names[i]) for i in logits.argmax(dim=1).tolist()]
    return float((torch.tensor(judged) == class_ids).float().mean())


def save_grid(images: torch.Tensor, path: str | os.PathLike, columns: int) -> Path:
    """A contact sheet of uint8 [N, 3, r, r] images, row-major."""
    count, _, size, _ = images.shape
    rows = -(-count // columns)
    sheet = np.full((rows * size, columns * size, 3), 255, np.uint8)
    for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        r, c = divmod(i, columns)
        sheet[r * size : (r + 1) * size, c * size : (c + 1) * size] = image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png_atomically(path, sheet)
    return path
