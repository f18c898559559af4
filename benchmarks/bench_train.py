"""Images/s, FLOPs and peak memory of one adapter + LoRA training step, three ways, in the same run.

    python benchmarks/bench_train.py --preset small     # CPU, ~3 min; target: cached >= 3x the notebook's way
    python benchmarks/bench_train.py --preset tiny      # CPU, under a minute (the tiny test stack)
    python benchmarks/bench_train.py --preset full --find_max_batch   # GPU only: real shapes, bf16, MFU

Modes (same models, batch size, LoRA config and optimiser; random weights, random tiles):
  notebook    the original notebook's way: per image, tensor -> PIL -> torchvision Resize(224)/ToTensor/Normalize
              -> UNI2-h, and a VAE encode, every step; then `loop.train_step` on that image: micro-batch 1
              with gradient accumulation up to the batch.
  on_the_fly  train_adapter_lora.py without --feature_cache: its step, `loop.train_step`, on uint8 tensors
              (UNI2-h and VAE encode batched on the device), loss, backward, guarded optimiser and LR step.
  cached      train_adapter_lora.py with --feature_cache: the same `loop.train_step` on stored latent
              mean/std + UNI embedding, so only the adapter + LoRA transformer forward/backward and the update remain.
Tile decoding and the data loader's resize to 224 px (done in loader workers in training) are outside every step;
the notebook did its PIL round trip inside the step, so it is timed there.

Each round times one step of every mode in a rotating order, so load drift from other processes hits all modes
alike; times are medians over rounds, ratios medians of the per-round ratios with their interquartile range.
FLOPs are counted with torch's FlopCounterMode on one step (without checkpoint recomputation: model FLOPs).
Peak memory: on CUDA `max_memory_allocated`; on CPU the kernel's peak-RSS mark (VmHWM, reset through
/proc/self/clear_refs before the step), shown also as the rise above the RSS just before the step.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from torch.profiler import record_function
from torchvision import transforms
from torchvision.transforms.functional import to_pil_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pixcell_ext import benchmarking, data  # noqa: E402
from pixcell_ext.model import networks  # noqa: E402
from pixcell_ext.model.adapter import AdapterConfig  # noqa: E402
from pixcell_ext.model.lora import LoRAConfig  # noqa: E402
from pixcell_ext.runtime import weight_dtype  # noqa: E402
from pixcell_ext.stacks import full_random  # noqa: E402
from pixcell_ext.stacks.tiny import write_tiny_stack  # noqa: E402
from pixcell_ext.training import (
    feature_cache,  # noqa: E402
    loop,  # noqa: E402
)

MODES = ("notebook", "on_the_fly", "cached")
TARGET_SPEEDUP = 3.0  # cached / notebook images/s, set for --preset small on the CPU
TARGET_MFU = 0.35  # cached (LoRA) step, --preset full in bf16 on an H100

# The real shapes: PixCell-256's transformer, the SD3.5 VAE and the IDDPM training schedule, as the full-shape random
# stack writes them (the presets below change only widths and sizes).
PIXCELL_256 = full_random.PIXCELL_256_CONFIG
SD35_VAE = full_random.SD35_VAE_CONFIG
SCHEDULER_CONFIG = full_random.SCHEDULER_CONFIG


@dataclass(frozen=True)
class Preset:
    """Model shapes and run length. `transformer=None` means the tiny stack of `pixcell_ext.stacks.tiny`, via the
    loaders."""

    transformer: dict | None = None
    uni: dict = field(default_factory=dict)  # overrides of networks.uni2h_timm_kwargs()
    vae: dict = field(default_factory=dict)  # overrides of SD35_VAE
    batch_size: int = 8
    adapter_hidden_dim: int = 1024
    lora_rank: int = 16
    warmup: int = 2
    repeats: int = 9


PRESETS = {
    "tiny": Preset(batch_size=4, adapter_hidden_dim=64, lora_rank=4, warmup=1, repeats=9),
    # 128 px tiles (latent 16x16). Widths chosen so that UNI : VAE encode : PixCell forward FLOPs per image stay
    # close to the real 361 : 271 : 267, so the mode ratios mean what they would at full size.
    "small": Preset(
        transformer={
            **PIXCELL_256,
            "num_attention_heads": 8,
            "num_layers": 6,
            "cross_attention_dim": 576,
            "sample_size": 16,
            "caption_channels": 384,
            "interpolation_scale": 0.25,
        },
        uni={"depth": 4, "num_heads": 6, "embed_dim": 384},
        vae={"block_out_channels": (32, 64, 128, 128), "sample_size": 128},
        batch_size=8,
        warmup=1,
        repeats=11,
    ),
    "full": Preset(transformer=PIXCELL_256, batch_size=32, warmup=2, repeats=20),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--batch_size", type=int, default=None, help="images per optimiser step (default: the preset's)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default: the preset's)")
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed rounds after the FLOP and memory steps (default: preset's)"
    )
    p.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="as accelerate does it: frozen models in this dtype, autocast (default: bf16 for full, else no)",
    )
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument(
        "--find_max_batch",
        action="store_true",
        help="CUDA: double the cached step's micro-batch until OOM; report and time the largest that fits",
    )
    p.add_argument("--peak_tflops", type=float, default=989.0, help="device peak for MFU (H100 SXM bf16 dense)")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also time a 'cached_mb1' diagnostic mode, split the notebook step, and print the top N ops of each mode",
    )
    return p.parse_args()


# ---------------------------------------------------------------------------------------------------- models


@contextlib.contextmanager
def _diffusers_quiet():
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def build_stack(preset: Preset, device: torch.device, dtype: torch.dtype) -> networks.PixCellStack:
    """Frozen models with random weights, built directly on the device (fast even at full size)."""
    if preset.transformer is None:
        with tempfile.TemporaryDirectory() as tmp:
            tiny = write_tiny_stack(tmp)
            return networks.load_pixcell_stack(
                str(tiny.pixcell), str(tiny.vae), str(tiny.uni), dtype=dtype, device=device
            )
    import timm
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    with torch.device(device):
        transformer = networks.PixCellTransformer2DModel(**preset.transformer)
        uni_kwargs = {**networks.uni2h_timm_kwargs(), **preset.uni}
        vit = timm.create_model(networks.UNI2H_ARCHITECTURE, pretrained=False, **uni_kwargs)
        uni = networks.UNIEncoder(vit)
        vae = AutoencoderKL(**{**SD35_VAE, **preset.vae})
    if dtype != torch.float32:  # as load_pixcell_stack's torch_dtype; quiet diffusers' note about `.to(dtype)`
        with _diffusers_quiet():
            transformer, uni, vae = (m.to(dtype) for m in (transformer, uni, vae))
    transformer, uni, vae = (m.requires_grad_(False).eval() for m in (transformer, uni, vae))
    networks.check_stack_compatible(transformer, uni, vae)
    return networks.PixCellStack(transformer, SCHEDULER_CONFIG, vae, uni)


@dataclass
class Bench:
    """Everything one training step touches, set up as train_adapter_lora.py sets it up."""

    accelerator: Accelerator
    modules: loop.TrainingModules
    transformer: networks.PixCellTransformer2DModel  # with LoRA, unwrapped
    resolution: int

    @property
    def model(self) -> torch.nn.Module:  # AdaptedPixCell, prepared by accelerate
        return self.modules.model

    @property
    def vae(self) -> torch.nn.Module:
        return self.modules.vae

    @property
    def uni(self) -> networks.UNIEncoder:
        return self.modules.uni


# The script's defaults (train_adapter_lora.py --max_grad_norm 1, no SNR weighting, no class head, no augmentation).
STEP_CONFIG = loop.StepConfig(max_grad_norm=1.0)


def setup(args: argparse.Namespace, preset: Preset) -> Bench:
    from diffusers.optimization import get_scheduler

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    stack = build_stack(preset, accelerator.device, weight_dtype(accelerator))
    transformer = stack.transformer
    torch.manual_seed(0)
    model = loop.build_adapted_model(
        transformer,
        LoRAConfig(rank=preset.lora_rank, alpha=preset.lora_rank),
        AdapterConfig(transformer.config.caption_channels, 1, preset.adapter_hidden_dim),
        gradient_checkpointing=args.gradient_checkpointing,
    )
    trainable = loop.trainable_parameters(model)
    optimizer = loop.make_optimizer(trainable, use_8bit=False, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    model, optimizer = accelerator.prepare(model, optimizer)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=100)
    modules = loop.TrainingModules(
        model,
        trainable,
        optimizer,
        lr_scheduler,
        networks.training_scheduler(stack.scheduler_config),
        stack.vae,
        stack.uni,
    )
    return Bench(
        accelerator, modules, transformer, transformer.config.sample_size * networks.vae_scale_factor(stack.vae)
    )


# ---------------------------------------------------------------------------------------------------- steps


def package_step(bench: Bench, batch: dict) -> None:
    """train_adapter_lora.py's step itself; `batch` holds pixels (on the fly) or cached features (from the cache) and
    the per-sample draws the training data loader adds in its workers (outside the step, as in training).

    The losses are finite, so the optimiser always steps and every step does the same work.
    """
    loop.train_step(bench.accelerator, bench.modules, batch, STEP_CONFIG)


@contextlib.contextmanager
def accumulating(accelerator: Accelerator, micro_batches: int):
    """Gradient accumulation over the next `micro_batches` steps, one optimiser update at their end, as
    `--gradient_accumulation_steps` gives it in training (the bench's accelerator otherwise updates every step)."""
    accelerator.gradient_accumulation_steps, accelerator.step = micro_batches, 0
    try:
        yield
    finally:
        accelerator.gradient_accumulation_steps, accelerator.step = 1, 0


def rows(batch: dict) -> list[dict]:
    """The batch as micro-batches of one sample each."""
    return [{key: value[i : i + 1] for key, value in batch.items()} for i in range(len(batch["index"]))]


NOTEBOOK_UNI_TRANSFORM = transforms.Compose(
    [
        transforms.Resize(networks.UNI_IMAGE_SIZE),
        transforms.ToTensor(),
        transforms.Normalize(networks.IMAGENET_MEAN, networks.IMAGENET_STD),
    ]
)


def notebook_step(bench: Bench, batch: dict) -> None:
    """The original notebook: image by image, PIL round trip into UNI2-h and a VAE encode, then the training step on
    that one image, accumulated over the batch into one update."""
    device, uni_dtype = bench.accelerator.device, next(bench.uni.vit.parameters()).dtype
    with accumulating(bench.accelerator, len(batch["index"])):
        for row in rows(batch):
            tile = row.pop("tiles")
            with torch.no_grad():
                with record_function("pil+transforms"):
                    pixels = NOTEBOOK_UNI_TRANSFORM(to_pil_image(tile[0])).unsqueeze(0).to(device, uni_dtype)
                with record_function("uni"):
                    row["uni_embedding"] = bench.uni.vit(pixels).float()
                with record_function("vae"):
                    mean, std = networks.encode_latent_distribution(bench.vae, data.vae_input(tile.to(device)))
            package_step(bench, {**row, "latent_mean": mean, "latent_std": std})


def cached_microbatch_step(bench: Bench, batch: dict) -> None:
    """Diagnostic mode (with --profile): cached features, trained micro-batch 1 with accumulation as the notebook does.

    notebook - this = the notebook's per-image PIL/UNI2-h/VAE cost; this / cached = the price of micro-batch 1 alone.
    """
    with accumulating(bench.accelerator, len(batch["index"])):
        for row in rows(batch):
            package_step(bench, row)


def make_batches(bench: Bench, batch_size: int) -> dict[str, dict]:
    """Random tiles through training's own data path (the tile views TileDataset gives, the loader adding each
    sample's draws) and their cache entries from the encoding the feature cache stores."""
    rng = np.random.default_rng(0)
    shape = (bench.resolution, bench.resolution, 3)
    tiles = [
        {
            "index": i,
            "label": 0,
            **data.model_inputs(Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)), bench.resolution),
        }
        for i in range(batch_size)
    ]
    spec = loop.step_randomness_spec(
        bench.transformer, bench.vae, bench.modules.noise_scheduler, bench.resolution, seed=0, cond_dropout=0.1
    )
    loader = loop.training_dataloader(tiles, [0] * batch_size, spec, batch_size=batch_size)
    common = next(iter(loader))
    device = bench.accelerator.device
    pixels = {key: common.pop(key).to(device) for key in ("uni_pixels", "vae_pixels")}
    with torch.no_grad():
        cached = {
            **common,
            **feature_cache.cache_entries(bench.vae, bench.uni, pixels["uni_pixels"], pixels["vae_pixels"]),
        }
    return {
        "notebook": {**common, "tiles": pixels["vae_pixels"].cpu()},
        "on_the_fly": {**common, **pixels},
        "cached": cached,
    }


