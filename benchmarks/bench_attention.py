"""Single-token cross-attention against diffusers' standard processor, side by side in one run.

    python benchmarks/bench_attention.py          # CPU, ~5 min on 2 threads; targets: both paths >= 1.12x

Two measurements, each timing the standard path (`attention.install_standard_attention`, diffusers'
`AttnProcessor2_0` on every cross-attention) and the single-token path (`SingleTokenCrossAttnProcessor`, what
`AdaptedPixCell` installs) on the same model, switching the processors between the timed calls:

  train      the cached training step of `bench_train.py --preset small` (same models, batch 8, adapter + LoRA
             rank 16 on the default targets, AdamW): adapter + LoRA transformer forward/backward and the update.
  generate   `pipeline.generate_batch` at `bench_generate.py`'s `small` preset (PixCell 4 blocks of width 256 at
             256 px, LoRA merged, batch 8, both guidance branches in one forward, tiny UNI2-h and VAE decode).
             The images of both paths are compared and must agree to one grey level.

Each round runs both paths in an order that alternates from round to round, so load from other processes hits both
alike. Times are medians over the rounds with their interquartile range; the speed-up is the median of the per-round
ratios, with its IQR.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_generate  # noqa: E402
import bench_train  # noqa: E402

from pixcell_ext import benchmarking  # noqa: E402
from pixcell_ext.generation import (
    pipeline,  # noqa: E402
    work_list,  # noqa: E402
)
from pixcell_ext.model import networks  # noqa: E402
from pixcell_ext.model.attention import install_single_token_attention, install_standard_attention  # noqa: E402
from pixcell_ext.model.lora import merge_lora  # noqa: E402
from pixcell_ext.stacks.tiny import write_tiny_stack  # noqa: E402

TARGET = 1.12
PATHS = ("standard", "single_token")


def installers(transformer) -> dict:
    return {
        "standard": lambda: install_standard_attention(transformer),
        "single_token": lambda: install_single_token_attention(transformer, 1),
    }


def count_flops(run, transformer) -> dict[str, int]:
    """FLOPs of one `run()` under each processor (attention included: the CPU kernel is counted as on CUDA)."""
    counts = {}
    for path, install in installers(transformer).items():
        install()
        with FlopCounterMode(display=False, custom_mapping=benchmarking.CPU_SDPA_FLOPS) as counter:
            run()
        counts[path] = counter.get_total_flops()
    return counts


def time_paths(run, transformer, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds of `run()` under each processor, one call per path per round, alternating which goes first."""
    install = installers(transformer)
    times = {path: [] for path in PATHS}
    for i in range(warmup + repeats):
        for path in PATHS if i % 2 == 0 else PATHS[::-1]:
            install[path]()
            start = time.perf_counter()
            run()
            if i >= warmup:
                times[path].append(time.perf_counter() - start)
    install["single_token"]()
    return times


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(values, n=4)
    return q1, median, q3


def report(name: str, times: dict[str, list[float]], flops: dict[str, int], unit: str, per_call: int) -> bool:
    standard, single = flops["standard"] / 1e9, flops["single_token"] / 1e9
    print(
        f"  {name}: {unit} per call, median (IQR) over {len(times['standard'])} rounds; GFLOP per call "
        f"standard {standard:.2f}, single_token {single:.2f} (FLOP ratio {standard / single:.3f})"
    )
    for path in PATHS:
        q1, median, q3 = quartiles(times[path])
        print(f"    {path:<13}{1e3 * median:9.1f} ms ({1e3 * q1:.1f}-{1e3 * q3:.1f})   {per_call / median:7.2f} /s")
    q1, median, q3 = quartiles([a / b for a, b in zip(times["standard"], times["single_token"], strict=True)])
    verdict = "PASS" if median >= TARGET else "MISS"
    print(f"    single_token/standard = {median:.3f}x (IQR {q1:.3f}-{q3:.3f})  target >= {TARGET}: {verdict}")
    return median >= TARGET


