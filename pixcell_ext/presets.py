"""Named sets of defaults for the scripts. `--preset mini` runs the whole pipeline offline on the trained mini stack,
`--preset tiny` on random tiny models.

A preset only changes defaults: a flag given on the command line always wins.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

from pixcell_ext.tiny import TINY_RESOLUTION, TinyStack, write_tiny_stack

TINY_DIR = "tiny_assets"


def tiny_models(stack: TinyStack) -> dict:
    return {
        "pretrained_model_name_or_path": str(stack.pixcell),
        "vae_name_or_path": str(stack.vae),
        "uni_model_name_or_path": str(stack.uni),
    }


def tiny_training(stack: TinyStack) -> dict:
    return {
        **tiny_models(stack),
        "train_data_dir": str(stack.data),
        "output_dir": "outputs/tiny-run",
        "resolution": TINY_RESOLUTION,
        "train_batch_size": 4,
        "max_train_steps": 20,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 2,
        "checkpointing_steps": 10,
        "validation_steps": 10,
        "num_validation_inference_steps": 4,
        "adapter_hidden_dim": 64,
        "lora_rank": 4,
    }


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every flag's default (also for flags without a help text)."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings and action.default is not argparse.SUPPRESS:
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def make_parser(description: str | None) -> argparse.ArgumentParser:
    """The parser every script uses. No abbreviations: `--max_train_step` must not silently mean `--max_train_steps`
    (and a later flag with a longer name would change what an old command line means)."""
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter, allow_abbrev=False)


def parse_with_preset(
    parser: argparse.ArgumentParser, argv: list[str] | None, presets: dict[str, Callable[[TinyStack], dict]]
) -> argparse.Namespace:
    """Parse `argv`, with the chosen preset's values as defaults. The tiny preset writes its assets on first use,
    the mini preset its toy tile folders (its models are committed)."""
    known, _ = parser.parse_known_args(argv)
    if known.preset == "mini":
        from pixcell_ext.mini import write_mini_stack

        parser.set_defaults(**presets[known.preset](write_mini_stack(known.mini_dir)))
    elif known.preset is not None:
        stack = write_tiny_stack(known.tiny_dir)
        parser.set_defaults(**presets[known.preset](stack))
    return parser.parse_args(argv)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The frozen models, by hub id or local folder, as every script names them."""
    from pixcell_ext import models

    group = parser.add_argument_group("models")
    group.add_argument("--pretrained_model_name_or_path", default=models.PIXCELL_256_ID)
    group.add_argument("--revision", default=None)
    group.add_argument("--vae_name_or_path", default=models.SD35_VAE_ID, help="Folder or hub id holding vae/.")
    group.add_argument("--uni_model_name_or_path", default=models.UNI2H_ID, help="hf-hub:id, a folder or a file.")


def add_preset_arguments(parser: argparse.ArgumentParser, presets: dict) -> None:
    parser.add_argument(
        "--preset",
        choices=sorted(presets),
        default=None,
        help="Defaults for a known set-up. 'mini': the committed mini stack, trained on a synthetic toy domain, "
        "adapted to the toy TARGET domain (tiles written to --mini_dir); minutes on a CPU. 'tiny': random tiny "
        "models and a tiny tile folder, written to --tiny_dir if absent; runs on a CPU in about a minute.",
    )
    parser.add_argument("--tiny_dir", default=TINY_DIR, help="Where the tiny preset keeps its models and data.")
    parser.add_argument("--mini_dir", default="mini_assets", help="Where the mini preset writes its toy tiles.")
