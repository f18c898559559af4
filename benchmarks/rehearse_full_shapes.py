"""Dress rehearsal at PixCell-256's real shapes on a CPU: every script once, then the memory model a GPU user needs.

    python benchmarks/rehearse_full_shapes.py              # real shapes (608 M + 681 M + 84 M parameters)
    python benchmarks/rehearse_full_shapes.py --reduced    # real widths, 2 blocks per model: a quick self-test

The random-weight stack is written once (bf16, hub layouts) by `pixcell_ext.stacks.full_random` to --assets_dir. Then
each phase is a real `accelerate launch` of the real script (one CPU process, explicit launcher flags, so no
accelerate config file of the machine can change it):

  train_otf_fp32 / train_otf_bf16      on-the-fly features, --gradient_checkpointing, 1 update (batch 1 in fp32,
                                       2 in bf16)
  train_cache_fp32 / train_cache_bf16  --feature_cache (built by the first), same
  train_kill / train_resume            cached bf16, 2 updates, SIGKILL once checkpoint-1 exists, then
                                       --resume_from_checkpoint latest finishes the run
  generate                             2 tiles (2 classes x 1), 2 DPM-Solver steps, bf16, from train_cache_bf16
  evaluate                             those 2 tiles against the real tiles (UNI2-h metrics)

Every phase prints its wall time, its CPU time and the peak RSS of its process tree (wait4's rusage of the
launcher, which includes the script it waited for). On a shared machine the CPU time says what the wall time would
be on an idle one (about CPU time / cores for the compute-bound phases). Each training phase checks that its update
happened: all trained weights finite and LoRA B non-zero (a skipped non-finite step leaves it at zero).

The memory model is measured in this process on the same models: bytes per cached tile (the cache on disk), frozen
weights, trainable + AdamW state, and the tensor memory of one training forward + backward at micro-batch 1 and 2,
with and without gradient checkpointing, with bf16 frozen weights and bf16 autocast as `--mixed_precision bf16`
gives them. It counts the bytes of every tensor storage created during the step and still alive (a
TorchDispatchMode with weak references), so it is what a GPU allocator would have to hold, not the CPU's RSS. The
difference between batch 2 and 1 is the memory per tile; from it, the largest bf16 micro-batch that fits in 24, 40,
80 and 141 GiB, keeping RESERVE_GIB for the CUDA context and workspaces. Allocator fragmentation is not modelled:
`bench_train.py --preset full --find_max_batch` measures the real limit on a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pixcell_ext.benchmarking import cpu_name  # noqa: E402
from pixcell_ext.model import networks  # noqa: E402
from pixcell_ext.model.adapter import AdapterConfig  # noqa: E402
from pixcell_ext.model.conditioning import AdaptedPixCell  # noqa: E402
from pixcell_ext.model.lora import LoRAConfig  # noqa: E402
from pixcell_ext.stacks.full_random import DEFAULT_DIR, write_full_random_stack  # noqa: E402
from pixcell_ext.training import loop  # noqa: E402

GIB = 2**30
MIB = 2**20
BUDGETS_GIB = (24, 40, 80, 141)
RESERVE_GIB = 1.0  # CUDA context, cuBLAS/cuDNN workspaces: not tensors, so not in the measured bytes
CLASSES = ("ADI", "BACK")  # two classes of the tile folder: 2 validation tiles per run, 2 generated tiles
BATCH = {"fp32": 1, "bf16": 2}  # per training phase: fp32 at batch 1 keeps the rehearsal inside 20 minutes
ADAM_BYTES_PER_PARAM = 12  # fp32 weight + two fp32 AdamW moments; the gradient is in the measured step bytes
PHASE_TIMEOUT_S = 900
# Batch sizes of the in-process measurements, bf16 only (the precision of GPU runs): 1 and 2 give the per-tile slope.
MEMORY_BATCHES = {"bf16": (1, 2)}
# The folders each phase writes, emptied before it runs (the scripts refuse to write over an earlier run); a phase
# run alone (--phases) reuses the others' outputs, e.g. the feature cache or the run it generates from.
PHASE_FOLDERS = {
    "train_otf_fp32": ("train-otf-fp32",),
    "train_otf_bf16": ("train-otf-bf16",),
    "train_cache_fp32": ("train-cache-fp32", "feature_cache"),
    "train_cache_bf16": ("train-cache-bf16",),
    "train_kill": ("train-kill",),
    "train_resume": (),
    "generate": ("synthetic",),
    "evaluate": ("evaluation",),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reduced", action="store_true", help="Real widths, 2 blocks per model: a quick self-test.")
    p.add_argument("--assets_dir", default=None, help=f"Default: {DEFAULT_DIR}/full (or /reduced with --reduced).")
    p.add_argument(
        "--output_dir", default=None, help="Default: outputs/rehearsal-full (or -reduced); run folders replaced."
    )
    p.add_argument("--phases", nargs="+", choices=sorted(PHASE_FOLDERS), default=None, help="Default: all, in order.")
    p.add_argument("--skip_memory_model", action="store_true")
    return p.parse_args()


# ---------------------------------------------------------------------------------------------------- phases


@dataclass
class PhaseResult:
    name: str
    seconds: float
    cpu_seconds: float  # user + system of the process tree: what the phase costs on an otherwise idle machine
    peak_rss_mib: float
    returncode: int
    note: str = ""


def launch(script: str, mixed_precision: str, *args: str) -> list[str]:
    """One CPU process, every launcher setting explicit (as tests/conftest.launch_command)."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", mixed_precision, "--dynamo_backend", "no", str(REPO / script), *args,
    ]  # fmt: skip


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def run_phase(name: str, command: list[str], log_dir: Path, kill_when: Callable[[], bool] | None = None) -> PhaseResult:
    """Run `command` in its own process group; `kill_when` is polled and SIGKILLs the whole group when true.

    The child is reaped with wait4, whose rusage covers the child and every descendant it waited for, so the peak
    RSS is the launcher's or the training process's, whichever was larger, and nothing from other phases.
    """
    log = log_dir / f"{name}.log"
    start = time.perf_counter()
    with open(log, "w") as handle:
        handle.write(" ".join(command) + "\n\n")
        handle.flush()
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO,
                                start_new_session=True)  # fmt: skip
        note = ""
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            elapsed = time.perf_counter() - start
            if (kill_when is not None and not note and kill_when()) or elapsed > PHASE_TIMEOUT_S:
                note = "killed (SIGKILL to the process group)" if elapsed <= PHASE_TIMEOUT_S else "TIMEOUT"
                os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    result = PhaseResult(name, time.perf_counter() - start, cpu, usage.ru_maxrss / 1024, proc.returncode, note)
    return result


