"""Build the trained mini stack: a PixCell-like stack small enough to train on two CPU cores, in the real layouts.

Each part is trained on the toy domains (`toy_histology`) and written where the real loaders expect it:

- `sd35-vae-mini/vae/`: a diffusers `AutoencoderKL` with the SD3.5 layout (16 latent channels, 8x down-sampling),
  trained on SOURCE and TARGET tiles (the real SD3.5 VAE was trained on broad data and must represent any lab's
  tiles, or adaptation to TARGET could not show). Its `shift_factor`/`scaling_factor` are the mean and 1 / std of
  its latents on the training tiles, as for SD3, so `(z - shift) * scale` is standardised.
- `uni2h-mini/`: UNI2-h's timm architecture at small width and depth, hub-style (`config.json` + safetensors),
  trained on SOURCE with a temporary linear head (then dropped) so that its embedding separates the classes, through
  `UNIEncoder`'s own 224 px ImageNet preprocessing. Stain jitter keeps it from being a colour detector.
- `judge/`: an independent classifier (a small timm ResNet) trained on TARGET, for the class fidelity of generated
  tiles and as a second feature space. Read it with `pixcell_ext.judge.load_judge`, or as a timm encoder.
- `pixcell-256-mini/`: the transformer, pretrained on SOURCE by `pixcell_ext.mini_pretraining`.

Every part is written atomically with a `build_info.json` (command, seed, wall time, measured quality, versions).
The build is a function of its seed: data, initialisation and batches come from seeded generators.

    python -m pixcell_ext.mini_stack --output_dir pixcell_ext/assets/mini --seed 0 --parts vae uni judge
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from pixcell_ext import NCT_CLASSES, models
from pixcell_ext.data import dihedral, resized_uint8, vae_input
from pixcell_ext.files import write_folder_once, write_json_atomically
from pixcell_ext.mini import MINI_ASSETS, MINI_RESOLUTION, PART_FOLDERS
from pixcell_ext.seeding import derived_seed
from pixcell_ext.toy_histology import DOMAINS, REFERENCE_SIZE, toy_tiles, write_toy_dataset

PARTS = tuple(PART_FOLDERS)
# UNI2-h's mlp_ratio (2.66667 * 2) gives an odd hidden width at 64 channels, which SwiGLUPacked cannot split in two:
# 5.3125 is the nearest ratio with an even one (340).
UNI_MODEL_ARGS = {"depth": 4, "num_heads": 4, "embed_dim": 64, "mlp_ratio": 5.3125}
JUDGE_ARCHITECTURE = "resnet10t"
JUDGE_MODEL_ARGS = {"channels": [16, 32, 64, 128], "stem_width": 16}
JUDGE_IMAGE_SIZE = 64


# ------------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------------


def toy_arrays(domain: str, split: str, per_class: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, 3, size, size] tiles and their labels, resized from 224 px exactly as the data pipeline does."""
    images, labels = [], []
    tiles = toy_tiles(domain, split, per_class, REFERENCE_SIZE, seed)
    for class_index, _, tile in tqdm(tiles, total=per_class * len(NCT_CLASSES), desc=f"{domain} {split} tiles"):
        images.append(resized_uint8(Image.fromarray(tile), size))
        labels.append(class_index)
    return torch.stack(images), torch.tensor(labels)


