"""What a training run leaves behind, and loading it back onto a PixCell transformer.

A run directory holds `adapter.safetensors`, `pytorch_lora_weights.safetensors` (PEFT/diffusers key format, the
name diffusers' `load_lora_weights` looks for), `training_config.json` and a model card `README.md`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import load_file

from pixcell_ext.errors import ExplainedError
from pixcell_ext.files import write_json_atomically, write_text_atomically
from pixcell_ext.model.adapter import ADAPTER_FILE, UNIAdapter, load_adapter, save_adapter
from pixcell_ext.model.conditioning import AdaptedPixCell
from pixcell_ext.model.lora import LoRAConfig, alpha_or_rank
from pixcell_ext.model.lora_files import load_lora, reporting_damage, save_lora
from pixcell_ext.model.networks import PixCellTransformer2DModel

LORA_FILE = "pytorch_lora_weights.safetensors"
CONFIG_FILE = "training_config.json"
MODEL_CARD_FILE = "README.md"
# Complete checkpoints and the partial folders of interrupted saves (see checkpoints.py).
CHECKPOINT_NAME = re.compile(r"^(checkpoint-\d+|\.checkpoint-\d+\.partial)$")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


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
    with reporting_damage(directory / ADAPTER_FILE):
        state_dict = load_file(str(directory / ADAPTER_FILE))
    model.adapter.load_state_dict(state_dict, strict=True)
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


def loggable_config(config: dict) -> dict:
    """TensorBoard's hparams accept scalars and strings only."""
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in config.items()}


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


def write_run_summary(directory: Path, config: dict) -> None:
    """The resolved configuration (what generation and evaluation read back) and a model card.

    `config` is the run's flags plus `class_names`, `resolution` and `trained_steps`."""
    directory = Path(directory)
    write_json_atomically(directory / CONFIG_FILE, config)
    card = MODEL_CARD.format(
        base=config["pretrained_model_name_or_path"],
        data=config.get("train_data_dir") or config.get("dataset_name"),
        tokens=config["adapter_tokens"],
        rank=config["lora_rank"],
        alpha=alpha_or_rank(config["lora_alpha"], config["lora_rank"]),
        targets=", ".join(config["lora_targets"]),
        blocks=config["lora_blocks"],
        classes=", ".join(config["class_names"]),
        resolution=config["resolution"],
        steps=config["trained_steps"],
        output=directory,
    )
    write_text_atomically(directory / MODEL_CARD_FILE, card)


class RunDirectoryError(ValueError, ExplainedError):
    """The output folder cannot take this run: used by another run, not writable, or full."""


def check_writable(directory: Path) -> None:
    """Fail in a second, before any model loads, rather than at the first checkpoint an hour later."""
    probe = Path(directory) / f".write-probe-{os.getpid()}"
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise RunDirectoryError(
            f"Cannot write to --output_dir '{directory}' ({error.strerror or error}). Choose a folder you can write "
            "to, or fix its permissions (a read-only mount, or a path under a file, is not usable)."
        ) from error


def run_outputs(directory: Path, logging_dir: str) -> list[Path]:
    """Everything a training run writes into its output folder, and nothing else (not a cache or exported data)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    names = [ADAPTER_FILE, LORA_FILE, CONFIG_FILE, MODEL_CARD_FILE, "validation", logging_dir]
    found = [directory / name for name in names if (directory / name).exists()]
    return found + sorted(p for p in directory.iterdir() if CHECKPOINT_NAME.match(p.name))


def claim_output_dir(directory: Path, *, resuming: bool, overwrite: bool, logging_dir: str, is_main: bool) -> None:
    """A new run must not mix with another run's checkpoints or weights: `latest` would resume the old run and the
    old weights would be written under the new configuration. Refused unless told to resume or to overwrite."""
    directory = Path(directory)
    outputs = run_outputs(directory, logging_dir)
    used = [p.name for p in outputs if p.name in (ADAPTER_FILE, LORA_FILE) or p.name.startswith("checkpoint-")]
    if used and not resuming and not overwrite:
        raise RunDirectoryError(
            f"--output_dir '{directory}' already holds another run ({', '.join(used[:4])}"
            f"{', ...' if len(used) > 4 else ''}). Continue it with --resume_from_checkpoint latest, start over "
            "with --overwrite (deletes its checkpoints, weights, config, model card, validation panels and logs), "
            "or choose another --output_dir."
        )
    if overwrite and is_main:
        for path in outputs:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()


FULL_DISK_FREE_BYTES = 1 << 20
"""Below this much free space, a failed write is taken for a full disk even when the writer did not say so
(`torch.save`, which accelerate uses for the optimiser state, reports it as an unrelated-looking RuntimeError)."""


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _disk_full(error: Exception, directory: Path) -> bool:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    try:
        return shutil.disk_usage(directory).free < FULL_DISK_FREE_BYTES
    except OSError:
        return False


@contextmanager
def disk_full_explained(directory: Path, what: str, flag: str = "--output_dir", *, training: bool = True):
    """A full disk is the common failure of long runs' saves; say so in one sentence naming the folder and what
    the rerun starts from (for a training run, the last complete checkpoint), instead of showing a traceback."""
    try:
        yield
    except Exception as error:
        if not _disk_full(error, directory):
            raise
        last = complete_checkpoints(directory) if training else []
        if not training:
            then = "Free some space and run the same command again: it keeps what is complete."
        elif last:
            then = (
                f"The last complete checkpoint, {last[-1].name}, is intact: free some space, then resubmit the same "
                "command with --resume_from_checkpoint latest."
            )
        else:
            then = "No checkpoint was complete yet: free some space and start the run again."
        full = f"The disk holding {flag} '{directory}' is full: {what} could not be written."
        raise RunDirectoryError(f"{full} {then}") from error
