"""An evaluation's headline numbers in TensorBoard's hparams view, beside the settings that produced them.

Training already logs its own hyper-parameters (``accelerator.init_trackers(..., config=...)``) and validation panels;
what the hparams view lacks is the outcome. Each evaluation writes one hparams session into ``OUTPUT/logs``: the
training run's configuration (found through the synthetic set's ``generation_config.json`` -> ``lora_dir``), the
generation settings, and the overall metrics. ``tensorboard --logdir`` over several evaluation folders then compares
runs in one table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pixcell_ext.evaluation.pipeline import synthetic_provenance
from pixcell_ext.evaluation.report import DISTRIBUTION_METRICS, OVERALL
from pixcell_ext.training.run_directory import loggable_config, read_training_config

LOGS_DIR = "logs"
GENERATION_KEYS = ("guidance_scale", "num_inference_steps", "scheduler", "seed", "lora_sha256", "dtype")


def run_hparams(synthetic_dir: str | Path) -> dict[str, Any]:
    """Generation settings (``generation/...``) and, when its LoRA folder is readable, training's (``training/...``)."""
    config = synthetic_provenance(synthetic_dir)
    hparams = {f"generation/{key}": config[key] for key in GENERATION_KEYS if config.get(key) is not None}
    lora_dir = (config.get("sources") or {}).get("lora_dir")
    if lora_dir:
        hparams["generation/lora_dir"] = lora_dir
        hparams.update({f"training/{key}": value for key, value in read_training_config(lora_dir).items()})
    return loggable_config({k: v for k, v in hparams.items() if v is not None})


def headline_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Overall distribution metrics and probe balanced accuracies per space, and the share of possible copies."""
    found = {}
    for space, entry in (metrics.get("extractors") or {}).items():
        overall = (entry.get("distribution") or {}).get(OVERALL) or {}
        for metric in DISTRIBUTION_METRICS:
            found[f"{space}/{metric}"] = (overall.get(metric) or {}).get("value")
        for side, scores in (entry.get("probe") or {}).items():
            found[f"{space}/{side}"] = scores["balanced_accuracy_ci"]["value"]
    found["memorisation/possible_copies"] = ((metrics.get("memorisation") or {}).get("possible_copies") or {}).get(
        "value"
    )
    return {key: float(value) for key, value in found.items() if value is not None}


def log_evaluation(metrics: dict[str, Any], output_dir: str | Path) -> Path:
    """Write one hparams session (settings + headline numbers) under ``output_dir/logs``; returns that folder."""
    from torch.utils.tensorboard import SummaryWriter

    log_dir = Path(output_dir) / LOGS_DIR
    for stale in log_dir.glob("events.out.tfevents.*"):  # a rerun's session replaces the last one, not beside it
        stale.unlink()
    hparams = run_hparams((metrics.get("config") or {}).get("synthetic_dir") or "")
    with SummaryWriter(log_dir=str(log_dir)) as writer:
        writer.add_hparams(
            hparams or {"generation/unknown": "no generation_config.json"}, headline_metrics(metrics), run_name="."
        )
    return log_dir