def random_dihedral(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    codes = torch.randint(0, 8, (len(pixels),), generator=generator).tolist()
    return torch.stack([dihedral(p, code) for p, code in zip(pixels, codes, strict=True)])


def stain_jitter(images: torch.Tensor, generator: torch.Generator, strength: float) -> torch.Tensor:
    """Scale each channel's optical density by a random factor: a lab's stain shift, not a change of tissue.

    `images` are floats in [0, 1]; the result too.
    """
    density = -torch.log(images.clamp(min=1 / 255))
    gains = torch.exp(strength * torch.randn(len(images), 3, 1, 1, generator=generator))
    bias = 0.5 * strength * torch.randn(len(images), 3, 1, 1, generator=generator).abs()
    return torch.exp(-(density * gains + bias)).clamp(0, 1)


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _train(
    parameters: list[nn.Parameter],
    loss_fn: Callable[[int], torch.Tensor],
    steps: int,
    learning_rate: float,
    desc: str,
    weight_decay: float = 0.0,
) -> list[float]:
    """AdamW with warmup and cosine decay; `loss_fn(step)` draws its own batch. Returns the loss history."""
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _cosine_lr(step, steps, max(1, steps // 20)))
    history = []
    progress = tqdm(range(steps), desc=desc)
    for step in progress:
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        history.append(loss.item())
        if step % 10 == 0:
            progress.set_postfix(loss=f"{np.mean(history[-20:]):.4f}")
    return history


# ------------------------------------------------------------------------------------------------------------------
# VAE
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VAEConfig:
    block_out_channels: tuple[int, ...] = (16, 32, 64, 64)
    norm_num_groups: int = 8
    tiles_per_class: int = 64  # per domain
    steps: int = 1000
    batch_size: int = 16
    learning_rate: float = 2e-3
    kl_weight: float = 2e-7  # on the summed KL per tile: small, as in the LDM/SD autoencoders
    # The trained latents come out nearly standard (mean ~0, std ~0.93), so a dropped shift or scale would change
    # nothing. SD3.5's raw latents are not (shift 0.0609, scale 1.5305), and the mini stack must show such bugs: the
    # raw latent space is re-expressed as gain * z + offset, which moves shift * scale to about 0.5.
    latent_gain: float = 0.6
    latent_offset: float = 0.3
    decoder_steps: int = 600  # decoder-only fine-tuning after the re-expression (the encoder is then final)
    decoder_learning_rate: float = 5e-4


def mini_vae(config: VAEConfig):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=config.block_out_channels,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=config.norm_num_groups,
        sample_size=MINI_RESOLUTION,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    # Start with a narrow posterior (std ~0.05), as a trained VAE has: at the default std ~1 the sampled latents are
    # mostly noise and the first hundreds of steps only learn to shrink it.
    with torch.no_grad():
        vae.encoder.conv_out.bias[16:].fill_(-6.0)
    return vae


@torch.no_grad()
def latent_statistics(
    vae, pixels: torch.Tensor, generator: torch.Generator, batch_size: int = 64
) -> tuple[float, float]:
    """Mean and std of posterior samples over `pixels`: SD3's `shift_factor` and 1 / `scaling_factor`."""
    samples = []
    for start in range(0, len(pixels), batch_size):
        dist = vae.encode(vae_input(pixels[start : start + batch_size])).latent_dist
        samples.append(dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator))
    latents = torch.cat(samples)
    return latents.mean().item(), latents.std().item()


@torch.no_grad()
def reconstruction_psnr(vae, pixels: torch.Tensor, batch_size: int = 64, sample: bool = False) -> float:
    """PSNR (dB, images in [0, 1]) of the pooled squared error, through the PixCell latent path.

    Encode to PixCell latents `(z - shift) * scale` and decode back (`models.decode_latents`); with `sample` the
    posterior is sampled as training does, otherwise its mean is used.
    """
    errors = []
    generator = torch.Generator().manual_seed(0)
    for start in range(0, len(pixels), batch_size):
        images = vae_input(pixels[start : start + batch_size])
        mean, std = models.encode_latent_distribution(vae, images)
        noise = torch.randn(mean.shape, generator=generator) if sample else torch.zeros_like(mean)
        latents = models.posterior_latents(vae.config, mean, std, noise)
        decoded = models.decode_latents(vae, latents)
        errors.append(((decoded - images) / 2).pow(2).flatten(1).mean(1))
    return 10 * math.log10(1 / torch.cat(errors).mean().item())


def offset_raw_latents(vae, gain: float, offset: float) -> None:
    """Re-express the VAE's raw latents as `gain * z + offset` without changing what they encode.

    The encoder side is exact (the posterior mean is scaled and offset, its std scaled). The decoder's first
    convolution takes the inverse, which is exact except where its zero padding now stands for a different latent
    value, on the border cells: the decoder fine-tuning that follows absorbs that.
    """
    with torch.no_grad():
        head = vae.encoder.conv_out
        channels = vae.config.latent_channels
        head.weight[:channels] *= gain
        head.bias[:channels] = gain * head.bias[:channels] + offset
        head.bias[channels:] += 2 * math.log(gain)
        first = vae.decoder.conv_in
        first.bias -= (offset / gain) * first.weight.sum(dim=(1, 2, 3))
        first.weight /= gain


def finish_vae(vae, train: torch.Tensor, seed: int, shift: float, std: float, config: VAEConfig) -> list[float]:
    """Second stage of the build, from the first stage's VAE and raw latent statistics `shift`, `std`.

    Re-expresses the raw latents (`offset_raw_latents`), writes the matching constants (the same statistics, moved
    by the same affine map, so PixCell latents `(z - shift) * scale` are unchanged), then fine-tunes the decoder alone.
    """
    offset_raw_latents(vae, config.latent_gain, config.latent_offset)
    vae.register_to_config(
        shift_factor=config.latent_gain * shift + config.latent_offset,
        scaling_factor=1.0 / (config.latent_gain * std),
    )
    generator = torch.Generator().manual_seed(derived_seed(seed, "vae-decoder"))
    vae.encoder.requires_grad_(False)

    def loss_fn(step: int) -> torch.Tensor:
        ids = torch.randint(0, len(train), (config.batch_size,), generator=generator)
        images = vae_input(random_dihedral(train[ids], generator))
        with torch.no_grad():
            dist = vae.encode(images).latent_dist
            latents = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator)
        return F.mse_loss(vae.decode(latents).sample, images)

    vae.decoder.train()
    history = _train(
        list(vae.decoder.parameters()), loss_fn, config.decoder_steps, config.decoder_learning_rate, "vae decoder"
    )
    vae.eval()
    return history


def heldout_psnr(vae, seed: int, suffix: str = "") -> dict:
    metrics = {}
    for domain in DOMAINS:
        heldout, _ = toy_arrays(domain, "heldout", 8, MINI_RESOLUTION, seed)
        metrics[f"psnr_heldout_{domain}{suffix}"] = round(reconstruction_psnr(vae, heldout), 2)
        metrics[f"psnr_heldout_{domain}{suffix}_sampled"] = round(reconstruction_psnr(vae, heldout, sample=True), 2)
    return metrics


def build_vae(folder: Path, seed: int, config: VAEConfig = VAEConfig()) -> dict:
    """Train the mini VAE on SOURCE + TARGET train tiles and save it to `folder/vae` with measured latent constants."""
    torch.manual_seed(seed)
    train = torch.cat([toy_arrays(d, "train", config.tiles_per_class, MINI_RESOLUTION, seed)[0] for d in DOMAINS])
    vae = mini_vae(config)
    generator = torch.Generator().manual_seed(seed)

    def loss_fn(step: int) -> torch.Tensor:
        ids = torch.randint(0, len(train), (config.batch_size,), generator=generator)
        images = vae_input(random_dihedral(train[ids], generator))
        dist = vae.encode(images).latent_dist
        latents = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator)
        decoded = vae.decode(latents).sample
        return F.mse_loss(decoded, images) + config.kl_weight * dist.kl().mean()

    vae.train()
    history = _train(list(vae.parameters()), loss_fn, config.steps, config.learning_rate, "vae")
    vae.eval()
    shift, std = latent_statistics(vae, train, generator)
    vae.register_to_config(shift_factor=shift, scaling_factor=1.0 / std)
    metrics = {"first_stage_shift_factor": shift, "first_stage_scaling_factor": 1.0 / std}
    metrics.update(heldout_psnr(vae, seed, "_first_stage"))
    metrics["final_train_mse_first_stage"] = float(np.mean(history[-50:]))
    decoder_history = finish_vae(vae, train, seed, shift, std, config)
    vae.save_pretrained(folder / "vae")
    metrics.update(
        shift_factor=vae.config.shift_factor,
        scaling_factor=vae.config.scaling_factor,
        final_train_mse=float(np.mean(decoder_history[-50:])),
        **heldout_psnr(vae, seed),
    )
    return {"metrics": metrics, "config": asdict(config), "train_tiles": len(train)}


