"""What a training run leaves behind, and loading it back onto a PixCell transformer.

A run directory holds `adapter.safetensors`, `pytorch_lora_weights.safetensors` (PEFT/diffusers key format, the
name diffusers' `load_lora_weights` looks for), `training_config.json` and a model card `README.md`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from safetensors.torch import load_file

from pixcell_ext.adapter import ADAPTER_FILE, UNIAdapter, load_adapter, save_adapter
from pixcell_ext.conditioning import AdaptedPixCell
from pixcell_ext.files import write_json_atomically
from pixcell_ext.lora import LoRAConfig, load_lora, save_lora
from pixcell_ext.models import PixCellTransformer2DModel

LORA_FILE = "pytorch_lora_weights.safetensors"
CONFIG_FILE = "training_config.json"


def save_trained(directory: str | os.PathLike, model: AdaptedPixCell, lora_config: LoRAConfig) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_adapter(model.adapter, directory / ADAPTER_FILE)
    save_lora(model.transformer, lora_config, directory / LORA_FILE)


def read_training_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def load_trained(directory: str | os.PathLike, transformer: PixCellTransformer2DModel) -> AdaptedPixCell:
    """Adapter + LoRA of a run on `transformer`; refuses a run made for another model instead of half-loading it."""
    directory = Path(directory)
    adapter_file, lora_file = directory / ADAPTER_FILE, directory / LORA_FILE
    missing = [p.name for p in (adapter_file, lora_file) if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"'{directory}' is not a training output directory: {', '.join(missing)} missing. Pass the --output_dir "
            "of train_adapter_lora.py (or a checkpoint-N folder inside it)."
        )
    adapter: UNIAdapter = load_adapter(adapter_file)
    expected = transformer.config.caption_channels
    if adapter.config.embed_dim != expected:
        raise ValueError(
            f"The adapter in '{directory}' works on {adapter.config.embed_dim}-d UNI embeddings but the transformer "
            f"expects {expected}: this run was trained for another model."
        )
    load_lora(transformer, lora_file)
    return AdaptedPixCell(transformer, adapter.to(transformer.device))


def load_trained_into(model: AdaptedPixCell, directory: str | os.PathLike) -> None:
    """Restore adapter and LoRA weights of a checkpoint into a model that already has both."""
    directory = Path(directory)
    model.adapter.load_state_dict(load_file(str(directory / ADAPTER_FILE)), strict=True)
    load_lora(model.transformer, directory / LORA_FILE)


def checkpoint_save_hook(accelerator, lora_config: LoRAConfig):
    """Checkpoints hold only what is trained: the 600 M frozen parameters are never written again."""

    def hook(models, weights, output_dir):
        if accelerator.is_main_process:
            save_trained(output_dir, accelerator.unwrap_model(models[0]), lora_config)
        weights.clear()

    return hook


def checkpoint_load_hook(accelerator):
    def hook(models, input_dir):
        load_trained_into(accelerator.unwrap_model(models.pop()), input_dir)

    return hook


def loggable_config(args: argparse.Namespace) -> dict:
    """TensorBoard's hparams accept scalars and strings only."""
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in vars(args).items()}


MODEL_CARD = """---
library_name: diffusers
base_model: {base}
tags: [pathology, histology, pixcell, lora, uni2-h]
---
# PixCell adapter + LoRA: {data}

Adapter (UNI2-h space, {tokens} token(s)) and LoRA (rank {rank}, alpha {alpha}, targets {targets}, blocks {blocks})
trained on `{data}` ({classes}) at {resolution} px for {steps} optimiser updates.

Files: `adapter.safetensors`, `pytorch_lora_weights.safetensors` (PEFT/diffusers key format), `training_config.json`.

```bash
accelerate launch generate_synthetic.py --pretrained_model_name_or_path {base} --lora_dir {output} \\
    --reference_data_dir {data} --output_dir synthetic
```
"""


def write_run_summary(
    directory: Path, args: argparse.Namespace, class_names: list[str], resolution: int, steps: int
) -> None:
    """The resolved configuration (what generation and evaluation read back) and a model card."""
    config = {**vars(args), "class_names": class_names, "resolution": resolution, "trained_steps": steps}
    write_json_atomically(directory / CONFIG_FILE, config)
    card = MODEL_CARD.format(
        base=args.pretrained_model_name_or_path,
        data=args.train_data_dir,
        tokens=args.adapter_tokens,
        rank=args.lora_rank,
        alpha=args.lora_alpha or args.lora_rank,
        targets=", ".join(args.lora_targets),
        blocks=args.lora_blocks,
        classes=", ".join(class_names),
        resolution=resolution,
        steps=steps,
        output=directory,
    )
    (directory / "README.md").write_text(card)