def repeat_cached(batch: dict, size: int) -> dict:
    """A cached batch of any size from a small one (only the shapes matter for speed and memory)."""
    reps = -(-size // len(batch["index"]))
    out = {k: v.repeat(reps, *[1] * (v.ndim - 1))[:size] for k, v in batch.items() if k != "index"}
    return {"index": torch.arange(size), **out}


# ---------------------------------------------------------------------------------------------------- measuring


def find_max_batch(bench: Bench, batch: dict, start: int) -> int:
    """Largest power-of-two multiple of `start` for which two cached steps run without CUDA OOM."""
    best, size = 0, start
    while size <= 8192:
        oom = False
        try:
            trial = repeat_cached(batch, size)
            package_step(bench, trial)
            package_step(bench, trial)
            benchmarking.sync(bench.accelerator.device)
        except torch.OutOfMemoryError:
            oom = True
        trial = None  # noqa: F841  (free before the next, larger try)
        bench.modules.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        if oom:
            break
        best, size = size, size * 2
    return best


PHASES = ("pil+transforms", "uni", "vae", "features", "loss+backward", "update")  # record_function ranges


# ---------------------------------------------------------------------------------------------------- report


def header(args: argparse.Namespace, bench: Bench, batch_size: int, repeats: int, warmup: int) -> str:
    def millions(params) -> float:
        return sum(p.numel() for p in params) / 1e6

    return (
        f"bench_train: preset={args.preset} batch={batch_size} resolution={bench.resolution}px "
        f"mixed_precision={args.mixed_precision} gradient_checkpointing={args.gradient_checkpointing} "
        f"repeats={repeats} warmup={warmup}\n"
        f"  machine: {benchmarking.machine()}; torch {torch.__version__}; {datetime.date.today().isoformat()}\n"
        f"  trainable {millions(bench.modules.trainable):.2f} M "
        f"(adapter + LoRA rank {PRESETS[args.preset].lora_rank}); "
        f"frozen: transformer {millions(p for p in bench.transformer.parameters() if not p.requires_grad):.1f} M, "
        f"UNI {millions(bench.uni.parameters()):.1f} M, VAE encoder {millions(bench.vae.encoder.parameters()):.1f} M"
    )


def print_table(times, flops, memory, batch_size: int, peak_flops: float | None) -> dict[str, float]:
    """One row per mode; returns the model FLOPs utilisation of each (on CUDA)."""
    mem_note = "max_memory_allocated" if peak_flops else "VmHWM of the process"
    mfu_title = f"{'MFU':>8}" if peak_flops else ""
    print(
        f"\n  {'mode':<11}{'ms/step':>10}{'images/s':>10}{'GFLOP/img':>11}{'GFLOP/s':>9}{mfu_title}"
        f"{'peak MiB':>10}{'step rise MiB':>15}   (peak: {mem_note})"
    )
    mfu = {}
    for mode in times:
        seconds = statistics.median(times[mode])
        achieved = flops[mode] * batch_size / seconds
        mfu[mode] = achieved / peak_flops if peak_flops else float("nan")
        mfu_cell = f"{100 * mfu[mode]:>7.1f}%" if peak_flops else ""
        print(
            f"  {mode:<11}{1e3 * seconds:>10.1f}{batch_size / seconds:>10.2f}{flops[mode] / 1e9:>11.3g}"
            f"{achieved / 1e9:>9.1f}{mfu_cell}{memory[mode][0]:>10.0f}{memory[mode][1]:>15.0f}"
        )
    return mfu


def print_ratios(times, flops) -> None:
    for fast in ("on_the_fly", "cached"):
        med, q1, q3 = benchmarking.paired_ratio(times["notebook"], times[fast])
        target = ""
        if fast == "cached":
            verdict = "PASS" if med >= TARGET_SPEEDUP else "MISS"
            target = f"  target >= {TARGET_SPEEDUP:.1f} (set for --preset small): {verdict}"
        flop_ratio = flops["notebook"] / flops[fast]
        print(f"  {fast}/notebook = {med:.2f}x images/s (IQR {q1:.2f}-{q3:.2f}; FLOP ratio {flop_ratio:.2f}){target}")


def report_max_batch(bench: Bench, batches: dict, args, flops_per_image: float, start: int, repeats: int) -> None:
    """The MFU target is for the largest micro-batch that fits: find it, then time the cached step there."""
    largest = find_max_batch(bench, batches["cached"], start)
    print(f"\n  largest cached micro-batch that fits (doubling from {start}): {largest or 'none'}")
    if not largest:
        return
    big = repeat_cached(batches["cached"], largest)

    def step() -> None:
        package_step(bench, big)

    device = bench.accelerator.device
    seconds = statistics.median(benchmarking.time_rounds({"cached": step}, repeats, 2, device)["cached"])
    peak, _ = benchmarking.peak_memory_mb(step, device)
    mfu = flops_per_image * largest / seconds / (args.peak_tflops * 1e12)
    verdict = "PASS" if mfu >= TARGET_MFU else "MISS"
    print(
        f"  cached at micro-batch {largest}: {1e3 * seconds:.1f} ms/step, {largest / seconds:.1f} images/s, "
        f"MFU {100 * mfu:.1f}%  target >= {100 * TARGET_MFU:.0f}%: {verdict}; peak {peak:.0f} MiB"
    )


def main(args: argparse.Namespace) -> None:
    preset = PRESETS[args.preset]
    cuda = torch.cuda.is_available()
    if args.preset == "full" and not cuda:
        sys.exit(
            "--preset full builds the real PixCell-256 (608 M), UNI2-h (681 M) and SD3.5 VAE shapes and needs a CUDA "
            "GPU; none is visible. On a CPU use --preset small (or tiny)."
        )
    if args.find_max_batch and not cuda:
        sys.exit("--find_max_batch searches for the largest micro-batch before CUDA OOM; it needs a CUDA GPU.")
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if args.preset == "full" else "no"
    batch_size = args.batch_size or preset.batch_size
    repeats = args.repeats or preset.repeats
    warmup = preset.warmup if args.warmup is None else args.warmup

    t_start = time.perf_counter()
    bench = setup(args, preset)
    device = bench.accelerator.device
    batches = make_batches(bench, batch_size)
    step_fns = {"notebook": notebook_step, "on_the_fly": package_step, "cached": package_step}
    if args.profile:
        step_fns["cached_mb1"] = cached_microbatch_step
        batches["cached_mb1"] = batches["cached"]
    steps = {mode: (lambda m=mode: step_fns[m](bench, batches[m])) for mode in step_fns}
    print(header(args, bench, batch_size, repeats, warmup))

    # The FLOP-counting step comes first and doubles as the first touch (allocator, optimiser state), so the memory
    # step sees a steady state; `warmup` more untimed rounds precede the timed ones.
    flops = {mode: benchmarking.count_flops(step, bench.transformer) / batch_size for mode, step in steps.items()}
    memory = {mode: benchmarking.peak_memory_mb(step, device) for mode, step in steps.items()}
    load_before = os.getloadavg()[0]
    times = benchmarking.time_rounds(steps, repeats, warmup, device)
    load_after = os.getloadavg()[0]

    mfu = print_table(times, flops, memory, batch_size, args.peak_tflops * 1e12 if cuda else None)
    print(
        f"\n  1-min load average {load_before:.1f} before / {load_after:.1f} after the timed rounds on "
        f"{os.cpu_count()} CPUs (above ~1, other processes shared the machine)"
    )
    print_ratios(times, flops)
    if cuda:
        verdict = "PASS" if mfu["cached"] >= TARGET_MFU else "MISS"
        print(
            f"  cached MFU = {100 * mfu['cached']:.1f}% of {args.peak_tflops:g} TFLOP/s  "
            f"target >= {100 * TARGET_MFU:.0f}% (set for --preset full in bf16): {verdict}"
        )
    if args.find_max_batch:
        report_max_batch(bench, batches, args, flops["cached"], batch_size, repeats)
    if args.profile:
        notebook, mb1, cached = (statistics.median(times[m]) for m in ("notebook", "cached_mb1", "cached"))
        print(
            f"\n  notebook step (medians) = cached features at micro-batch 1, {1e3 * mb1:.0f} ms "
            f"({mb1 / cached:.2f}x the batched cached step) + per-image PIL/UNI2-h/VAE, {1e3 * (notebook - mb1):.0f} ms"
        )
        benchmarking.print_profile(steps, device, args.profile, PHASES)
    print(f"\n  total wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main(parse_args())
