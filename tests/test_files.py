"""Every writer is complete or absent: a write that fails part-way leaves the old file and no temporary."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from pixcell_ext import files
from pixcell_ext.files import (
    remove_stale_temporaries,
    replace_folder,
    save_safetensors_atomically,
    write_folder_once,
    write_json_atomically,
    write_text_atomically,
)
from pixcell_ext.model.adapter import AdapterConfig, UNIAdapter, load_adapter, save_adapter
from pixcell_ext.training.feature_cache import ShardStore


class Killed(Exception):
    pass


def _die(*args, **kwargs):
    raise Killed


def _only(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_text_write_that_fails_before_its_rename_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "README.md"
    write_text_atomically(target, "old card")
    monkeypatch.setattr(os, "replace", _die)
    with pytest.raises(Killed):
        write_text_atomically(target, "new card")
    assert target.read_text() == "old card"
    assert _only(tmp_path) == ["README.md"]


def test_a_safetensors_write_cut_short_keeps_the_old_file(tmp_path, monkeypatch):
    import safetensors.torch

    target = tmp_path / "weights.safetensors"
    save_safetensors_atomically({"w": torch.zeros(3)}, target, metadata={"v": "1"})

    def truncated(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"\x00" * 7)  # part of a header, then the process dies
        raise Killed

    monkeypatch.setattr(safetensors.torch, "save_file", truncated)
    with pytest.raises(Killed):
        save_safetensors_atomically({"w": torch.ones(3)}, target, metadata={"v": "2"})
    assert torch.equal(load_file(target)["w"], torch.zeros(3))
    assert _only(tmp_path) == ["weights.safetensors"]


def test_the_temporary_is_flushed_to_disk_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b)))
    write_json_atomically(tmp_path / "a.json", {"x": 1})
    save_safetensors_atomically({"w": torch.zeros(2)}, tmp_path / "b.safetensors")
    assert events == ["fsync", "replace", "fsync", "replace"]
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}


def test_adapter_and_feature_shard_writes_go_through_the_atomic_writer(tmp_path, monkeypatch):
    adapter = UNIAdapter(AdapterConfig(embed_dim=8, hidden_dim=4))
    save_adapter(adapter, tmp_path / "adapter.safetensors")
    store = ShardStore(tmp_path / "shards")
    store.write(["a"], {"x": torch.zeros(1, 2)})
    before = _only(tmp_path), _only(tmp_path / "shards")

    monkeypatch.setattr(os, "replace", _die)
    with torch.no_grad():
        adapter.fc2.weight.fill_(1.0)
    with pytest.raises(Killed):
        save_adapter(adapter, tmp_path / "adapter.safetensors")
    with pytest.raises(Killed):
        store.write(["b"], {"x": torch.ones(1, 2)})
    assert (_only(tmp_path), _only(tmp_path / "shards")) == before
    monkeypatch.undo()
    assert load_adapter(tmp_path / "adapter.safetensors").fc2.weight.abs().sum() == 0
    assert set(ShardStore(tmp_path / "shards").rows) == {"a"}


def test_a_folder_whose_writer_fails_is_absent_and_leaves_no_partial(tmp_path):
    def writer(folder):
        (folder / "config.json").write_text("{}")
        raise Killed

    with pytest.raises(Killed):
        write_folder_once(tmp_path / "stack", writer)
    assert _only(tmp_path) == []

    write_folder_once(tmp_path / "stack", lambda folder: (folder / "config.json").write_text("1"))
    write_folder_once(tmp_path / "stack", lambda folder: (folder / "config.json").write_text("2"))  # kept as is
    assert (tmp_path / "stack" / "config.json").read_text() == "1"
    assert _only(tmp_path) == ["stack"]


def test_a_built_folder_replaces_the_old_one_whole(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "stale.bin").write_bytes(b"x")
    (tmp_path / ".new.partial").mkdir()
    (tmp_path / ".new.partial" / "fresh.bin").write_bytes(b"y")
    replace_folder(tmp_path / ".new.partial", tmp_path / "old")
    assert _only(tmp_path) == ["old"] and _only(tmp_path / "old") == ["fresh.bin"]


def test_only_temporaries_of_writers_that_no_longer_run_are_swept(tmp_path):
    dead = files._pid_alive  # a pid that is not running: the highest free one below pid_max
    pid = 4_000_000
    while dead(pid):
        pid -= 1
    stale = tmp_path / f".manifest.csv.{pid}.tmp"
    live = tmp_path / f".manifest.csv.{os.getppid()}.tmp"
    other = tmp_path / f".report.json.{pid}.tmp"
    for path in (stale, live, other):
        path.write_text("")
    assert remove_stale_temporaries(tmp_path, "manifest.csv") == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])


def test_buffered_rows_are_written_a_shard_at_a_time_and_read_back_in_order(tmp_path):
    from pixcell_ext.training.feature_cache import ShardBuffer

    store = ShardStore(tmp_path)
    shards = ShardBuffer(store, rows=4)
    keys = [f"k{i}" for i in range(13)]
    for start in range(0, 13, 3):  # batches of 3, 3, 3, 3, 1: a shard closes once 4 rows have arrived
        batch = keys[start : start + 3]
        shards.add(batch, {"x": torch.arange(start, start + len(batch)).float().unsqueeze(1)})
    shards.flush()  # the last row
    store.refresh()
    rows_per_shard = sorted(Counter(shard for shard, _ in store.rows.values()).values())
    assert rows_per_shard == [1, 6, 6]
    assert store.read(keys[::-1], "x").squeeze(1).tolist() == list(range(12, -1, -1))


def test_no_module_renames_files_by_hand():
    """The one atomic writer: a hand-written temp-and-rename elsewhere would skip the flush or the clean-up."""
    from conftest import REPO

    sources = [*(REPO / "pixcell_ext").rglob("*.py"), *REPO.glob("*.py"), *(REPO / "benchmarks").glob("*.py")]
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for path in sources
        if path.name != "files.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "os.replace(" in line or "os.rename(" in line or ".rename(" in line
    ]
    assert len(sources) > 20 and not offenders
