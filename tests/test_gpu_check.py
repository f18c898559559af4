"""benchmarks/gpu_check.sh cannot run without a GPU; its dry run can: every command it would run is parsed by the
parser that will receive it, and the per-step timeouts must bound the whole run under 8 minutes."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))  # the scripts, whose parsers check the commands
sys.path.insert(0, str(REPO / "benchmarks"))

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
BUDGET_S = 8 * 60
CONFIGS = ("multi_gpu", "fsdp", "deepspeed_zero2")


def dry_run(tmp_path: Path) -> list[tuple[str, float, list[str]]]:
    """(step, worst-case seconds, argv) per command; the run must write nothing."""
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "OUT": str(tmp_path / "out"), "WORK_DIR": str(tmp_path / "work")}
    out = subprocess.run(["bash", str(SCRIPT)], env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists(), "the dry run wrote files"
    steps = []
    for line in out.stdout.splitlines():
        name, command = line[1:].split("] ", 1)
        argv = shlex.split(command)
        assert argv[0] == "timeout" and argv[1].startswith("--kill-after="), line
        seconds = float(argv[2]) + float(argv[1].split("=")[1])
        steps.append((name, seconds, argv[3:]))
    return steps


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    return dry_run(tmp_path_factory.mktemp("gpu-check"))


def test_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_every_step_is_bounded_and_all_fit_in_eight_minutes(steps):
    names = [name for name, _, _ in steps]
    assert names == ["install", "write_assets", "bench_train", "generate", *[c for c in CONFIGS for _ in (0, 1)]]
    assert sum(seconds for _, seconds, _ in steps) <= BUDGET_S - 10


def script_args(argv: list[str], script: str) -> list[str]:
    return argv[argv.index(script) + 1 :]


def test_benchmarks_run_at_full_shapes_in_bf16(steps, monkeypatch):
    by_name = {name: argv for name, _, argv in steps}
    import bench_train

    monkeypatch.setattr(
        sys, "argv", ["bench_train.py", *script_args(by_name["bench_train"], "benchmarks/bench_train.py")]
    )
    args = bench_train.parse_args()
    assert (args.preset, args.mixed_precision, args.find_max_batch) == ("full", "bf16", True)

    from pixcell_ext.stacks import full_random

    writer = full_random.parse_args(
        by_name["write_assets"][by_name["write_assets"].index("pixcell_ext.stacks.full_random") + 1 :]
    )
    assert not writer.reduced and writer.device == "cuda"

    generate = by_name["generate"]
    if "generate_synthetic.py" in generate:
        import generate_synthetic

        args = generate_synthetic.parse_args(script_args(generate, "generate_synthetic.py"))
        assert args.pretrained_model_name_or_path.startswith(writer.output_dir)
        assert args.mixed_precision is None and generate[generate.index("--mixed_precision") + 1] == "bf16"


def test_each_config_trains_two_updates_then_resumes(steps):
    from accelerate.commands.launch import launch_command_parser

    import train_adapter_lora

    for config in CONFIGS:
        first, second = [argv for name, _, argv in steps if name == config]
        runs = []
        for argv in (first, second):
            assert argv[1:3] == ["-m", "accelerate.commands.launch"]
            launch = launch_command_parser().parse_args(argv[3:])
            assert launch.config_file == f"accelerate_configs/{config}.yaml" and launch.num_processes == 1
            assert (REPO / launch.config_file).is_file()
            assert launch.training_script == "train_adapter_lora.py"
            runs.append(train_adapter_lora.parse_args(launch.training_script_args))
        assert (runs[0].max_train_steps, runs[0].checkpointing_steps, runs[0].resume_from_checkpoint) == (2, 1, None)
        assert (runs[1].max_train_steps, runs[1].resume_from_checkpoint) == (3, "latest")
        assert runs[0].output_dir == runs[1].output_dir