def print_phase(result: PhaseResult) -> None:
    print(
        f"  {result.name:<17}{result.seconds:>8.1f} s{result.cpu_seconds:>9.1f} s{result.peak_rss_mib:>9.0f} MiB  "
        f"{result.note}",
        flush=True,
    )


def phase_failed(result: PhaseResult, log_dir: Path) -> str:
    tail = (log_dir / f"{result.name}.log").read_text().splitlines()[-25:]
    return f"phase {result.name} failed (rc={result.returncode}); end of {log_dir / result.name}.log:\n" + "\n".join(
        tail
    )


def check_trained(run_dir: Path) -> str:
    """The update happened: every trained weight finite and LoRA B non-zero (it starts at zero)."""
    lora = load_file(run_dir / "pytorch_lora_weights.safetensors")
    adapter = load_file(run_dir / "adapter.safetensors")
    tensors = {**lora, **adapter}
    bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
    if bad:
        raise AssertionError(f"{run_dir}: non-finite trained weights {bad[:5]}")
    b_norm = sum(float(v.float().norm()) for k, v in lora.items() if "lora_B" in k)
    if b_norm == 0.0:
        raise AssertionError(f"{run_dir}: LoRA B is still zero, so no update was applied (non-finite loss?)")
    return f"|LoRA B| {b_norm:.3g}"


