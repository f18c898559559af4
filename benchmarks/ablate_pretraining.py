"""What limits the mini PixCell's conditioning? Pretraining variants measured on SOURCE, one factor at a time.

Each variant pretrains the mini transformer from scratch on the committed (or given) VAE and encoder with the
build's own code (`mini_pretraining.build_transformer`), saving an EMA snapshot every `--snapshot_every` updates,
so training length is read off one run. Every snapshot is then scored by `mini_diagnosis.diagnose`: class fidelity
of reference-conditioned samples (an encoder probe), similarity to the reference, the unconditional branch alone,
and the condition's effect on the prediction, per guidance scale.

    python benchmarks/ablate_pretraining.py --variants control fixed_null --steps 2000 --json outputs/ablation.json
    python benchmarks/ablate_pretraining.py --evaluate_only --output_dir outputs/ablation --json outputs/ablation.json

The toy domains are synthetic: the variants are compared with each other, not with PixCell-256.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pixcell_ext.model import networks  # noqa: E402
from pixcell_ext.stacks import mini  # noqa: E402
from pixcell_ext.stacks import mini_diagnosis as md  # noqa: E402
from pixcell_ext.stacks import mini_eval as me  # noqa: E402
from pixcell_ext.stacks.mini_pretraining import (  # noqa: E402
    PretrainingConfig,
    build_transformer,
    scheduler_for_sampling,
)
from pixcell_ext.stacks.mini_stack import TRANSFORMER_SOURCE_TILES_PER_CLASS  # noqa: E402
from pixcell_ext.stacks.toy_histology import write_toy_dataset  # noqa: E402

# One factor at a time against the committed build's configuration ("control").
VARIANTS = {
    "control": {},
    "fixed_null": {"null_embedding": "fixed"},
    "dropout_0.2": {"cond_dropout": 0.2},
    "fixed_null_dropout_0.2": {"null_embedding": "fixed", "cond_dropout": 0.2},
    "wider": {"num_attention_heads": 6},
    "deeper": {"num_layers": 10},
    "no_ema": {"ema_decay": 0.0},
    "lr_1e-3": {"learning_rate": 1e-3},
    "caption_x4": {"caption_scale": 4.0},
    "caption_x16": {"caption_scale": 16.0},
}
FEWER_TILES = "fewer_tiles"  # a third of the SOURCE tiles: the variety of the pretraining set


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=[*VARIANTS, FEWER_TILES], default=["control"])
    parser.add_argument("--base", default="{}", help="JSON overrides applied to every variant (e.g. the new default).")
    parser.add_argument("--assets", default=str(mini.MINI_ASSETS), help="The stack whose VAE and encoder are used.")
    parser.add_argument("--mini_dir", default=mini.MINI_DIR, help="Where the toy tiles are written (once).")
    parser.add_argument("--output_dir", default="outputs/ablation")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--snapshot_every", type=int, default=1000)
    parser.add_argument("--guidance_scales", nargs="+", type=float, default=[1.0, 1.5, 2.0, 3.0])
    parser.add_argument("--evaluate_only", action="store_true", help="Score the snapshots already in --output_dir.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    return parser.parse_args()


def save_snapshot(folder: Path):
    def save(step: int, model) -> None:
        model.save_pretrained(folder / f"step-{step}" / "transformer")
        scheduler_for_sampling().save_pretrained(folder / f"step-{step}" / "scheduler")

    return save


def train_variant(args: argparse.Namespace, name: str, stack: mini.MiniStack) -> dict:
    overrides = {**json.loads(args.base), **VARIANTS.get(name, {})}
    config = replace(PretrainingConfig(seed=args.seed), num_steps=args.steps, **overrides)
    per_class = TRANSFORMER_SOURCE_TILES_PER_CLASS // (3 if name == FEWER_TILES else 1)
    source = write_toy_dataset(
        Path(args.output_dir) / f"source-train-{per_class}", "source", "train", per_class, seed=args.seed
    )
    folder = Path(args.output_dir) / name
    started = time.perf_counter()
    metrics = build_transformer(
        folder, stack.vae, stack.uni, source, args.seed, config, save_snapshot(folder), args.snapshot_every
    )
    return {**metrics, "wall_seconds": round(time.perf_counter() - started, 1), "config": asdict(config)}


def evaluate(args: argparse.Namespace, stack: mini.MiniStack) -> dict:
    vae = networks.load_vae(str(stack.vae))
    uni = networks.load_uni(str(stack.uni))
    source = me.encode_tiles(stack.source_heldout, vae, uni, mini.MINI_RESOLUTION)
    probe = md.fit_encoder_probe(source, references_per_class=10, seed=args.seed)
    scheduler_config = networks.load_scheduler_config(str(stack.pixcell))
    results = {"vae_ceiling": md.vae_ceiling(vae, uni, source, probe), "snapshots": {}}
    for snapshot in sorted(Path(args.output_dir).glob("*/step-*"), key=lambda p: (p.parent.name, int(p.name[5:]))):
        model = me.base_model(snapshot)
        runs = [("dpm", 20, g) for g in args.guidance_scales]
        scores = md.diagnose(model, scheduler_config, vae, uni, source, probe, runs, seed=args.seed)
        key = f"{snapshot.parent.name}/{snapshot.name}"
        results["snapshots"][key] = scores
        runs = " ".join(f"g{r['guidance']:g} {r['class_fidelity']:.2f}" for r in scores["runs"])
        print(f"{key:32s} fidelity {runs} | FD uncond {scores['fd_encoder_unconditional']:.1f}", flush=True)
    return results


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    stack = mini.write_mini_stack(args.mini_dir, Path(args.assets))
    report = {"command": " ".join(sys.argv), "threads": args.threads, "trained": {}}
    if not args.evaluate_only:
        for name in args.variants:
            report["trained"][name] = train_variant(args, name, stack)
    report.update(evaluate(args, stack))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(parse_args())
