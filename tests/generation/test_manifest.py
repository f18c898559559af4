"""The one manifest format: what generation writes is what evaluation reads, and a killed write leaves nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from conftest import REPO
from pixcell_ext.generation.manifest import (
    MANIFEST_COLUMNS,
    MANIFEST_FILE,
    METADATA_FILE,
    read_manifest,
    read_references,
    write_manifest,
)


def test_rows_round_trip_and_references_resolve(tmp_path):
    real = tmp_path / "real" / "ADI"
    real.mkdir(parents=True)
    (real / "a.png").write_bytes(b"x")
    rows = [
        {"file": "ADI/gen_0000.png", "class": "ADI", "index": 0, "reference": "ADI/a.png"},
        {"file": "ADI/gen_0001.png", "class": "ADI", "index": 1, "reference": "none"},
        {"file": "ADI/gen_0002.png", "class": "ADI", "index": 2, "reference": "ADI/missing.png"},
    ]
    (tmp_path / "syn").mkdir()
    write_manifest(tmp_path / "syn", rows)
    back = read_manifest(tmp_path / "syn")
    assert list(back[0]) == list(MANIFEST_COLUMNS)
    assert [r["reference"] for r in back] == ["ADI/a.png", "none", "ADI/missing.png"]
    assert back[0]["seed"] == ""  # columns a row does not give stay empty
    refs = read_references(tmp_path / "syn", tmp_path / "real")
    assert refs.references[(tmp_path / "syn/ADI/gen_0000.png").resolve()] == (real / "a.png").resolve()
    assert refs.references[(tmp_path / "syn/ADI/gen_0001.png").resolve()] is None
    assert refs.unresolved == ["ADI/missing.png"]
    assert read_references(tmp_path, tmp_path / "real") is None  # no manifest: None, not an empty map


def test_a_write_killed_before_its_rename_leaves_no_temporary_after_the_rerun(tmp_path):
    killed = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r})
        from pixcell_ext.generation import manifest
        os.replace = lambda *a: os._exit(9)  # killed between the temporary's write and its rename
        manifest.write_manifest(__import__("pathlib").Path({str(tmp_path)!r}), [{{"file": "A/gen_0000.png"}}])
        """
    )
    result = subprocess.run([sys.executable, "-c", killed], check=False)
    assert result.returncode == 9
    stale = list(tmp_path.glob(f".{MANIFEST_FILE}.*.tmp"))
    assert len(stale) == 1 and not (tmp_path / MANIFEST_FILE).exists()
    live = tmp_path / f".{MANIFEST_FILE}.{os.getppid()}.tmp"  # a running process's write in progress: kept
    live.write_text("")

    write_manifest(tmp_path, [{"file": "A/gen_0000.png"}])
    assert [r["file"] for r in read_manifest(tmp_path)] == ["A/gen_0000.png"]
    assert sorted(tmp_path.glob(f".{MANIFEST_FILE}.*.tmp")) == [live]
    assert (tmp_path / METADATA_FILE).read_text() == json.dumps(
        {"file_name": "A/gen_0000.png", **dict.fromkeys(MANIFEST_COLUMNS[1:], "")}
    ) + "\n"


def test_references_are_written_relative_to_a_relative_reference_flag(tmp_path, monkeypatch):
    """The README passes a relative --reference_data_dir while the tile index holds absolute paths: the manifest
    must still name each reference relative to the folder (this once failed after every image was generated)."""
    from pixcell_ext.generation.manifest import manifest_rows
    from pixcell_ext.generation.work_list import WorkItem

    monkeypatch.chdir(tmp_path)
    (tmp_path / "real" / "ADI").mkdir(parents=True)
    (tmp_path / "syn" / "ADI").mkdir(parents=True)
    item = WorkItem("ADI", 0, (tmp_path / "real" / "ADI" / "a.png").resolve(), seed=3)
    (tmp_path / "syn" / item.file).write_bytes(b"png")
    config = {
        "sources": {"reference_data_dir": "real", "pretrained_model_name_or_path": "m", "lora_dir": None},
        "guidance_scale": 2.0, "num_inference_steps": 4, "scheduler": "dpm", "lora_sha256": None,
    }  # fmt: skip
    assert [row["reference"] for row in manifest_rows(tmp_path / "syn", [item], config)] == ["ADI/a.png"]