# ------------------------------------------------------------------------------------------------------------------
# Encoder (UNI2-h family)
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderConfig:
    tiles_per_class: int = 40
    steps: int = 200
    batch_size: int = 16
    learning_rate: float = 1e-3
    stain_jitter: float = 0.15
    low_resolution_probability: float = 0.3  # generated tiles are MINI_RESOLUTION px, upsampled to 224 by UNIEncoder


def mini_uni_vit():
    import timm

    vit = timm.create_model(
        models.UNI2H_ARCHITECTURE, pretrained=False, **{**models.uni2h_timm_kwargs(), **UNI_MODEL_ARGS}
    )
    # UNI2-h's LayerScale starts at 1e-5 for a 24-block model; four blocks trained from scratch learn faster at 1.
    with torch.no_grad():
        for name, parameter in vit.named_parameters():
            if name.endswith((".ls1.gamma", ".ls2.gamma")):
                parameter.fill_(1.0)
    return vit


def augment_for_encoder(pixels: torch.Tensor, generator: torch.Generator, config: EncoderConfig) -> torch.Tensor:
    """Dihedral, stain jitter and, sometimes, the blur of a MINI_RESOLUTION tile upsampled to 224 px; [0, 1] out."""
    images = stain_jitter(random_dihedral(pixels, generator).float() / 255, generator, config.stain_jitter)
    low = torch.rand(len(images), generator=generator) < config.low_resolution_probability
    if low.any():
        small = F.interpolate(images[low], size=MINI_RESOLUTION, mode="bicubic", antialias=True).clamp(0, 1)
        # Back to 224 px exactly as UNIEncoder.preprocess upsamples a generated tile.
        images[low] = F.interpolate(small, size=REFERENCE_SIZE, mode="bicubic", antialias=True).clamp(0, 1)
    return images


