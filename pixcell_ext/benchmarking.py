"""How the benchmarks measure a step: wall time in rotating rounds, model FLOPs, peak memory, and the machine.

Shared by the benchmark scripts so that a number printed by one means what the same number printed by another means.
"""

from __future__ import annotations

import ctypes
import gc
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils import flop_counter

MB = 2**20


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so a host clock read after it covers the step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field_name} in /proc/self/status")


def peak_memory_mb(step: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(peak, peak minus what was in use just before the step) in MiB, for one step: on CUDA the allocator's
    `max_memory_allocated`, on a CPU the kernel's peak-RSS mark (VmHWM), reset before the step."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        return peak / MB, (peak - before) / MB
    try:  # hand freed heap back to the OS, so the rise measures this step and not the last one's leftovers
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass  # then VmHWM is the process's lifetime peak, an upper bound
    before = _proc_status_kb("VmRSS")
    step()
    peak = _proc_status_kb("VmHWM")
    return peak / 1024, (peak - before) / 1024


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch counts the CUDA attention kernels but not the CPU flash kernel; count it the same way.
CPU_SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def count_flops(step: Callable[[], None], transformer: torch.nn.Module) -> int:
    """Model FLOPs of one step: checkpointing is switched off while counting, so recomputation is not included."""
    checkpointing = transformer.gradient_checkpointing
    if checkpointing:
        transformer.disable_gradient_checkpointing()
    with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        step()
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    return counter.get_total_flops()


def time_rounds(
    steps: dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per step of each mode, one step per mode per round in a rotating order, so load drift from other
    processes hits all modes alike; warm-up rounds dropped."""
    times = {name: [] for name in steps}
    names = list(steps)
    for i in range(warmup + repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            steps[name]()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def paired_ratio(slow: list[float], fast: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of the per-round ratios slow / fast (for times: the speed-up of `fast`)."""
    ratios = sorted(a / b for a, b in zip(slow, fast, strict=True))
    q1, med, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return med, q1, q3


def print_profile(
    steps: dict[str, Callable[[], None]], device: torch.device, rows: int, phases: tuple[str, ...], count: int = 3
) -> None:
    """Per step, over `count` runs: host ms per run in each of `phases` (record_function ranges), then the top `rows`
    ops."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name, step in steps.items():
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(count):
                step()
            sync(device)
            wall = (time.perf_counter() - t0) / count
        events = {e.key: e for e in prof.key_averages()}
        split = ", ".join(
            f"{phase} {events[phase].cpu_time_total / 1e3 / count:.0f}" for phase in phases if phase in events
        )
        print(
            f"\nprofile of '{name}', {count} steps: {1e3 * wall:.0f} ms/step under the profiler; host ms/step: {split}"
        )
        print(prof.key_averages().table(sort_by=sort, row_limit=rows))


def cpu_name() -> str:
    return next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )


def machine() -> str:
    """The device a benchmark ran on: the GPU, else the CPU and the threads torch uses."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return f"{cpu_name()}, {torch.get_num_threads()} threads"
