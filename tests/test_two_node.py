"""A real two-node job on one machine: the per-node commands that the SLURM script's dry run prints, run as they
are (two launchers, `--num_machines 2`, one process each, rendezvous on 127.0.0.1), train and generate exactly
what one machine with two processes does.

Equality is bitwise, and that is what to expect: both jobs have world size 2, the same rank owns the same shard of
every batch, the gradient all-reduce adds the same two operands (a + b is exact to swap, so the order in which
they arrive does not matter) and every process runs with one thread. Nothing that rounds differently changes
between the two set-ups; only how the processes found each other does.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, free_port

SBATCH = REPO / "accelerate_configs" / "slurm_multinode.sbatch"
LOCALHOST = "127.0.0.1"
CLASSES = ["ADI", "BACK"]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ACCELERATE_", "FSDP_"))}
    # ACCELERATE_USE_CPU: the config's MULTI_GPU becomes MULTI_CPU (gloo) on a machine without GPUs.
    env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)
    return env


def slurm_dry_run(script: str, port: int, *user_args: str) -> list[list[str]]:
    """The per-node commands of `DRY_RUN=1 slurm_multinode.sbatch` for two nodes that are both this machine."""
    env = clean_env(
        DRY_RUN="1",
        DRY_RUN_NODES=f"{LOCALHOST},{LOCALHOST}",
        GPUS_PER_NODE="1",
        MAIN_PROCESS_PORT=str(port),
        SCRIPT=script,
    )
    out = subprocess.run(["bash", str(SBATCH), *user_args], env=env, capture_output=True, text=True, check=True)
    return [shlex.split(line.split("] ", 1)[1]) for line in out.stdout.splitlines() if line.startswith("[")]


def as_module(argv: list[str]) -> list[str]:
    """`accelerate launch ...` as `python -m accelerate.commands.launch ...`: the same launcher without the console
    script's timm import."""
    assert argv[:2] == ["accelerate", "launch"], argv
    return [sys.executable, "-m", "accelerate.commands.launch", *argv[2:]]


def run_two_nodes(script: str, *user_args: str) -> list[list[str]]:
    """Start both nodes' commands concurrently, wait for both; returns the commands that ran."""
    nodes = slurm_dry_run(script, free_port(), *user_args)
    procs = [
        subprocess.Popen(as_module(argv), cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for argv in nodes
    ]
    try:
        outputs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (proc, output) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"node {rank}:\n{output[-4000:]}"
    return nodes


def run_one_machine(script: str, *user_args: str) -> None:
    """The same job as one machine with two processes; mixed precision as in multi_node.yaml, which the dry run uses."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
        "--num_processes", "2", "--main_process_port", str(free_port()), "--mixed_precision", "bf16",
        "--dynamo_backend", "no", script, *user_args,
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def train_args(stack, output_dir: Path) -> list[str]:
    return [
        "--preset", "tiny", "--tiny_dir", str(stack.pixcell.parent), "--output_dir", str(output_dir),
        "--max_train_steps", "3", "--train_batch_size", "2", "--checkpointing_steps", "100",
        "--validation_steps", "100", "--num_validation_inference_steps", "1", "--dataloader_num_workers", "0",
        "--report_to", "none",
    ]  # fmt: skip


def generate_args(stack, run_dir: Path, output_dir: Path) -> list[str]:
    return [
        "--preset", "tiny", "--tiny_dir", str(stack.pixcell.parent), "--lora_dir", str(run_dir),
        "--output_dir", str(output_dir), "--classes", *CLASSES, "--num_images_per_class", "3",
        "--num_inference_steps", "2", "--batch_size", "2",
    ]  # fmt: skip


def trained(directory: Path) -> dict[str, torch.Tensor]:
    weights = {f"adapter.{k}": v for k, v in load_file(directory / "adapter.safetensors").items()}
    weights.update(load_file(directory / "pytorch_lora_weights.safetensors"))
    return weights


def test_dry_run_prints_a_two_node_launch_per_node():
    """What the test below runs: rank-specific launches of one job over two machines, rendezvous on the first."""
    port = free_port()
    nodes = slurm_dry_run("train_adapter_lora.py", port, "--output_dir", "out dir")
    assert len(nodes) == 2
    for rank, argv in enumerate(nodes):
        flags = dict(zip(argv[2::2], argv[3::2], strict=False))
        assert argv[:2] == ["accelerate", "launch"]
        assert flags["--config_file"] == "accelerate_configs/multi_node.yaml"
        assert (flags["--num_machines"], flags["--num_processes"], flags["--machine_rank"]) == ("2", "2", str(rank))
        assert (flags["--main_process_ip"], flags["--main_process_port"]) == (LOCALHOST, str(port))
        assert argv[-3:] == ["train_adapter_lora.py", "--output_dir", "out dir"]
    assert [a for a in nodes[0] if a != "0"] == [a for a in nodes[1] if a != "1"]  # only the rank differs


@pytest.fixture(scope="module")
def two_node_and_one_machine_runs(tiny_stack, tmp_path_factory):
    root = tmp_path_factory.mktemp("two-node")
    two, one = root / "two-nodes", root / "one-machine"
    nodes = run_two_nodes("train_adapter_lora.py", *train_args(tiny_stack, two))
    run_one_machine("train_adapter_lora.py", *train_args(tiny_stack, one))
    return nodes, two, one


def test_two_node_training_matches_one_machine_bitwise(two_node_and_one_machine_runs):
    nodes, two, one = two_node_and_one_machine_runs
    assert [argv[argv.index("--machine_rank") + 1] for argv in nodes] == ["0", "1"]
    a, b = trained(two), trained(one)
    assert a.keys() == b.keys() and a
    assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 0, "LoRA B never moved: vacuous"
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_two_node_generation_matches_one_machine_bytes(tiny_stack, two_node_and_one_machine_runs, tmp_path):
    _, _, run_dir = two_node_and_one_machine_runs
    two, one = tmp_path / "two-nodes", tmp_path / "one-machine"
    run_two_nodes("generate_synthetic.py", *generate_args(tiny_stack, run_dir, two))
    run_one_machine("generate_synthetic.py", *generate_args(tiny_stack, run_dir, one))
    pngs = {p.relative_to(two).as_posix(): p.read_bytes() for p in sorted(two.glob("*/*.png"))}
    assert len(pngs) == len(CLASSES) * 3
    assert pngs == {p.relative_to(one).as_posix(): p.read_bytes() for p in sorted(one.glob("*/*.png"))}
