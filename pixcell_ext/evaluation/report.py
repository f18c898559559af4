"""The evaluation report on disk: ``metrics.json`` (everything, with warnings and notes) and a per-class CSV."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from pixcell_ext.files import write_text_atomically
from pixcell_ext.generation.manifest import DATASET_CARD_FILE

OVERALL = "overall"


DISTRIBUTION_METRICS = ("fd", "kid", "precision", "recall", "density", "coverage")
PROBES = ("TSTR", "TRTR", "TRTR_full", "TSTR_colour_jitter")
LPIPS_KEYS = ("generated_pairs", "real_pairs", "generated_to_reference")
CSV_COLUMNS = [
    "extractor",
    "class",
    "n",
    "n_real_available",
    "n_synthetic_available",
    "dim",
    *[f"{m}{part}" for m in DISTRIBUTION_METRICS for part in ("", "_low", "_high")],
    *[f"{p.lower()}_recall" for p in PROBES],
    *[f"{p.lower()}_balanced_accuracy{part}" for p in PROBES for part in ("", "_low", "_high")],
    *[f"lpips_{k}" for k in LPIPS_KEYS],
]


def csv_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (extractor, class), the pooled ``overall`` row last for each extractor.

    Each distribution metric is a value with its interval; class rows carry each probe's recall of the class, the
    overall row each probe's balanced accuracy with its interval. LPIPS does not depend on the extractor and is
    repeated on each extractor's rows. Empty cells: not computed.
    """
    lpips_results = report["lpips"].get("per_class", {})
    rows = []
    for name, result in report["extractors"].items():
        probe = result["probe"] or {}
        for cls in [*report["classes"], OVERALL]:
            row: dict[str, Any] = {"extractor": name, "class": cls}
            group = result.get("distribution", {}).get(cls)
            if group:
                row.update({k: group[k] for k in ("n", "n_real_available", "n_synthetic_available", "dim")})
                for metric in DISTRIBUTION_METRICS:
                    entry = group[metric]
                    row.update({metric: entry["value"], f"{metric}_low": entry["low"], f"{metric}_high": entry["high"]})
            for side, scores in probe.items():
                if cls == OVERALL:
                    ci = scores["balanced_accuracy_ci"]
                    prefix = f"{side.lower()}_balanced_accuracy"
                    row[prefix], row[f"{prefix}_low"], row[f"{prefix}_high"] = ci["value"], ci["low"], ci["high"]
                else:
                    row[f"{side.lower()}_recall"] = scores["per_class_recall"].get(cls)
            lp = lpips_results.get(cls, {})
            for key in LPIPS_KEYS:
                row[f"lpips_{key}"] = lp.get(key, {}).get("value")
            rows.append(row)
    return rows


def low_data_text(curve: dict[str, Any]) -> str:
    """Balanced accuracy with k real tiles per class, then with the synthetic set added, for every k."""
    return "; ".join(
        f"k={p['k']}: {_interval(p['real'])} -> {_interval(p['real_plus_synthetic'])}" for p in curve["points"]
    )


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The headline numbers as ``value [low, high] (n)`` lines for the console: pooled metrics and probes per space."""
    lines = []
    for name, entry in report["extractors"].items():
        overall = entry.get("distribution", {}).get(OVERALL)
        cells = [f"{m} {_interval(overall[m])}" for m in DISTRIBUTION_METRICS] if overall else []
        probe = entry.get("probe") or {}
        cells += [f"{side} {_interval(scores['balanced_accuracy_ci'])}" for side, scores in probe.items()]
        lines.append(f"{name}: " + "; ".join(cells))
        floor = ((report.get("vae_floor") or {}).get("extractors") or {}).get(name, {}).get(OVERALL)
        if floor:
            lines.append(f"{name} VAE floor: " + "; ".join(f"{m} {_interval(floor[m])}" for m in DISTRIBUTION_METRICS))
        if entry.get("low_data"):
            lines.append(f"{name} low data: {low_data_text(entry['low_data'])}")
    memorisation = report.get("memorisation") or {}
    if "possible_copies" in memorisation:
        lines.append(
            f"memorisation ({memorisation['feature_space']}): possible copies "
            f"{_interval(memorisation['possible_copies'])}, flagged {memorisation['flagged']}"
        )
    return lines


def write_report(output_dir: str | os.PathLike, report: dict[str, Any]) -> dict[str, Path]:
    """Write ``metrics.json``, ``per_class_metrics.csv`` and the plots; returns their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": output_dir / "metrics.json", "csv": output_dir / "per_class_metrics.csv"}
    write_text_atomically(paths["json"], json.dumps(report, indent=2, allow_nan=False) + "\n")
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, restval="")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in csv_rows(report))
    write_text_atomically(paths["csv"], buffer.getvalue())
    return paths


