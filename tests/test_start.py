"""README's "Start here": `make demo` / `make test` set up once, then run what the long form gives by hand."""

import os
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO, launch_command

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def readme_launch() -> list[str]:
    match = re.search(r'^LAUNCH="([^"]+)"$', (REPO / "README.md").read_text(), re.MULTILINE)
    assert match, "README.md no longer defines LAUNCH"
    return shlex.split(match.group(1))


def dry_run(directory, *arguments: str) -> str:
    """`make -n` as on a developer's shell: CI's own `CI=true` would change what the Makefile prints, and an outer
    `make test` (MAKELEVEL, MAKEFLAGS) would make this one print "Entering directory" lines."""
    inherited = {"CI", "MAKELEVEL", "MAKEFLAGS", "MFLAGS"}
    environment = {key: value for key, value in os.environ.items() if key not in inherited}
    result = subprocess.run(
        ["make", "-n", *arguments], cwd=directory, capture_output=True, text=True, timeout=60, check=True,
        env=environment,
    )  # fmt: skip
    return result.stdout


@pytest.fixture
def checkout(tmp_path):
    """The files the Makefile reads, in a folder of their own, so stamps and timestamps can be played with."""
    for name in ("Makefile", "requirements.txt", "requirements-dev.txt"):
        shutil.copy2(REPO / name, tmp_path / name)
    return tmp_path


@needs_make
def test_makefile_readme_and_tests_launch_the_same_way(checkout):
    (checkout / ".venv").mkdir()
    (checkout / ".venv" / ".setup-done").touch()
    demo = dry_run(checkout, "demo").strip().splitlines()
    assert len(demo) == 1 and demo[0].startswith(".venv/bin/")
    made = shlex.split(demo[0].removeprefix(".venv/bin/"))
    flags = readme_launch()
    assert made[: len(flags)] == flags
    assert made[len(flags) :] == ["train_adapter_lora.py", "--preset", "mini", "--resume_from_checkpoint", "latest"]
    tested = launch_command(1, "train_adapter_lora.py")
    assert tested[3:-1] == flags[2:]  # `python -m accelerate.commands.launch` is `accelerate launch`


@needs_make
def test_make_test_checks_the_import_layers_before_the_tests(checkout):
    (checkout / ".venv").mkdir()
    (checkout / ".venv" / ".setup-done").touch()
    lines = dry_run(checkout, "test").strip().splitlines()
    assert lines[-2:] == [".venv/bin/lint-imports --no-cache", ".venv/bin/python -m pytest -q"]
    assert "apt-get install" in "\n".join(lines[:-2])  # first the browser of the report's test (when missing)


def test_the_documented_launch_flags_leave_accelerate_nothing_to_guess(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("print('probe ran')\n")
    launch = [sys.executable, "-m", "accelerate.commands.launch"]

    def stderr(*flags: str) -> str:
        result = subprocess.run([*launch, *flags, str(probe)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and "probe ran" in result.stdout, result.stderr[-2000:]
        return result.stderr

    assert "were not passed to `accelerate launch`" in stderr()  # the warning this guards against, bare
    assert "were not passed" not in stderr(*readme_launch()[2:])


@needs_make
def test_setup_runs_once_torch_first_and_again_after_a_requirements_change(checkout):
    first = dry_run(checkout, "demo")
    steps = [line for line in first.splitlines() if "pip install" in line or "-m venv" in line]
    assert "-m venv .venv" in steps[0]
    assert steps[1].endswith("install torch==2.14.1 torchvision==0.29.1")
    assert steps[2].endswith("install -r requirements-dev.txt")
    assert "touch .venv/.setup-done" in first and "--preset mini" in first

    (checkout / ".venv").mkdir()
    (checkout / ".venv" / ".setup-done").touch()
    assert "pip" not in dry_run(checkout, "demo") and "pip" not in dry_run(checkout, "test")
    assert "--preset tiny" in dry_run(checkout, "demo", "PRESET=tiny")

    time.sleep(0.01)  # make compares modification times
    (checkout / "requirements.txt").touch()
    assert "install -r requirements-dev.txt" in dry_run(checkout, "test")


@needs_make
def test_ci_keeps_pip_quiet_and_non_interactive(checkout):
    assert "--no-input --progress-bar off" in dry_run(checkout, "setup", "CI=true")
    assert "--no-input" not in dry_run(checkout, "setup")


def test_ci_runs_the_two_readme_commands():
    commands = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.startswith("make")]
    assert commands == ["make demo", "make test"]
    start = (REPO / "README.md").read_text().split("## Start here", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in start.strip().splitlines()] == commands
