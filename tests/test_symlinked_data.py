"""Class folders and tiles reached through symlinks (how splits are assembled on clusters) are read by all three
scripts; a symlink loop is refused with its path."""

import os
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, launch_command
from pixcell_ext.data import DataError, scan_image_folder
from pixcell_ext.evaluation.feature_store import TileSet
from pixcell_ext.generation.work_list import class_files


@pytest.fixture
def linked_data(tiny_stack, tmp_path) -> Path:
    """TUM is a symlink to a folder elsewhere; ADI is a real folder of symlinked tiles."""
    root = tmp_path / "split"
    root.mkdir()
    (root / "TUM").symlink_to(tiny_stack.data / "TUM", target_is_directory=True)
    (root / "ADI").mkdir()
    for tile in sorted((tiny_stack.data / "ADI").iterdir()):
        (root / "ADI" / tile.name).symlink_to(tile)
    return root


def test_training_reads_symlinked_class_folders_and_tiles(tiny_stack, linked_data, tmp_path):
    command = launch_command(
        1,
        "train_adapter_lora.py",
        *["--preset", "tiny", "--tiny_dir", str(tiny_stack.pixcell.parent), "--train_data_dir", str(linked_data)],
        *["--output_dir", str(tmp_path / "run"), "--max_train_steps", "1", "--dataloader_num_workers", "0"],
    )
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Data: 8 tiles in 2 classes {'ADI': 4, 'TUM': 4}" in result.stderr


def test_generation_finds_references_in_symlinked_class_folders(linked_data):
    files = class_files(linked_data, ["ADI", "TUM"])
    assert {name: len(paths) for name, paths in files.items()} == {"ADI": 4, "TUM": 4}
    assert all(path.parent.parent == linked_data for paths in files.values() for path in paths)


def test_evaluation_reads_symlinked_class_folders(linked_data):
    tiles = TileSet.from_index(scan_image_folder(linked_data))
    assert tiles.counts(["ADI", "TUM"]) == {"ADI": 4, "TUM": 4}


@pytest.mark.parametrize("kind", ["self", "ancestor", "tile"])
def test_a_symlink_loop_is_refused_with_its_path(linked_data, kind):
    if kind == "self":
        link = linked_data / "LOOP"
        link.symlink_to(link)
    elif kind == "ancestor":
        link = linked_data / "LOOP"
        link.symlink_to(linked_data.parent, target_is_directory=True)
    else:
        link = linked_data / "ADI" / "loop.png"
        os.symlink(link, link)
    with pytest.raises(DataError, match=f"'{link}' is a symlink loop"):
        scan_image_folder(linked_data)
