"""Every preset lives in pixcell_ext.stacks.presets and names only flags its script has.

`parser.set_defaults` accepts any name, so a preset key with a typo (or one left behind by a renamed flag) would be
dropped without a word; this test is what notices.
"""

import sys

import pytest

from conftest import REPO
from pixcell_ext.stacks import presets
from pixcell_ext.stacks.mini import mini_stack

sys.path.insert(0, str(REPO))
import evaluate_synthetic  # noqa: E402
import generate_synthetic  # noqa: E402
import train_adapter_lora  # noqa: E402

SCRIPTS = {
    "train": (train_adapter_lora, presets.TRAINING_PRESETS),
    "generate": (generate_synthetic, presets.GENERATION_PRESETS),
    "evaluate": (evaluate_synthetic, presets.EVALUATION_PRESETS),
}


class Parsed(Exception):
    pass


def _flags(script, monkeypatch) -> set[str]:
    """The destinations of every flag the script's parser defines."""
    seen = {}

    def capture(parser, argv, table):
        seen["parser"] = parser
        raise Parsed

    monkeypatch.setattr(presets, "parse_with_preset", capture)
    with pytest.raises(Parsed):
        script.parse_args([])
    return {action.dest for action in seen["parser"]._actions}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_each_script_takes_its_presets_from_the_presets_module(name):
    script, table = SCRIPTS[name]
    assert script.PRESETS is table
    assert sorted(table) == ["mini", "tiny"]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_preset_value_is_a_flag_of_its_script(name, tiny_stack, tmp_path, monkeypatch):
    script, table = SCRIPTS[name]
    flags = _flags(script, monkeypatch)
    for preset, stack in (("tiny", tiny_stack), ("mini", mini_stack(tmp_path))):
        unknown = sorted(set(table[preset](stack)) - flags)
        assert not unknown, f"--preset {preset} of {script.__name__} sets {unknown}, which are not flags"


def test_the_scripts_import_no_test_asset_builder():
    """Stand-ins and random stacks are written only when a preset asks for them, never on the production path."""
    import subprocess

    builders = [
        "pixcell_ext.stacks.tiny",
        "pixcell_ext.stacks.testing_assets",
        "pixcell_ext.stacks.toy_histology",
        "pixcell_ext.stacks.mini_stack",
        "pixcell_ext.stacks.mini_vae",
        "pixcell_ext.stacks.mini_uni",
        "pixcell_ext.stacks.mini_training",
    ]
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); "
        "import train_adapter_lora, generate_synthetic, evaluate_synthetic; "
        f"print(sorted(set(sys.modules) & set({builders!r})))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