def bench_training(repeats: int) -> bool:
    preset = bench_train.PRESETS["small"]
    args = argparse.Namespace(mixed_precision="no", gradient_checkpointing=False)
    bench = bench_train.setup(args, preset)
    transformer = bench.accelerator.unwrap_model(bench.model).transformer
    batch = bench_train.make_batches(bench, preset.batch_size)["cached"]

    timesteps = torch.linspace(0, 999, len(batch["index"])).long()

    @torch.no_grad()
    def prediction() -> torch.Tensor:
        return bench.model(batch["latent_mean"], timesteps, batch["uni_embedding"])[0]

    install_standard_attention(transformer)
    standard = prediction()
    install_single_token_attention(transformer, 1)
    difference = (prediction() - standard).abs().max().item()
    print(
        f"\ntrain: bench_train.py --preset small cached step, batch {preset.batch_size}, 128 px (64 tokens), "
        f"PixCell 6 blocks width 576, LoRA rank {preset.lora_rank}; max |prediction difference| {difference:.1e}"
    )
    assert difference <= 1e-5 * max(1.0, standard.abs().max().item()), difference
    step = lambda: bench_train.package_step(bench, batch)  # noqa: E731
    flops = count_flops(step, transformer)
    times = time_paths(step, transformer, repeats, preset.warmup)
    return report("train", times, flops, "step", preset.batch_size)


def bench_generation(repeats: int, tiny_dir: str, num_images: int, steps: int) -> bool:
    paths = write_tiny_stack(tiny_dir)
    files = work_list.class_files(paths.data, ["ADI", "TUM"])
    references = {
        n: work_list.choose_references(f, 4, seed=0, class_name=n, skip_bad_images=False) for n, f in files.items()
    }
    items = work_list.work_items(references, {"ADI": num_images // 2, "TUM": num_images - num_images // 2}, seed=0)
    stack = networks.load_pixcell_stack(str(paths.pixcell), str(paths.vae), str(paths.uni))
    transformer = bench_generate.small_transformer()
    model = bench_generate.adapted_with_lora(transformer)
    merge_lora(transformer)
    settings = pipeline.SamplingSettings(2.0, steps, "dpm", num_images)
    images = {}

    def run() -> None:
        kind = type(next(p for n, p in transformer.attn_processors.items() if ".attn2." in n)).__name__
        images[kind] = pipeline.generate_batch(model, stack.uni, stack.vae, stack.scheduler_config, items, settings)

    flops = count_flops(run, transformer)
    times = time_paths(run, transformer, repeats, warmup=1)
    standard, single = images["AttnProcessor2_0"], images["SingleTokenCrossAttnProcessor"]
    difference = np.abs(standard.astype(int) - single.astype(int))
    print(
        f"\ngenerate: bench_generate.py small, {num_images} images in one batch, {steps} DPM steps, guidance 2, "
        f"256 px (256 tokens), PixCell 4 blocks width 256, LoRA merged; images differ by at most "
        f"{difference.max()} grey level(s) ({(difference > 0).mean():.1e} of values)"
    )
    assert difference.max() <= 1, difference.max()
    return report("generate", times, flops, "batch", num_images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["train", "generate"], default=None)
    parser.add_argument("--train_repeats", type=int, default=15)
    parser.add_argument("--generate_repeats", type=int, default=9)
    parser.add_argument("--num_images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tiny_dir", default="tiny_assets")
    args = parser.parse_args()
    cpu = benchmarking.machine()
    print(f"bench_attention: {cpu}; torch {torch.__version__}; {datetime.date.today().isoformat()}")
    load_before = os.getloadavg()[0]
    results = []
    if args.only in (None, "train"):
        results.append(bench_training(args.train_repeats))
    if args.only in (None, "generate"):
        results.append(bench_generation(args.generate_repeats, args.tiny_dir, args.num_images, args.steps))
    print(
        f"\n1-min load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after on {os.cpu_count()} CPUs "
        "(above ~1, other processes shared the machine)"
    )
    print("overall:", "PASS" if all(results) else "MISS")


if __name__ == "__main__":
    main()
