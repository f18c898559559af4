"""The import layers in pyproject.toml hold, and each contract breaks when a wrong import is planted in a copy."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` in `root`, where it finds pyproject.toml and imports `pixcell_ext` from the current folder."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture
def package_copy(tmp_path) -> Path:
    shutil.copytree(
        REPO / "pixcell_ext", tmp_path / "pixcell_ext", ignore=shutil.ignore_patterns("assets", "__pycache__")
    )
    shutil.copy2(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_tree_keeps_every_contract():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "5 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "planted", "contract", "arrow"),
    [
        (
            "model/adapter.py",
            "from pixcell_ext.training import loop",
            "Product layers: evaluation > generation > training > model",
            "pixcell_ext.model.adapter -> pixcell_ext.training.loop",
        ),
        (
            "training/loop.py",
            "from pixcell_ext.generation import work_list",
            "Product layers: evaluation > generation > training > model",
            "pixcell_ext.training.loop -> pixcell_ext.generation.work_list",
        ),
        ("data.py", "from pixcell_ext.model import lora", "Shared leaves import no sub-package", "pixcell_ext.data"),
        (
            "evaluation/metrics.py",
            "from pixcell_ext.stacks import tiny",
            "No product package imports stacks",
            "pixcell_ext.evaluation.metrics -> pixcell_ext.stacks.tiny",
        ),
        ("files.py", "import train_adapter_lora", "The package never imports a script", "pixcell_ext.files"),
        (
            "generation/work_list.py",
            "from pixcell_ext.generation import pipeline",
            "No import cycle between the modules of any package",
            ".work_list -> .pipeline",
        ),
    ],
)
def test_a_planted_import_breaks_its_contract(package_copy, module, planted, contract, arrow):
    target = package_copy / "pixcell_ext" / module
    target.write_text(target.read_text() + f"\n{planted}  # noqa: E402\n")
    result = lint_imports(package_copy)
    assert result.returncode != 0
    assert f"{contract} BROKEN" in result.stdout
    assert arrow in result.stdout.split("Broken contracts", 1)[1]