LICENCE_CAVEAT = (
    "This set was generated by PixCell conditioned on UNI2-h embeddings. UNI2-h's terms of use (see its model card) "
    "restrict commercial use of models trained on UNI outputs and of datasets created from UNI; a set like this one "
    "likely falls under them. PixCell, the SD3.5 VAE and the source tiles have their own licences. Check all of them "
    "before any use beyond non-commercial research."
)


def _interval(entry: dict[str, Any] | None, digits: int = 3) -> str:
    if not entry or entry.get("value") is None:
        return "n/a"
    if entry.get("low") is None:
        return f"{entry['value']:.{digits}g} (n={entry['n']})"
    return f"{entry['value']:.{digits}g} [{entry['low']:.{digits}g}, {entry['high']:.{digits}g}] (n={entry['n']})"


def dataset_card(report: dict[str, Any], provenance: dict[str, Any]) -> str:
    """A Markdown card for a synthetic set: how it was made, what it measured (with intervals), its licence caveat."""
    sources = provenance.get("sources", {})
    made = {
        "generator": provenance.get("generator", "generate_synthetic.py (adapted PixCell)"),
        "model": sources.get("pretrained_model_name_or_path"),
        "LoRA": sources.get("lora_dir"),
        "LoRA sha256": provenance.get("lora_sha256"),
        "guidance scale": provenance.get("guidance_scale"),
        "inference steps": provenance.get("num_inference_steps"),
        "scheduler": provenance.get("scheduler"),
        "seed": provenance.get("seed"),
        "reference tiles": sources.get("reference_data_dir"),
    }
    lines = ["# Synthetic dataset card", "", "## How it was made", ""]
    if not provenance:
        lines.append("No generation_config.json beside the images: how they were made is not recorded.")
    lines += [f"- {key}: `{value}`" for key, value in made.items() if value is not None]
    counts = report["counts"]["synthetic"]
    lines += ["", f"Classes and images: {', '.join(f'{c} {n}' for c, n in counts.items())}.", ""]
    lines += ["## Metrics (value [95 % interval] (n)); see metrics.json for every number", ""]
    header = ["feature space", "FD", "KID", "precision", "recall", "density", "coverage", "TSTR", "TRTR", "TRTR (all)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in report["extractors"].items():
        overall = entry.get("distribution", {}).get(OVERALL, {})
        probe = entry.get("probe") or {}
        cells = [_interval(overall.get(m)) for m in DISTRIBUTION_METRICS]
        cells += [_interval(probe.get(p, {}).get("balanced_accuracy_ci")) for p in ("TSTR", "TRTR", "TRTR_full")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    curves = [(name, e["low_data"]) for name, e in report["extractors"].items() if e.get("low_data")]
    if curves:
        lines += ["", "Low-data use (balanced accuracy with k real tiles per class -> with this set added):", ""]
        lines += [f"- {name}: {low_data_text(curve)}" for name, curve in curves]
    memorisation = report.get("memorisation") or {}
    if "possible_copies" in memorisation:
        lines += [
            "",
            f"Memorisation ({memorisation['feature_space']} space): possible copies of training tiles "
            f"{_interval(memorisation['possible_copies'])}, {memorisation['expected_by_chance']:.1%} expected by "
            f"chance (thresholds per class at about the 1 % quantile of held-out tiles' distances); exact p-value "
            f"{memorisation['p_value']:.2g} (Beta-Binomial, which accounts for the thresholds being estimated); "
            f"flagged: {memorisation['flagged']}.",
        ]
    if report.get("synthetic_is_standin"):
        lines += ["", "This is a STAND-IN set (not generated images): its numbers say nothing about a model."]
    lines += ["", "## Licence", "", LICENCE_CAVEAT, ""]
    return "\n".join(lines)


def write_dataset_card(
    report: dict[str, Any], provenance: dict[str, Any], folders: list[Path], name: str = DATASET_CARD_FILE
) -> tuple[list[Path], list[str]]:
    """Write the card into each folder (the synthetic set, the evaluation output); a folder that refuses is noted."""
    text, written, notes = dataset_card(report, provenance), [], []
    for folder in folders:
        try:
            write_text_atomically(Path(folder) / name, text)
            written.append(Path(folder) / name)
        except OSError as error:
            notes.append(f"Dataset card not written to '{folder}': {error}.")
    return written, notes
