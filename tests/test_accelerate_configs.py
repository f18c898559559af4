"""The accelerate configs and the SLURM script in accelerate_configs/: parsed by accelerate itself, dry-run, and a
real two-process CPU launch."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "accelerate_configs"
SBATCH = CONFIGS / "slurm_multinode.sbatch"

# file -> fields it promises (distributed type, precision, processes, machines)
EXPECTED = {
    "single_gpu.yaml": (DistributedType.NO, "bf16", 1, 1),
    "multi_gpu.yaml": (DistributedType.MULTI_GPU, "bf16", 8, 1),
    "multi_node.yaml": (DistributedType.MULTI_GPU, "bf16", 16, 2),
    "fsdp.yaml": (DistributedType.FSDP, "bf16", 8, 1),
    "deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, "bf16", 8, 1),
    "cpu_2proc.yaml": (DistributedType.MULTI_GPU, "no", 2, 1),  # MULTI_GPU = torchrun launcher; see the file
}


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ACCELERATE_", "FSDP_"))}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_yaml_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_yaml_parsed_by_accelerate(name):
    path = CONFIGS / name
    text = path.read_text()
    assert text.startswith("#") and f"accelerate_configs/{name}" in text, "header comment with the command"
    cfg = load_config_from_file(str(path))
    dtype, precision, nproc, nmachines = EXPECTED[name]
    assert (cfg.distributed_type, cfg.mixed_precision, cfg.num_processes, cfg.num_machines) == (
        dtype,
        precision,
        nproc,
        nmachines,
    )
    if name == "multi_node.yaml":
        for field in ("machine_rank", "main_process_ip", "main_process_port", "num_machines", "num_processes"):
            assert re.search(rf"^{field}:.*# FILL", text, re.M), field
        assert cfg.rdzv_backend == "static" and cfg.same_network is False
    if name == "fsdp.yaml":
        fsdp = cfg.fsdp_config
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fsdp["fsdp_transformer_layer_cls_to_wrap"] == "BasicTransformerBlock"
    if name == "deepspeed_zero2.yaml":
        ds = cfg.deepspeed_config
        assert ds["zero_stage"] == 2
        # any value here would override the training script's flags (see the file's header)
        assert "gradient_accumulation_steps" not in ds and "gradient_clipping" not in ds
    if name == "cpu_2proc.yaml":
        assert cfg.use_cpu is True


def _validated_args(name: str, monkeypatch):
    """`accelerate launch --config_file NAME train.py` as far as the launcher's own checks (nothing started)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    for key in list(os.environ):
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.delenv(key)
    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "train.py"])
    return _validate_launch_command(args)


# simple: one process (or mpirun); torchrun: one process per GPU; deepspeed: DeepSpeed's launcher
LAUNCHERS = {
    "single_gpu.yaml": "simple",
    "multi_gpu.yaml": "torchrun",
    "multi_node.yaml": "torchrun",
    "fsdp.yaml": "torchrun",
    "deepspeed_zero2.yaml": "deepspeed",
    "cpu_2proc.yaml": "torchrun",
}


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_accepts_yaml(name, monkeypatch):
    args = _validated_args(name, monkeypatch)[0]
    launcher = "deepspeed" if args.use_deepspeed else "torchrun" if args.multi_gpu or args.use_fsdp else "simple"
    assert launcher == LAUNCHERS[name]