@torch.no_grad()
def embed(encoder: models.UNIEncoder, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    return torch.cat([encoder(images[i : i + batch_size]).squeeze(1) for i in range(0, len(images), batch_size)])


def linear_probe_accuracy(train_x, train_y, test_x, test_y) -> float:
    """Balanced accuracy of a logistic-regression probe on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    probe.fit(train_x.numpy(), train_y.numpy())
    return float(balanced_accuracy_score(test_y.numpy(), probe.predict(test_x.numpy())))


def encoder_probe_metrics(encoder: models.UNIEncoder, seed: int, per_class: int = 20) -> dict:
    """Linear-probe accuracy per domain (probe fit on train tiles, tested on held-out tiles), at 224 px and from
    MINI_RESOLUTION px tiles (what the encoder sees of generated tiles)."""
    metrics = {}
    for domain in DOMAINS:
        train_x, train_y = toy_arrays(domain, "train", per_class, REFERENCE_SIZE, seed + 1)
        test_x, test_y = toy_arrays(domain, "heldout", per_class, REFERENCE_SIZE, seed)
        fx, tx = embed(encoder, train_x), embed(encoder, test_x)
        metrics[f"probe_heldout_{domain}"] = round(linear_probe_accuracy(fx, train_y, tx, test_y), 4)
        small = F.interpolate(test_x.float() / 255, size=MINI_RESOLUTION, mode="bicubic", antialias=True)
        metrics[f"probe_heldout_{domain}_from_{MINI_RESOLUTION}px"] = round(
            linear_probe_accuracy(fx, train_y, embed(encoder, small.clamp(0, 1)), test_y), 4
        )
    return metrics


def build_uni(folder: Path, seed: int, config: EncoderConfig = EncoderConfig()) -> dict:
    """Train the mini UNI2-h on SOURCE with a temporary linear head; save the backbone hub-style."""
    torch.manual_seed(seed)
    pixels, labels = toy_arrays("source", "train", config.tiles_per_class, REFERENCE_SIZE, seed)
    encoder = models.UNIEncoder(mini_uni_vit())
    head = nn.Linear(encoder.embed_dim, len(NCT_CLASSES))
    generator = torch.Generator().manual_seed(seed)

    def loss_fn(step: int) -> torch.Tensor:
        ids = torch.randint(0, len(pixels), (config.batch_size,), generator=generator)
        images = augment_for_encoder(pixels[ids], generator, config)
        return F.cross_entropy(head(encoder(images).squeeze(1)), labels[ids])

    encoder.train()
    parameters = [*encoder.parameters(), *head.parameters()]
    history = _train(parameters, loss_fn, config.steps, config.learning_rate, "uni", weight_decay=0.05)
    encoder.eval()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in encoder.vit.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architecture": models.UNI2H_ARCHITECTURE,
                "model_args": UNI_MODEL_ARGS,
                "num_features": encoder.embed_dim,
            },
            indent=2,
        )
    )
    reloaded = models.load_uni(str(folder))
    metrics = {"final_train_loss": float(np.mean(history[-50:])), **encoder_probe_metrics(reloaded, seed)}
    return {"metrics": metrics, "config": asdict(config), "train_tiles": len(pixels)}


# ------------------------------------------------------------------------------------------------------------------
# Judge
# ------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeConfig:
    tiles_per_class: int = 80
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 3e-3
    stain_jitter: float = 0.05


def build_judge(folder: Path, seed: int, config: JudgeConfig = JudgeConfig()) -> dict:
    """Train a small timm ResNet on TARGET train tiles at JUDGE_IMAGE_SIZE px; save weights and a config."""
    import timm
    from safetensors.torch import save_file

    from pixcell_ext.judge import JUDGE_MEAN, JUDGE_STD, judge_input, load_judge

    torch.manual_seed(seed)
    pixels, labels = toy_arrays("target", "train", config.tiles_per_class, REFERENCE_SIZE, seed)
    small = judge_input(pixels, JUDGE_IMAGE_SIZE)  # [0, 1] at the judge's size, resized as load_judge does
    network = timm.create_model(JUDGE_ARCHITECTURE, pretrained=False, num_classes=len(NCT_CLASSES), **JUDGE_MODEL_ARGS)
    mean = torch.tensor(JUDGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(JUDGE_STD).view(1, 3, 1, 1)
    generator = torch.Generator().manual_seed(seed)

    def loss_fn(step: int) -> torch.Tensor:
        ids = torch.randint(0, len(small), (config.batch_size,), generator=generator)
        images = stain_jitter(random_dihedral(small[ids], generator), generator, config.stain_jitter)
        return F.cross_entropy(network((images - mean) / std), labels[ids])

    network.train()
    history = _train(list(network.parameters()), loss_fn, config.steps, config.learning_rate, "judge", 0.01)
    network.eval()
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, folder / "model.safetensors")
    write_json_atomically(
        folder / "config.json",
        {
            "architecture": JUDGE_ARCHITECTURE,
            "model_args": JUDGE_MODEL_ARGS,
            "num_classes": len(NCT_CLASSES),
            "class_names": list(NCT_CLASSES),
            "image_size": JUDGE_IMAGE_SIZE,
            "mean": list(JUDGE_MEAN),
            "std": list(JUDGE_STD),
        },
    )
    judge, class_names = load_judge(folder)
    metrics = {"final_train_loss": float(np.mean(history[-50:]))}
    for domain in DOMAINS:
        test_x, test_y = toy_arrays(domain, "heldout", 20, REFERENCE_SIZE, seed)
        with torch.no_grad():
            predicted = judge(test_x).argmax(1)
        metrics[f"accuracy_heldout_{domain}"] = round((predicted == test_y).float().mean().item(), 4)
    return {"metrics": metrics, "config": asdict(config), "train_tiles": len(pixels)}


# ------------------------------------------------------------------------------------------------------------------
# Transformer (pixcell_ext.mini_pretraining)
# ------------------------------------------------------------------------------------------------------------------

TRANSFORMER_SOURCE_TILES_PER_CLASS = 100


def build_transformer_part(output_dir: Path, seed: int) -> dict:
    """Pretrain the mini PixCell on SOURCE tiles with the VAE and encoder already in `output_dir`."""
    try:
        pretraining = importlib.import_module("pixcell_ext.mini_pretraining")
    except ModuleNotFoundError as error:
        raise SystemExit(
            "The transformer part needs pixcell_ext/mini_pretraining.py, which this checkout does not have."
        ) from error
    for part in ("vae", "uni"):
        if not (output_dir / PART_FOLDERS[part]).is_dir():
            raise SystemExit(f"Build the '{part}' part first: the transformer is pretrained on its outputs.")
    with tempfile.TemporaryDirectory() as tmp:
        source = write_toy_dataset(
            Path(tmp) / "source-train", "source", "train", TRANSFORMER_SOURCE_TILES_PER_CLASS, seed=seed
        )
        metrics = pretraining.build_transformer(
            output_dir, output_dir / PART_FOLDERS["vae"], output_dir / PART_FOLDERS["uni"], source, seed
        )
    return {"metrics": metrics, "train_tiles": TRANSFORMER_SOURCE_TILES_PER_CLASS * len(NCT_CLASSES)}


# ------------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------------

BUILDERS = {"vae": build_vae, "uni": build_uni, "judge": build_judge}


def build_info(seed: int, seconds: float, result: dict) -> dict:
    return {
        "command": " ".join(["python -m pixcell_ext.mini_stack", *sys.argv[1:]]),
        "seed": seed,
        "wall_seconds": round(seconds, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        **result,
    }


def build_part(part: str, output_dir: Path, seed: int, overwrite: bool = False) -> dict:
    """Build one part into `output_dir/<folder>` atomically and return its build info (an existing part is kept
    unless `overwrite`)."""
    target = output_dir / PART_FOLDERS[part]
    if overwrite and part != "transformer":
        shutil.rmtree(target, ignore_errors=True)
    started = time.perf_counter()
    if part == "transformer":
        result = build_transformer_part(output_dir, seed)
        info = build_info(seed, time.perf_counter() - started, result)
        write_json_atomically(target / "build_info.json", info)
        return info
    info = {}

    def writer(tmp: Path) -> None:
        result = BUILDERS[part](tmp, seed)
        info.update(build_info(seed, time.perf_counter() - started, result))
        write_json_atomically(tmp / "build_info.json", info)

    write_folder_once(target, writer)
    return info or json.loads((target / "build_info.json").read_text())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the mini PixCell stack on the toy histology domains.")
    parser.add_argument("--output_dir", default=str(MINI_ASSETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--overwrite", action="store_true", help="Rebuild parts that already exist.")
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="Intra-op threads. The committed build used 1: on a busy shared machine more threads were ~10x slower, "
        "and the thread count changes float rounding, so reproduce it with the same value.",
    )
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for part in PARTS:
        if part in args.parts:
            info = build_part(part, output_dir, args.seed, args.overwrite)
            print(f"{part}: {info.get('wall_seconds')} s, {json.dumps(info.get('metrics', {}))}")


if __name__ == "__main__":
    main(parse_args())
