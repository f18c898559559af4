"""Named sets of defaults for the scripts, all of them here. `--preset mini` runs the whole pipeline offline on the
trained mini stack, `--preset tiny` on random tiny models.

A preset only changes defaults: a flag given on the command line always wins. Test-asset builders (the stand-in
synthetic set, random timm weights) are imported only when the tiny evaluation preset is chosen.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pixcell_ext import PIXCELL_256_ID, SD35_VAE_ID, UNI2H_ID
from pixcell_ext.stacks.mini import MINI_RESOLUTION, MiniStack, mini_models

if TYPE_CHECKING:  # the tiny stack's builder is imported only when --preset tiny is chosen
    from pixcell_ext.stacks.tiny import TinyStack

TINY_DIR = "tiny_assets"


def tiny_models(stack: TinyStack) -> dict:
    return {
        "pretrained_model_name_or_path": str(stack.pixcell),
        "vae_name_or_path": str(stack.vae),
        "uni_model_name_or_path": str(stack.uni),
    }


def tiny_training(stack: TinyStack) -> dict:
    from pixcell_ext.stacks.tiny import TINY_RESOLUTION

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


def tiny_generation(stack: TinyStack) -> dict:
    """Defaults of `--preset tiny`: the tiny random stack and its tile folder, a few steps, a few images."""
    return {
        **tiny_models(stack),
        "reference_data_dir": str(stack.data),
        "output_dir": "outputs/tiny-synthetic",
        "num_images_per_class": 4,
        "num_inference_steps": 4,
        "batch_size": 4,
    }


def tiny_evaluation(stack: TinyStack) -> dict[str, Any]:
    """Defaults of ``--preset tiny``: the tiny tiles as real set, a stand-in synthetic set, random tiny encoders."""
    from pixcell_ext.stacks.testing_assets import TINY_TIMM_ENCODER, write_random_timm_encoder, write_standin_synthetic

    root = stack.data.parent
    return {
        "real_dir": str(stack.data),
        "synthetic_dir": str(write_standin_synthetic(stack.data, root / "nct-tiny-standin-synthetic")),
        "output_dir": "outputs/tiny-evaluation",
        "uni_model_name_or_path": str(stack.uni),
        "vae_name_or_path": str(stack.vae),
        "timm_encoder": TINY_TIMM_ENCODER,
        "timm_encoder_weights": str(write_random_timm_encoder(TINY_TIMM_ENCODER, root / "timm-tiny-random")),
        "batch_size": 8,
        "dataloader_num_workers": 0,
        "kid_subsets": 20,
        "matched_draws": 2,
        "bootstrap_replicates": 50,
        "low_data_draws": 1,
    }


def mini_training(stack: MiniStack) -> dict:
    """`train_adapter_lora.py --preset mini`: adapt the SOURCE-pretrained mini PixCell to TARGET in minutes."""
    return {
        **mini_models(stack),
        "train_data_dir": str(stack.target_train),
        "output_dir": "outputs/mini-run",
        "feature_cache": str(Path(stack.target_train).parent / "feature-cache"),
        "resolution": MINI_RESOLUTION,
        "train_batch_size": 32,
        "max_train_steps": 300,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 20,
        "checkpointing_steps": 150,
        "validation_steps": 150,
        "num_validation_inference_steps": 20,
        "validation_guidance_scale": 1.0,  # as mini generation: the panels show what the generated set will hold
        "adapter_hidden_dim": 256,
        "lora_rank": 8,
        "dataloader_num_workers": 0,
    }


def mini_generation(stack: MiniStack) -> dict:
    """`generate_synthetic.py --preset mini`: a class-organised TARGET set from the mini run."""
    return {
        **mini_models(stack),
        "lora_dir": "outputs/mini-run",
        "reference_data_dir": str(stack.target_train),
        "output_dir": "outputs/mini-synthetic",
        "num_images_per_class": 20,
        "num_inference_steps": 20,
        # The adapted mini model's guidance sweep (benchmarks/RESULTS.md, issue 23): scale 1 gives the lowest FD (judge
        # 12.3 at 1, 15.6 at 1.5, 24.9 at 2) and the most useful set; 1.5 the best class fidelity (0.594 against 0.556)
        # but less varied tiles, which turn the low-data gain at one real tile per class from +0.048 to -0.082.
        "guidance_scale": 1.0,
        "batch_size": 30,
    }


def mini_evaluation(stack: MiniStack) -> dict:
    """`evaluate_synthetic.py --preset mini`: the generated set against held-out TARGET tiles, in the encoder's
    space and in the judge's (a classifier trained on TARGET that the generator never saw, read as a timm encoder)."""
    from pixcell_ext.stacks.judge import timm_extractor_arguments

    architecture, weights, options = timm_extractor_arguments(stack.judge)
    return {
        "extractors": ["uni", "timm"],
        "timm_encoder": architecture,
        "timm_encoder_weights": weights,
        "timm_encoder_kwargs": options["model_kwargs"],
        "timm_image_size": options["image_size"],
        "timm_mean": list(options["mean"]),
        "timm_std": list(options["std"]),
        "real_dir": str(stack.target_heldout),
        "real_test_dir": str(stack.target_test),
        "vae_name_or_path": str(stack.vae),  # the VAE floor: target-test tiles through the VAE alone
        "train_data_dir": str(stack.target_train),  # what the adaptation saw: the memorisation check's reference
        "synthetic_dir": "outputs/mini-synthetic",
        "output_dir": "outputs/mini-evaluation",
        "uni_model_name_or_path": str(stack.uni),
        "batch_size": 60,
        "dataloader_num_workers": 0,
        "kid_subsets": 20,
        # target-train holds 40 tiles per class; the question is whether scarce labels gain from the set.
        "low_data_ks": [1, 5, 20],
    }


TRAINING_PRESETS = {"mini": mini_training, "tiny": tiny_training}
GENERATION_PRESETS = {"mini": mini_generation, "tiny": tiny_generation}
EVALUATION_PRESETS = {"mini": mini_evaluation, "tiny": tiny_evaluation}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and every flag's default (also for flags without a help text), once: a help
    text that already says its default ("default: the checkpoint's") gets no second "(default: None)"."""

    def _format_action(self, action: argparse.Action) -> str:
        if action.help is None and action.option_strings and action.default is not argparse.SUPPRESS:
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.help and "default" in action.help.lower():
            return action.help
        return super()._get_help_string(action)


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
        from pixcell_ext.stacks.mini import write_mini_stack

        parser.set_defaults(**presets[known.preset](write_mini_stack(known.mini_dir)))
    elif known.preset is not None:
        from pixcell_ext.stacks.tiny import write_tiny_stack

        stack = write_tiny_stack(known.tiny_dir)
        parser.set_defaults(**presets[known.preset](stack))
    return parser.parse_args(argv)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The frozen models, by hub id or local folder, as every script names them."""
    group = parser.add_argument_group("models")
    group.add_argument("--pretrained_model_name_or_path", default=PIXCELL_256_ID)
    group.add_argument("--revision", default=None)
    group.add_argument("--vae_name_or_path", default=SD35_VAE_ID, help="Folder or hub id holding vae/.")
    group.add_argument("--uni_model_name_or_path", default=UNI2H_ID, help="hf-hub:id, a folder or a file.")


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
