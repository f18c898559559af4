"""Command lines mean what they say: no flag abbreviations, and every default visible in --help."""

import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO))
import evaluate_synthetic  # noqa: E402
import generate_synthetic  # noqa: E402
import train_adapter_lora  # noqa: E402

SCRIPTS = {
    "train": (train_adapter_lora, "--max_train_step", "3", "--train_batch_size", "(default: 16)"),
    "generate": (generate_synthetic, "--num_images_per", "2", "--num_images_per_class", "(default: 50)"),
    "evaluate": (evaluate_synthetic, "--output_di", "x", "--output_dir", "(default: "),
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_abbreviated_flags_are_refused(name, tiny_stack, capsys):
    script, abbreviation, value, *_ = SCRIPTS[name]
    with pytest.raises(SystemExit) as exited:
        script.parse_args(["--preset", "tiny", "--tiny_dir", str(tiny_stack.pixcell.parent), abbreviation, value])
    assert exited.value.code == 2
    assert f"unrecognized arguments: {abbreviation}" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_shows_every_default(name, capsys):
    script, _, _, flag, default = SCRIPTS[name]
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    text = capsys.readouterr().out
    after_flag = " ".join(text.split(f"\n  {flag} ", 1)[1].split()[:12])  # its entry, not the usage line
    assert default in after_flag, after_flag
    assert text.startswith("usage:") and script.__doc__.splitlines()[2] in text  # the docstring kept as written


def test_a_help_text_that_names_its_default_gets_no_second_one(capsys):
    with pytest.raises(SystemExit):
        train_adapter_lora.parse_args(["--help"])
    entry = " ".join(capsys.readouterr().out.split("\n  --resolution ", 1)[1].split("\n  --", 1)[0].split())
    assert entry == "RESOLUTION VAE input size; default: the checkpoint's."