def run_phases(stack, out: Path, log_dir: Path, wanted: set[str]) -> list[PhaseResult]:
    model_flags = [
        "--pretrained_model_name_or_path", str(stack.pixcell), "--vae_name_or_path", str(stack.vae),
        "--uni_model_name_or_path", str(stack.uni),
    ]  # fmt: skip
    train_flags = [
        *model_flags, "--train_data_dir", str(stack.data), "--classes", *CLASSES,
        "--max_train_steps", "1", "--gradient_checkpointing",
        "--lr_warmup_steps", "0", "--checkpointing_steps", "1", "--validation_steps", "1000",
        "--num_validation_inference_steps", "1", "--dataloader_num_workers", "1", "--report_to", "none",
    ]  # fmt: skip
    cache = out / "feature_cache"
    kill_dir = out / "train-kill"
    phases: list[tuple[str, list[str], Callable[[], bool] | None, Path | None]] = []
    for mode in ("otf", "cache"):
        for precision, mp in (("fp32", "no"), ("bf16", "bf16")):
            run = out / f"train-{mode}-{precision}"
            extra = ["--train_batch_size", str(BATCH[precision])]
            extra += ["--feature_cache", str(cache)] if mode == "cache" else []
            cmd = launch("train_adapter_lora.py", mp, *train_flags, *extra, "--output_dir", str(run))
            phases.append((f"train_{mode}_{precision}", cmd, None, run))
    resume = [*train_flags, "--train_batch_size", str(BATCH["bf16"]), "--feature_cache", str(cache)]
    resume += ["--output_dir", str(kill_dir)]
    resume += ["--max_train_steps", "2", "--resume_from_checkpoint", "latest"]
    phases.append(
        ("train_kill", launch("train_adapter_lora.py", "bf16", *resume), (kill_dir / "checkpoint-1").is_dir, None)
    )
    phases.append(("train_resume", launch("train_adapter_lora.py", "bf16", *resume), None, kill_dir))
    synthetic = out / "synthetic"
    generate = [
        *model_flags, "--lora_dir", str(out / "train-cache-bf16"), "--reference_data_dir", str(stack.data),
        "--classes", *CLASSES, "--num_images_per_class", "1", "--num_inference_steps", "2", "--batch_size", "2",
        "--output_dir", str(synthetic), "--overwrite",
    ]  # fmt: skip
    phases.append(("generate", launch("generate_synthetic.py", "bf16", *generate), None, None))
    evaluate = [
        "--uni_model_name_or_path", str(stack.uni), "--real_dir", str(stack.data), "--synthetic_dir", str(synthetic),
        "--classes", *CLASSES, "--output_dir", str(out / "evaluation"), "--batch_size", "2",
        "--dataloader_num_workers", "0", "--kid_subsets", "10",
    ]  # fmt: skip
    phases.append(("evaluate", launch("evaluate_synthetic.py", "bf16", *evaluate), None, None))

    results = []
    for name, cmd, kill_when, run_dir in phases:
        if name not in wanted:
            continue
        result = run_phase(name, cmd, log_dir, kill_when)
        results.append(result)
        if name == "train_kill":
            print_phase(result)
            if not result.note.startswith("killed"):
                raise AssertionError(f"train_kill was not killed after checkpoint-1 (rc={result.returncode})")
            continue
        if result.returncode != 0:
            print_phase(result)
            raise AssertionError(phase_failed(result, log_dir))
        if run_dir is not None:
            result.note = check_trained(run_dir)
        if name == "train_resume":
            text = (log_dir / "train_resume.log").read_text()
            if "Resumed from" not in text or not (kill_dir / "checkpoint-2").is_dir():
                raise AssertionError("train_resume did not resume from checkpoint-1 and finish at step 2")
            result.note += "; resumed from checkpoint-1, finished step 2"
        if name == "generate":
            pngs = sorted(synthetic.glob("*/*.png"))
            if len(pngs) != len(CLASSES):
                raise AssertionError(f"generate wrote {len(pngs)} PNGs, expected {len(CLASSES)}")
            result.note = f"{len(pngs)} PNGs"
        if name == "evaluate":
            result.note = "metrics.json" if (out / "evaluation" / "metrics.json").exists() else "NO metrics.json"
        print_phase(result)
    return results


