"""Does --class_conditioning make generated tiles land in the right class? A measurement on the tiny stack.

Trains the tiny stack twice on the tiny 9-class set (whose classes differ in colour and stripe frequency), without
and with `--class_conditioning`, then generates latents per class with a reference tile and without one
(unconditional for the plain model, class-only for the class-conditioned one) and classifies them.

The classifier works in latent space: a linear probe on per-channel latent mean/std, trained on the VAE latents of
the real tiles. The tiny VAE is random, so decoded pixels say nothing; the latents are what the diffusion model is
trained to reproduce, so whether a generated latent carries its class is exactly the question.

    python benchmarks/bench_class_conditioning.py            # about 5-10 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pixcell_ext.data import TileDataset, scan_image_folder, vae_input  # noqa: E402
from pixcell_ext.evaluation.probe import linear_probe  # noqa: E402
from pixcell_ext.model import networks  # noqa: E402
from pixcell_ext.model.sampling import sample_latents_cfg  # noqa: E402
from pixcell_ext.seeding import generator_for  # noqa: E402
from pixcell_ext.stacks.tiny import write_tiny_stack  # noqa: E402
from pixcell_ext.training.run_directory import load_trained  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/bench-class-conditioning")
    parser.add_argument("--tiny_dir", default="tiny_assets")
    parser.add_argument("--max_train_steps", type=int, default=300)
    parser.add_argument("--images_per_class", type=int, default=8)
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def train(output_dir: Path, args: argparse.Namespace, *extra: str) -> None:
    command = [
        sys.executable, str(REPO / "train_adapter_lora.py"), "--preset", "tiny", "--tiny_dir", args.tiny_dir,
        "--output_dir", str(output_dir), "--max_train_steps", str(args.max_train_steps), "--learning_rate", "3e-3",
        "--lora_rank", "8", "--lora_targets", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
        "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "--checkpointing_steps", "100000",
        "--validation_steps", "100000", "--dataloader_num_workers", "0", "--seed", str(args.seed), *extra,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"training failed:\n{result.stderr[-3000:]}")


def latent_features(latents: torch.Tensor) -> np.ndarray:
    """Per-channel mean and std: colour and texture energy of a tile, as a simple classifier would see them."""
    return torch.cat([latents.mean(dim=(2, 3)), latents.std(dim=(2, 3))], dim=1).numpy()


@torch.no_grad()
def generate(model, scheduler_config, contexts: torch.Tensor, seed: int, tag: str, args) -> torch.Tensor:
    generators = [generator_for(seed, tag, i) for i in range(len(contexts))]
    null = model.unconditional_context(len(contexts))
    return sample_latents_cfg(
        model.transformer, scheduler_config, contexts, null, generators,
        guidance_scale=args.guidance_scale, num_inference_steps=args.num_inference_steps,
    )  # fmt: skip


def main(args: argparse.Namespace) -> None:
    stack_paths = write_tiny_stack(args.tiny_dir)
    output_dir = Path(args.output_dir)
    runs = {"plain": output_dir / "plain", "class-conditioned": output_dir / "class-conditioned"}
    train(runs["plain"], args)
    train(runs["class-conditioned"], args, "--class_conditioning")

    stack = networks.load_pixcell_stack(str(stack_paths.pixcell), str(stack_paths.vae), str(stack_paths.uni))
    index = scan_image_folder(stack_paths.data)
    tiles = TileDataset(index, resolution=64)
    items = [tiles[i] for i in range(len(tiles))]
    labels = np.array([item["label"] for item in items])
    with torch.no_grad():
        real_latents = networks.encode_latent_distribution(
            stack.vae, vae_input(torch.stack([item["vae_pixels"] for item in items]))
        )[0]
        real_uni = stack.uni(torch.stack([item["uni_pixels"] for item in items]))
    real_features = latent_features((real_latents - stack.vae.config.shift_factor) * stack.vae.config.scaling_factor)

    classes = np.repeat(np.arange(len(index.class_names)), args.images_per_class)
    references = [
        np.flatnonzero(labels == c)[i % np.sum(labels == c)]
        for c, i in zip(classes, np.tile(np.arange(args.images_per_class), len(index.class_names)), strict=True)
    ]
    results = {}
    for name, run in runs.items():
        model = load_trained(run, networks.load_transformer(str(stack_paths.pixcell)))
        class_ids = torch.tensor(classes)
        with_reference = model.context(real_uni[references], labels=class_ids)
        without = (
            model.class_only_context(class_ids)
            if name == "class-conditioned"
            else (model.unconditional_context(len(classes)))
        )
        for scenario, contexts in (("with a reference tile", with_reference), ("without a reference", without)):
            latents = generate(model, stack.scheduler_config, contexts, args.seed, scenario, args)
            probe = linear_probe(real_features, labels, latent_features(latents), classes, seed=args.seed)
            results[(scenario, name)] = probe["balanced_accuracy"]

    print(
        f"class accuracy of a latent colour/texture probe on generated tiles ({args.images_per_class} per class, "
        f"{args.max_train_steps} training steps, chance = {1 / len(index.class_names):.3f})"
    )
    print(f"{'':26s}{'plain':>12s}{'class-conditioned':>20s}")
    for scenario in ("with a reference tile", "without a reference"):
        row = "".join(f"{results[(scenario, name)]:>{w}.3f}" for name, w in (("plain", 12), ("class-conditioned", 20)))
        print(f"{scenario:26s}{row}")
    print("without a reference: plain = unconditional embedding, class-conditioned = class embedding alone")


if __name__ == "__main__":
    main(parse_args())
