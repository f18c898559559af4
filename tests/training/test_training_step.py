"""The training script and the training benchmark run one and the same step function, `loop.train_step`."""

import argparse
import importlib.util
import sys

import pytest
from accelerate import Accelerator

from conftest import REPO
from pixcell_ext.training import loop

sys.path.insert(0, str(REPO))
import train_adapter_lora  # noqa: E402


def load_bench_train():
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "benchmarks" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def recorded_steps(monkeypatch):
    """Every call of `loop.train_step`, with the number of collectives (gathers) each one made."""
    calls = []
    real_step, real_gather = loop.train_step, Accelerator.gather
    gathers = []

    def counting_gather(self, tensor):
        gathers.append(tensor.shape)
        return real_gather(self, tensor)

    def step(accelerator, modules, batch, config):
        before = len(gathers)
        stats = real_step(accelerator, modules, batch, config)
        calls.append((len(batch["label"]), stats.updated, len(gathers) - before))
        return stats

    monkeypatch.setattr(loop, "train_step", step)
    monkeypatch.setattr(Accelerator, "gather", counting_gather)
    return calls


def test_the_benchmark_times_the_training_step(recorded_steps, one_thread):
    bench_train = load_bench_train()
    bench = bench_train.setup(
        argparse.Namespace(mixed_precision="no", gradient_checkpointing=False), bench_train.PRESETS["tiny"]
    )
    batches = bench_train.make_batches(bench, 3)
    bench_train.package_step(bench, batches["cached"])
    bench_train.package_step(bench, batches["on_the_fly"])
    assert recorded_steps == [(3, True, 1), (3, True, 1)]
    # The notebook's way: the same step image by image, accumulated into one update; then back to an update per step.
    recorded_steps.clear()
    bench_train.notebook_step(bench, batches["notebook"])
    bench_train.package_step(bench, batches["cached"])
    assert recorded_steps == [(1, False, 0), (1, False, 0), (1, True, 1), (3, True, 1)]


def test_the_script_runs_the_step_with_one_collective_per_update(recorded_steps, tiny_stack, tmp_path, one_thread):
    args = train_adapter_lora.parse_args([
        "--preset", "tiny", "--tiny_dir", str(tiny_stack.pixcell.parent), "--output_dir", str(tmp_path / "run"),
        "--dataloader_num_workers", "0", "--report_to", "none", "--max_train_steps", "2",
        "--gradient_accumulation_steps", "2", "--train_batch_size", "2", "--validation_steps", "100",
    ])  # fmt: skip
    train_adapter_lora.main(args)
    # 2 updates of 2 micro-batches; the loss statistics are gathered once per update, not per micro-batch.
    assert recorded_steps == [(2, False, 0), (2, True, 1), (2, False, 0), (2, True, 1)]
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
