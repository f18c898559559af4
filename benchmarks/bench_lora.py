"""Cost of our LoRALinear against a plain frozen nn.Linear and PEFT's lora.Linear, at PixCell-256's widths.

    python benchmarks/bench_lora.py [--device cpu|cuda] [--dtype float32|bfloat16] [--batch_tokens N] [--repeats N]
    python benchmarks/bench_lora.py --merge_precision   # how much of a LoRA update a merge into bf16 weights keeps
    python benchmarks/bench_lora.py --device cuda --dtype bfloat16 --autocast   # training as under bf16 autocast

With --autocast the training table also times `input_cast`, the forward before the input stopped being copied to
fp32 under autocast. In bf16 the inference table times the unmerged layer (a merge is refused there; see lora.py).

Each round times every width and variant once, in a rotating order, so that changes in machine load hit all
variants alike. Times are medians over rounds; ratios are medians of the per-round ratios (paired, which cancels
load drift between rounds), with their interquartile range to show how much of a PASS/MISS is noise.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn

try:
    from pixcell_ext.benchmarking import paired_ratio
    from pixcell_ext.model.lora import LoRALinear
except ImportError:  # run as a script from a checkout: the repo root is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pixcell_ext.benchmarking import paired_ratio
    from pixcell_ext.model.lora import LoRALinear

WIDTHS = ((1152, 1152), (1152, 4608), (4608, 1152))  # attention projections, ff up, ff down
RANK = 16
TARGET_OURS_VS_PEFT = 1.0
TARGET_MERGED_VS_BASE = 1.02


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument(
        "--batch_tokens",
        type=int,
        default=None,
        help="tokens per step (default: 8 x 256 = 2048 on cuda; 2 x 256 = 512 on cpu to stay near 60 s on 2 cores)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default: 15 on cpu, 100 on cuda)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--autocast", action="store_true", help="run the layers under bf16 autocast")
    p.add_argument("--merge_precision", action="store_true", help="measure merge rounding in bf16 instead of speed")
    return p.parse_args()


def merge_precision() -> None:
    """What `W + ΔW` rounded to bf16 keeps of ΔW, at PixCell's attention width, for a range of update sizes."""
    n = WIDTHS[0][0]
    g = torch.Generator().manual_seed(0)
    print(f"merge into bf16 weights: {n}x{n}, rank {RANK}, normal weights and a random rank-{RANK} update")
    print(f"  {'weight std':>10} {'RMS dW':>8} {'weights unchanged':>18} {'|merged dW - dW| / |dW|':>24}")
    for weight_std in (0.02, 0.05):
        weight = (torch.randn(n, n, generator=g) * weight_std).bfloat16()
        for rms in (1e-5, 7e-5, 3e-4, 1e-3):
            delta = torch.randn(n, RANK, generator=g) @ torch.randn(RANK, n, generator=g)
            delta *= rms / delta.square().mean().sqrt()
            merged = (weight.float() + delta).bfloat16()
            unchanged = (merged == weight).float().mean().item()
            error = ((merged.float() - weight.float() - delta).norm() / delta.norm()).item()
            print(f"  {weight_std:>10g} {rms:>8g} {unchanged:>17.1%} {error:>24.3f}")


