"""The model card states the alpha the LoRA was trained with, set or left to its default (one rule for both)."""

import sys
from types import SimpleNamespace

import pytest

from conftest import REPO
from pixcell_ext.model.lora import alpha_or_rank
from pixcell_ext.training.run_directory import MODEL_CARD_FILE, write_run_summary

sys.path.insert(0, str(REPO))
import train_adapter_lora  # noqa: E402


@pytest.mark.parametrize(("flags", "alpha"), [([], 4), (["--lora_alpha", "6"], 6.0)])
def test_card_alpha_is_the_trained_alpha(flags, alpha, tiny_stack, tmp_path):
    args = train_adapter_lora.parse_args(
        ["--preset", "tiny", "--tiny_dir", str(tiny_stack.pixcell.parent), "--lora_rank", "4", *flags]
    )
    lora_config, _ = train_adapter_lora.model_configs(args, SimpleNamespace(num_layers=2, caption_channels=32), [])
    assert lora_config.alpha == alpha == alpha_or_rank(args.lora_alpha, 4)
    config = {**vars(args), "class_names": ["ADI", "TUM"], "resolution": 64, "trained_steps": 3}
    write_run_summary(tmp_path, config)
    assert f"(rank 4, alpha {alpha}, targets" in (tmp_path / MODEL_CARD_FILE).read_text()
