"""Build the trained mini stack: a PixCell-like stack small enough to train on two CPU cores, in the real layouts.

This module is the command line that builds the parts in order and records how each was made. Each part is trained
on the toy domains (`toy_histology`) and written where the real loaders expect it:

- `sd35-vae-mini/vae/`: a diffusers `AutoencoderKL` with the SD3.5 layout, built by `pixcell_ext.stacks.mini_vae`.
- `uni2h-mini/`: UNI2-h's timm architecture at small width and depth, hub-style, built by `pixcell_ext.stacks.mini_uni`.
- `judge/`: an independent classifier (a small timm ResNet) trained on TARGET, for the class fidelity of generated
  tiles and as a second feature space, built by `pixcell_ext.stacks.judge.build_judge` next to its loader `load_judge`.
- `pixcell-256-mini/`: the transformer, pretrained on SOURCE by `pixcell_ext.stacks.mini_pretraining` (called from
  here).

The VAE, encoder and judge share their toy tensors, augmentations and training loop
(`pixcell_ext.stacks.mini_training`).
Every part is written atomically with a `build_info.json` (command, seed, wall time, measured quality, versions).
The build is a function of its seed: data, initialisation and batches come from seeded generators.

    python -m pixcell_ext.stacks.mini_stack --output_dir pixcell_ext/assets/mini --seed 0 --parts vae uni judge
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from pixcell_ext import NCT_CLASSES
from pixcell_ext.files import write_folder_once, write_json_atomically
from pixcell_ext.stacks.judge import build_judge
from pixcell_ext.stacks.mini import MINI_ASSETS, PART_FOLDERS
from pixcell_ext.stacks.mini_uni import build_uni
from pixcell_ext.stacks.mini_vae import build_vae
from pixcell_ext.stacks.toy_histology import write_toy_dataset

PARTS = tuple(PART_FOLDERS)


# ------------------------------------------------------------------------------------------------------------------
# Transformer (pixcell_ext.stacks.mini_pretraining)
# ------------------------------------------------------------------------------------------------------------------

TRANSFORMER_SOURCE_TILES_PER_CLASS = 300


def build_transformer_part(output_dir: Path, seed: int) -> dict:
    """Pretrain the mini PixCell on SOURCE tiles with the VAE and encoder already in `output_dir`."""
    try:
        pretraining = importlib.import_module("pixcell_ext.stacks.mini_pretraining")
    except ModuleNotFoundError as error:
        raise SystemExit(
            "The transformer part needs pixcell_ext/stacks/mini_pretraining.py, which this checkout does not have."
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
        "command": " ".join(["python -m pixcell_ext.stacks.mini_stack", *sys.argv[1:]]),
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
        help="Intra-op threads. The thread count changes float rounding: reproduce a committed part with the value in "
        "its build_info.json (VAE and encoder: 1, judge and transformer: 2).",
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