class InputCastLoRALinear(LoRALinear):
    """The earlier forward, for the side-by-side timing: the input copied to fp32 even when autocast casts it back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return self.base_layer(x).add_(lora, alpha=self.scaling)


def build(n_in: int, n_out: int, device: str, dtype: torch.dtype) -> dict[str, nn.Module]:
    base = nn.Linear(n_in, n_out, device=device, dtype=dtype).requires_grad_(False)
    ours = LoRALinear(copy.deepcopy(base), RANK, float(RANK))
    peft_config = LoraConfig(r=RANK, lora_alpha=RANK)
    peft = PeftLoraLinear(copy.deepcopy(base), "default", peft_config, r=RANK, lora_alpha=RANK)
    # PEFT creates adapters in the base dtype; get_peft_model(autocast_adapter_dtype=True) then upcasts them to fp32.
    # Do the same, so that both LoRA variants do the same math.
    for p in [*peft.lora_A.parameters(), *peft.lora_B.parameters()]:
        p.data = p.data.float()
    input_cast = InputCastLoRALinear(copy.deepcopy(base), RANK, float(RANK))
    merged = LoRALinear(copy.deepcopy(base), RANK, float(RANK))
    nn.init.normal_(merged.lora_B.weight, std=0.01)
    if dtype == torch.float32:
        merged.merge()
    inference = "merged" if dtype == torch.float32 else "unmerged"
    return {"linear": base, "ours": ours, "input_cast": input_cast, "peft": peft, inference: merged}


def train_step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, autocast: bool) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = layer(x)
        out.backward(grad.to(out.dtype))

    return step


def infer_step(layer: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode():
            layer(x)

    return step


Steps = dict[str, dict[str, Callable[[], None]]]  # {width: {variant: step}}
Times = dict[str, dict[str, list[float]]]  # {width: {variant: [ms per round]}}


def time_rounds(cases: Steps, repeats: int, warmup: int, device: str) -> Times:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {w: {v: [] for v in variants} for w, variants in cases.items()}
    for i in range(warmup + repeats):
        for width, variants in cases.items():
            names = list(variants)
            for name in names[i % len(names) :] + names[: i % len(names)]:
                sync()
                t0 = time.perf_counter()
                variants[name]()
                sync()
                if i >= warmup:
                    times[width][name].append(1e3 * (time.perf_counter() - t0))
    return times


def print_table(title: str, times: Times, variants: tuple[str, ...], num: str, den: str) -> tuple[float, float, float]:
    print(f"\n{title}, median ms")
    print(f"  {'width':<12}" + "".join(f"{v:>11}" for v in variants) + f"{num + '/' + den:>18}{'IQR':>16}")
    rows = list(times.items())
    n_rounds = len(rows[0][1][num])
    rows.append(("sum", {v: [sum(t[v][i] for _, t in rows) for i in range(n_rounds)] for v in variants}))
    for width, t in rows:
        med, q1, q3 = paired_ratio(t[num], t[den])
        cells = "".join(f"{statistics.median(t[v]):>11.2f}" for v in variants)
        print(f"  {width:<12}{cells}{med:>18.3f}{f'{q1:.3f}-{q3:.3f}':>16}")
    return med, q1, q3


def main(args: argparse.Namespace) -> None:
    device, dtype = args.device, getattr(torch, args.dtype)
    tokens = args.batch_tokens or (2048 if device == "cuda" else 512)
    repeats = args.repeats or (100 if device == "cuda" else 15)
    torch.manual_seed(0)
    print(
        f"LoRA benchmark: device={device} dtype={args.dtype} autocast={args.autocast} tokens={tokens} rank={RANK} "
        f"repeats={repeats} "
        f"warmup={args.warmup} threads={torch.get_num_threads()}"
    )

    train, infer = {}, {}
    train_variants = ("linear", "ours", "input_cast", "peft") if args.autocast else ("linear", "ours", "peft")
    infer_variants = ("linear", "merged" if dtype == torch.float32 else "unmerged")
    for n_in, n_out in WIDTHS:
        layers = build(n_in, n_out, device, dtype)
        x = torch.randn(tokens, n_in, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(tokens, n_out, device=device, dtype=dtype)
        train[f"{n_in}->{n_out}"] = {v: train_step(layers[v], x, grad, args.autocast) for v in train_variants}
        infer[f"{n_in}->{n_out}"] = {v: infer_step(layers[v], x.detach()) for v in infer_variants}

    train_times = time_rounds(train, repeats, args.warmup, device)
    infer_times = time_rounds(infer, repeats, args.warmup, device)
    ours = print_table(
        "forward+backward (frozen base, input requires grad)", train_times, train_variants, "ours", "peft"
    )
    if args.autocast:
        title = "forward+backward, ours vs the earlier input cast"
        print_table(title, train_times, train_variants, "ours", "input_cast")
    inference = infer_variants[1]
    merged = print_table(f"{inference} inference (forward only)", infer_times, infer_variants, inference, "linear")

    print()
    verdicts = [("ours/peft", ours, TARGET_OURS_VS_PEFT)]
    if inference == "merged":  # in bf16 the layer stays unmerged (a merge is refused): no target for that
        verdicts.append(("merged/base", merged, TARGET_MERGED_VS_BASE))
    for name, (med, q1, q3), target in verdicts:
        verdict = "PASS" if med <= target else "MISS"
        print(f"{name:<12}= {med:.3f}  (IQR {q1:.3f}-{q3:.3f}; target <= {target:.2f})  {verdict}")


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.merge_precision:
        merge_precision()
    else:
        main(arguments)
