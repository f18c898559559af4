"""The evaluation report on disk: ``metrics.json`` (everything, with warnings and notes) and a per-class CSV."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from pixcell_ext.files import write_text_atomically

OVERALL = "overall"


CSV_COLUMNS = [
    "extractor",
    "class",
    "n_real",
    "n_synthetic",
    "dim",
    "fd",
    "fd_warning",
    "kid_mean",
    "kid_std",
    "kid_subset_size",
    "precision",
    "recall",
    "tstr_recall",
    "trtr_recall",
    "tstr_balanced_accuracy",
    "trtr_balanced_accuracy",
    "tstr_macro_f1",
    "trtr_macro_f1",
    "lpips_diversity",
    "lpips_fidelity",
]


def csv_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (extractor, class), the pooled ``overall`` row last for each extractor.

    Class rows carry the class's TSTR/TRTR recall, the overall row the balanced accuracy and macro-F1. LPIPS does not
    depend on the extractor and is repeated on each extractor's rows. Empty cells: not computed.
    """
    lpips_results = report["lpips"].get("per_class", {})
    rows = []
    for name, result in report["extractors"].items():
        probe = result["probe"] or {}
        for cls in [*report["classes"], OVERALL]:
            row: dict[str, Any] = {"extractor": name, "class": cls}
            row.update({k: v for k, v in result.get("distribution", {}).get(cls, {}).items() if k in CSV_COLUMNS})
            if "fd" in row:
                row["fd_warning"] = bool(row["fd_warning"])
            for side, scores in probe.items():
                if cls == OVERALL:
                    row[f"{side.lower()}_balanced_accuracy"] = scores["balanced_accuracy"]
                    row[f"{side.lower()}_macro_f1"] = scores["macro_f1"]
                else:
                    row[f"{side.lower()}_recall"] = scores["per_class_recall"].get(cls)
            lp = lpips_results.get(cls, {})
            row["lpips_diversity"], row["lpips_fidelity"] = lp.get("diversity_mean"), lp.get("fidelity_mean")
            rows.append(row)
    return rows


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