def _launcher_env(name: str, monkeypatch) -> dict[str, str]:
    """The environment `accelerate launch --config_file NAME` would give the training processes (no launch)."""
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args, defaults, mp_from_config = _validated_args(name, monkeypatch)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        env = prepare_deepspeed_cmd_env(args)[1]
    else:
        env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def test_fsdp_plugin_accepts_config(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    env = _launcher_env("fsdp.yaml", monkeypatch)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.transformer_cls_names_to_wrap == ["BasicTransformerBlock"]
    spec = importlib.util.find_spec("diffusers")  # read the source: importing diffusers costs seconds
    if spec is None:
        pytest.skip("diffusers not installed")
    pixart = Path(spec.origin).parent / "models" / "transformers" / "pixart_transformer_2d.py"
    assert "BasicTransformerBlock(" in pixart.read_text()  # the blocks of the real model have that class


def test_deepspeed_plugin_leaves_script_flags_alone(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    env = _launcher_env("deepspeed_zero2.yaml", monkeypatch)
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"
    assert "ACCELERATE_GRADIENT_ACCUMULATION_STEPS" not in env and "ACCELERATE_GRADIENT_CLIPPING" not in env
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == 2
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"  # filled from Accelerator(...)
    assert plugin.deepspeed_config["gradient_clipping"] == "auto"


def test_sbatch_syntax():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)


USER_ARGS = ["--output_dir", "x", "--train_data_dir", "/data/my tiles", "--note", "a$b'c\""]


def _launch_lines(stdout: str) -> list[list[str]]:
    return [shlex.split(line.split("] ", 1)[1]) for line in stdout.splitlines() if "accelerate launch" in line]


def _opt(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_sbatch_dry_run_three_nodes(tmp_path):
    env = _clean_env(DRY_RUN="1", DRY_RUN_NODES="gpu[07-09]")
    out = subprocess.run(
        ["bash", str(SBATCH), *USER_ARGS], env=env, cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    lines = _launch_lines(out)
    assert len(lines) == 3
    for rank, argv in enumerate(lines):
        assert argv[:2] == ["accelerate", "launch"]
        assert _opt(argv, "--machine_rank") == str(rank)
        assert _opt(argv, "--main_process_ip") == "gpu07"
        assert _opt(argv, "--num_machines") == "3" and _opt(argv, "--num_processes") == "24"
        assert _opt(argv, "--config_file") == "accelerate_configs/multi_node.yaml"
        assert argv[-len(USER_ARGS) - 1 :] == ["train_adapter_lora.py", *USER_ARGS]


PRINT_ARGV = "import json, sys; print(json.dumps(sys.argv[1:]))"


def test_sbatch_real_path_with_fake_slurm(tmp_path):
    """Runs the non-dry path with stand-ins for scontrol/srun/accelerate: checks the `bash -c` escaping."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {
        "scontrol": 'printf "%s\\n" n1 n2 n3\n',
        # run the `bash -c CMD` at the end of the srun line once per node, like srun does
        "srun": 'while [ "$1" != bash ]; do shift; done\nfor i in 0 1 2; do SLURM_NODEID=$i "$@"; done\n',
        "accelerate": f'exec {shlex.quote(sys.executable)} -c {shlex.quote(PRINT_ARGV)} "$@"\n',
    }
    for name, body in fakes.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    env = _clean_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_NODELIST="n[1-3]",
        SLURM_NNODES="3",
        SLURM_JOB_ID="4242",
        SLURM_GPUS_ON_NODE="4",
        SLURM_SUBMIT_DIR=str(REPO),
        SCRIPT="generate_synthetic.py",
    )
    out = subprocess.run(["bash", str(SBATCH), *USER_ARGS], env=env, capture_output=True, text=True, check=True)
    runs = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("[")]
    assert [_opt(argv, "--machine_rank") for argv in runs] == ["0", "1", "2"]
    for argv in runs:
        assert _opt(argv, "--main_process_ip") == "n1" and _opt(argv, "--main_process_port") == "29742"
        assert _opt(argv, "--num_processes") == "12"
        assert argv[-len(USER_ARGS) - 1 :] == ["generate_synthetic.py", *USER_ARGS]


PROBE = """
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

acc = Accelerator()
total = acc.reduce(torch.tensor([acc.process_index + 1.0]), reduction="sum")
line = f"{acc.num_processes} {acc.process_index} {acc.distributed_type.value} {total.item()}"
Path(sys.argv[1], f"rank{acc.process_index}.txt").write_text(line)  # one file per rank: stdout interleaves
acc.end_training()  # destroys the process group; without it ~1 run in 3 aborts at exit (torch 2.14, gloo)
"""


def test_cpu_2proc_config_runs_two_processes(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu_2proc.yaml")]
    cmd += ["--main_process_port", str(_free_port()), str(script), str(tmp_path)]
    # ACCELERATE_USE_CPU=true is required: without it each worker reports DistributedType.NO (see cpu_2proc.yaml)
    env = _clean_env(ACCELERATE_USE_CPU="true")
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    probes = sorted(p.read_text() for p in tmp_path.glob("rank*.txt"))
    assert probes == ["2 0 MULTI_CPU 3.0", "2 1 MULTI_CPU 3.0"], out.stderr[-3000:]
