"""The real-shape rehearsal (opt-in: `python -m pytest -m full_shapes`, up to 20 minutes on 2 CPU cores) and, in the
default suite, the two pieces of its memory model that arithmetic can check: the live-tensor byte counter and the
micro-batch bound."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import rehearse_full_shapes as rehearsal  # noqa: E402

MIB = 2**20


def test_live_tensor_bytes_counts_new_storages_not_views_and_forgets_freed_ones():
    weight = torch.zeros(256, 256)  # 256 KiB, made before the tracker: never counted
    tracker = rehearsal.LiveTensorBytes()
    with tracker:
        a = torch.ones(1024, 256)  # 1 MiB
        view = a.t()  # shares a's storage
        a.mul_(2)  # in place
        b = a @ weight  # 1 MiB more: peak 2 MiB
        del a, view
        c = b + 1  # a freed first: 2 MiB again, not 3
    assert tracker.peak == 2 * MIB
    assert tracker.current == 2 * MIB  # b and c alive
    del b, c
    assert tracker.current == 0


def test_checkpointing_lowers_the_measured_activation_bytes():
    """Eight frozen MLP blocks after a trainable offset: without checkpointing every block keeps its GELU input (the
    hidden activation) until the backward; with it only the small block inputs are kept, and one block at a time is
    recomputed (its hidden activation, GELU output and their two gradients at most)."""
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(
        torch.nn.Sequential(torch.nn.Linear(64, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 64)) for _ in range(8)
    ).requires_grad_(False)
    offset = torch.nn.Parameter(torch.zeros(64))

    def peak(checkpointing: bool) -> int:
        x = torch.randn(512, 64)
        tracker = rehearsal.LiveTensorBytes()
        with tracker:
            h = x + offset
            for block in blocks:
                h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False) if checkpointing else block(h)
            h.square().mean().backward()
        return tracker.peak

    hidden = 512 * 1024 * 4  # one GELU input
    assert peak(False) >= 8 * hidden
    assert peak(True) < 4 * hidden


def test_largest_batch():
    gib = 2**30
    # 10 GiB fixed, first tile 2 GiB, then 1 GiB per tile: 24 GiB holds 1 + 12 tiles
    assert rehearsal.largest_batch(24 * gib, 10 * gib, 1 * gib, 2 * gib) == 13
    assert rehearsal.largest_batch(11 * gib, 10 * gib, 1 * gib, 2 * gib) == 0


@pytest.mark.full_shapes
def test_rehearsal_at_full_shapes(tmp_path):
    """Every script at PixCell-256's real shapes (random weights written once to full_random_assets/full)."""
    command = [sys.executable, str(REPO / "benchmarks" / "rehearse_full_shapes.py"), "--output_dir", str(tmp_path)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "rehearsal.json").read_text())
    phases = {p["name"]: p for p in summary["phases"]}
    assert phases["train_kill"]["note"].startswith("killed")
    assert all(p["returncode"] == 0 for name, p in phases.items() if name != "train_kill")
    model = summary["memory_model"]
    assert model["frozen_params"]["transformer"] > 600e6 and model["frozen_params"]["uni"] > 600e6
    rows = model["largest_bf16_micro_batch"]
    assert rows["cached, checkpointing on"][0] >= rows["cached, checkpointing off"][0] >= 1
    print(result.stdout)