# ---------------------------------------------------------------------------------------------------- memory


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside the mode and still alive, and their peak.

    An op's output that shares storage with one of its inputs (views, in-place ops) is not new memory. A storage
    is forgotten when its Python object dies, which torch ties to the storage itself (storages keep their Python
    object alive while referenced).
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._alive: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._add(tensor, inputs)
        return out

    def _add(self, tensor: torch.Tensor, inputs: set[int]) -> None:
        storage = tensor.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in inputs or key in self._alive:
            return
        self._alive[key] = weakref.ref(storage, lambda _, k=key, n=nbytes: self._free(k, n))
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def _free(self, key: int, nbytes: int) -> None:
        if self._alive.pop(key, None) is not None:
            self.current -= nbytes


def count_params(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def training_step_bytes(model: AdaptedPixCell, batch: int, bf16: bool) -> int:
    """Peak bytes of new tensors in one training forward + backward (the script's loss), trainable gradients
    included (they are created in the backward)."""
    transformer = model.transformer
    channels, size = transformer.config.in_channels, transformer.config.sample_size
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(batch, channels, size, size, generator=generator)
    noise = torch.randn(batch, channels, size, size, generator=generator)
    embedding = torch.randn(batch, 1, transformer.config.caption_channels, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    drop = torch.zeros(batch, dtype=torch.bool)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = None
    gc.collect()
    tracker = LiveTensorBytes()
    with tracker, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        prediction, _ = model(noisy, timesteps, embedding, drop)
        loss = torch.nn.functional.mse_loss(prediction[:, :channels].float(), noise)
        loss.backward()
    for p in trainable:
        p.grad = None
    return tracker.peak


@torch.no_grad()
def encoder_step_bytes(uni: networks.UNIEncoder, vae, batch: int, resolution: int) -> int:
    """Peak bytes of new tensors while computing one batch's features on the fly (UNI2-h, then VAE encode)."""
    tiles = torch.randint(0, 256, (batch, 3, resolution, resolution), dtype=torch.uint8)
    tracker = LiveTensorBytes()
    with tracker:
        embedding = uni(tiles)
        mean, std = networks.encode_latent_distribution(vae, tiles.float() / 127.5 - 1)
        del embedding, mean, std
    return tracker.peak


@dataclass
class MemoryModel:
    cached_tile_bytes: float
    frozen: dict[str, int]  # parameter counts
    trainable_params: int
    step: dict[tuple[str, bool], tuple[int, int]]  # (precision, checkpointing) -> bytes at batch 1, 2
    encoder: dict[str, tuple[int, int]]  # precision -> bytes at batch 1, 2
    seconds: float


def measure_memory(stack, cache_dir: Path) -> MemoryModel:
    start = time.perf_counter()
    shards = list(cache_dir.glob("shard-*.safetensors"))
    rows = 0
    for shard in shards:
        with safe_open(str(shard), framework="pt") as handle:
            rows += len(json.loads(handle.metadata()["keys"]))
    cached_tile_bytes = sum(s.stat().st_size for s in shards) / max(rows, 1)

    step, encoder, frozen, trainable_params = {}, {}, {}, 0
    for precision, dtype in (("bf16", torch.bfloat16),):
        uni = networks.load_uni(str(stack.uni), dtype=dtype)
        vae = networks.load_vae(str(stack.vae), dtype=dtype)
        resolution = networks.vae_scale_factor(vae) * 32  # PixCell-256's 32x32 latent: 256 px tiles
        frozen.update(
            uni=count_params(uni), vae_encoder=count_params(vae.encoder), vae_decoder=count_params(vae.decoder)
        )
        batches = MEMORY_BATCHES[precision]
        encoder[precision] = tuple(encoder_step_bytes(uni, vae, b, resolution) for b in batches)
        del uni, vae
        gc.collect()
        transformer = networks.load_transformer(str(stack.pixcell), dtype=dtype)
        frozen["transformer"] = count_params(transformer)
        torch.manual_seed(0)
        model = loop.build_adapted_model(  # the training script's defaults: rank 16, one token, width 1024
            transformer, LoRAConfig(rank=16, alpha=16), AdapterConfig(transformer.config.caption_channels, 1, 1024)
        ).train()
        trainable_params = sum(p.numel() for p in loop.trainable_parameters(model))
        for checkpointing in (False, True):
            if checkpointing:
                transformer.enable_gradient_checkpointing()
            else:
                transformer.disable_gradient_checkpointing()
            bf16 = precision == "bf16"
            measured = tuple(training_step_bytes(model, b, bf16) for b in batches)
            step[(precision, checkpointing)] = measured
            print(
                f"  measured {precision} checkpointing={checkpointing}: "
                + ", ".join(f"batch {b}: {m / MIB:.0f} MiB" for b, m in zip(batches, measured, strict=True))
                + f" ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
        del model, transformer
        gc.collect()
    return MemoryModel(cached_tile_bytes, frozen, trainable_params, step, encoder, time.perf_counter() - start)


def largest_batch(budget_bytes: float, fixed_bytes: float, per_tile: float, first_tile: float) -> int:
    """Largest B with fixed + first_tile + (B - 1) * per_tile <= budget (0 if not even one tile fits)."""
    room = budget_bytes - fixed_bytes - first_tile
    return 0 if room < 0 else 1 + int(room // per_tile)


def print_memory_model(mm: MemoryModel, bytes_per_weight: int = 2) -> dict:
    """The table a GPU user sizes a run with; returns the numbers for RESULTS.md / JSON."""
    f = mm.frozen
    frozen_cached = (f["transformer"] + f["vae_decoder"]) * bytes_per_weight  # cache: no UNI2-h, no encoder
    frozen_otf = frozen_cached + (f["uni"] + f["vae_encoder"]) * bytes_per_weight
    trainable = mm.trainable_params * ADAM_BYTES_PER_PARAM
    print("\n  memory model (tensor bytes; bf16 frozen weights as in --mixed_precision bf16)")
    print(f"    cached features per tile on disk:  {mm.cached_tile_bytes / 1024:.1f} KiB")
    print(
        f"    frozen weights, bf16: transformer {f['transformer'] / 1e6:.1f} M = {f['transformer'] * 2 / GIB:.2f} GiB, "
        f"UNI2-h {f['uni'] / 1e6:.1f} M = {f['uni'] * 2 / GIB:.2f} GiB, VAE encoder {f['vae_encoder'] / 1e6:.1f} M + "
        f"decoder {f['vae_decoder'] / 1e6:.1f} M = {(f['vae_encoder'] + f['vae_decoder']) * 2 / GIB:.2f} GiB"
    )
    print(
        f"      in memory while training: cached {frozen_cached / GIB:.2f} GiB, on the fly {frozen_otf / GIB:.2f} GiB"
    )
    print(
        f"    trainable (adapter + LoRA rank 16): {mm.trainable_params / 1e6:.2f} M x {ADAM_BYTES_PER_PARAM} B "
        f"(fp32 weight, 2 AdamW moments) = {trainable / MIB:.0f} MiB, + 4 B/param gradients in the step bytes"
    )
    print("    one training step (forward + backward), peak of new tensor bytes (gradients included):")
    print(f"      {'precision':<10}{'checkpointing':<15}{'batch 1 MiB':>12}{'batch 2 MiB':>12}{'per tile MiB':>14}")
    for (precision, ckpt), measured in mm.step.items():
        cells = [f"{m / MIB:>12.0f}" for m in measured] + [f"{'-':>12}"] * (2 - len(measured))
        slope = f"{(measured[1] - measured[0]) / MIB:>14.0f}" if len(measured) == 2 else f"{'-':>14}"
        print(f"      {precision:<10}{str(ckpt):<15}{''.join(cells)}{slope}")
    print("    on-the-fly features (UNI2-h + VAE encode, no grad), new tensor bytes:")
    for precision, measured in mm.encoder.items():
        print(f"      {precision:<10}" + ", ".join(f"batch {i + 1}: {m / MIB:.0f} MiB" for i, m in enumerate(measured)))
    print(
        f"\n    largest bf16 micro-batch (reserve {RESERVE_GIB:g} GiB for CUDA context/workspaces, no fragmentation):"
    )
    print(f"      {'set-up':<36}" + "".join(f"{g:>8} GiB" for g in BUDGETS_GIB))
    table = {}
    for source, frozen in (("cached", frozen_cached), ("on the fly", frozen_otf)):
        for ckpt in (False, True):
            b1, b2 = mm.step[("bf16", ckpt)]
            per_tile, first = b2 - b1, b1
            if source == "on the fly":  # features are computed before the forward and freed: the larger peak counts
                e1, e2 = mm.encoder["bf16"]
                per_tile, first = max(per_tile, e2 - e1), max(first, e1)
            fixed = frozen + trainable + RESERVE_GIB * GIB
            row = [largest_batch(g * GIB, fixed, per_tile, first) for g in BUDGETS_GIB]
            name = f"{source}, checkpointing {'on' if ckpt else 'off'}"
            table[name] = row
            print(f"      {name:<36}" + "".join(f"{b:>12}" for b in row))
    return {
        "cached_tile_bytes": mm.cached_tile_bytes,
        "frozen_params": f,
        "trainable_params": mm.trainable_params,
        "step_bytes": {f"{p}/checkpointing={c}": v for (p, c), v in mm.step.items()},
        "encoder_bytes": mm.encoder,
        "largest_bf16_micro_batch": {"budgets_gib": BUDGETS_GIB, **table},
    }


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return f"{cpu_name()}, {os.cpu_count()} CPUs, {mem:.0f} GiB RAM; torch {torch.__version__}"


def main(args: argparse.Namespace) -> None:
    shapes = "reduced" if args.reduced else "full"
    assets = Path(args.assets_dir or f"{DEFAULT_DIR}/{shapes}")
    assets, out = assets.resolve(), Path(args.output_dir or f"outputs/rehearsal-{shapes}").resolve()
    wanted = args.phases or list(PHASE_FOLDERS)
    for phase in wanted:
        for folder in PHASE_FOLDERS[phase]:
            shutil.rmtree(out / folder, ignore_errors=True)
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"rehearse_full_shapes: {shapes} shapes; {datetime.date.today().isoformat()}; {machine()}")
    print(f"  assets {assets}, outputs {out}")
    start = time.perf_counter()

    writer = [sys.executable, "-m", "pixcell_ext.stacks.full_random", "--output_dir", str(assets)]
    writer += ["--reduced"] if args.reduced else []
    print(f"\n  {'phase':<17}{'wall':>10}{'CPU':>11}{'peak RSS':>13}   (CPU: user + system of the process tree)")
    results = [run_phase("write_assets", writer, log_dir)]
    print_phase(results[0])
    if results[0].returncode != 0:
        raise SystemExit(phase_failed(results[0], log_dir))
    stack = write_full_random_stack(assets, reduced=args.reduced)  # already written: returns the paths
    results += run_phases(stack, out, log_dir, set(wanted))
    summary = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "shapes": shapes,
        "phases": [vars(r) for r in results],
    }
    cpu_seconds = sum(r.cpu_seconds for r in results)
    if not args.skip_memory_model:
        print("\n  measuring the memory model in this process ...")
        own = resource.getrusage(resource.RUSAGE_SELF)
        mm = measure_memory(stack, out / "feature_cache")
        used = resource.getrusage(resource.RUSAGE_SELF)
        memory_cpu = used.ru_utime + used.ru_stime - own.ru_utime - own.ru_stime
        print(f"  (memory model: {mm.seconds:.0f} s wall, {memory_cpu:.0f} s CPU)")
        cpu_seconds += memory_cpu
        summary["memory_model"] = print_memory_model(mm)
        summary["memory_model"].update(seconds=mm.seconds, cpu_seconds=memory_cpu)
    summary["total_seconds"] = time.perf_counter() - start
    summary["total_cpu_seconds"] = cpu_seconds
    (out / "rehearsal.json").write_text(json.dumps(summary, indent=2, default=str))
    print(
        f"\n  total wall time {summary['total_seconds']:.0f} s, CPU time {cpu_seconds:.0f} s (1-min load average "
        f"now {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs); summary in {out / 'rehearsal.json'}"
    )


if __name__ == "__main__":
    main(parse_args())
