"""``report.html``: the evaluation as one page to look at, rendered from ``metrics.json`` and the image files.

A researcher judges a synthetic set with their eyes first, so the page shows real and generated tiles of each class
side by side (with the reference each was conditioned on), then the numbers with intervals and one line on how to
read each. It is one self-contained file (thumbnails and plots embedded as data URIs, inline CSS, no script), so it
can be mailed or archived without its folders. Every section degrades to a visible note when its data is missing:
an evaluation that skipped a part is still a report, not a template error.
"""

from __future__ import annotations

import base64
import io
from dataclasses import asdict
from pathlib import Path
from typing import Any

import jinja2
from PIL import Image

from pixcell_ext.data import ImageFolderIndex, load_tile, scan_image_folder
from pixcell_ext.evaluation.pipeline import synthetic_provenance
from pixcell_ext.evaluation.report import DISTRIBUTION_METRICS, LICENCE_CAVEAT, LPIPS_KEYS, OVERALL, PROBES
from pixcell_ext.evaluation.vae_floor import FLOOR_FOLDER
from pixcell_ext.evaluation.verdicts import fmt, low_data_gain, verdicts
from pixcell_ext.files import write_text_atomically
from pixcell_ext.generation.manifest import read_references

REPORT_FILE = "report.html"
TEMPLATE_DIR = Path(__file__).parent / "templates"

METRIC_GUIDE = {
    "fd": (
        "FD",
        "lower is closer",
        "Fréchet distance between Gaussian fits of the two feature sets; rises with "
        "any shift of mean or spread, and is biased upwards at small n: compare only at equal n and space.",
    ),
    "kid": (
        "KID",
        "lower is closer",
        "Kernel distance, unbiased at small n; about 0 (slightly negative is "
        "possible) when both sets come from one distribution. It says how far, not in which way.",
    ),
    "precision": (
        "precision",
        "higher is more faithful",
        "Share of generated tiles inside the real tiles' k-NN manifold: fidelity. An outlying real tile inflates it.",
    ),
    "recall": (
        "recall",
        "higher reaches further",
        "Share of real tiles inside the generated manifold: how much of the real variety the set reaches.",
    ),
    "density": (
        "density",
        "about 1 is faithful",
        "Precision's robust twin on real k-NN balls only; above 1 means generated tiles crowd into dense real regions.",
    ),
    "coverage": (
        "coverage",
        "higher reaches further",
        "Share of real k-NN balls holding at least one generated tile: recall that ignores outlying generated tiles.",
    ),
}
PROBE_GUIDE = {
    "TSTR": "a linear probe trained on synthetic tiles, tested on held-out real ones",
    "TRTR": "the same probe trained on as many real tiles: the set is as useful as real data when TSTR reaches it",
    "TRTR_full": "trained on every real training tile: the ceiling",
    "TSTR_colour_jitter": "TSTR on colour-jittered synthetic tiles: what survives once class colours are scrambled",
}
LPIPS_GUIDE = {
    "generated_pairs": "between two generated tiles of the class: their diversity",
    "real_pairs": "between two real tiles of the class: the diversity to match",
    "generated_to_reference": "between a generated tile and its reference: near the real-pair value is normal",
}
PLOTS = {
    "low_data": "low_data.png",
    "probe": "probe.png",
    "memorisation": "memorisation_pairs.png",
    "fd": "fd_per_class.png",
    "kid": "kid_per_class.png",
    "coverage": "coverage_per_class.png",
}


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def thumbnail(path: Path, size: int) -> str:
    """A tile as a small embedded JPEG (the page stays light: 8 tiles x 3 rows x classes)."""
    buffer = io.BytesIO()
    Image.fromarray(load_tile(path, size).permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=90)
    return data_uri(buffer.getvalue(), "image/jpeg")


def embedded_plots(output_dir: Path) -> dict[str, str]:
    """The evaluation's plots that exist, embedded; projections are found by their file name pattern."""
    folder = output_dir / "plots"
    found = {key: folder / name for key, name in PLOTS.items()}
    found.update({p.stem: p for p in sorted(folder.glob("projection_*.png"))})
    return {key: data_uri(path.read_bytes(), "image/png") for key, path in found.items() if path.is_file()}


def class_tiles(
    classes: list[str], real_dir: str | None, synthetic_dir: str | None, count: int, size: int
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Per class: real, generated and reference thumbnails, and notes on what could not be shown."""
    notes, manifest = [], None
    real_index, synthetic_index = _index(real_dir, classes), _index(synthetic_dir, classes)
    if synthetic_index is None:
        notes.append(f"The synthetic folder ({synthetic_dir}) is not readable here: no generated tiles shown.")
    else:
        manifest = read_references(synthetic_dir, real_dir or synthetic_dir)
        if manifest is None:
            notes.append(
                "No manifest.csv beside the synthetic tiles: the reference each was generated from is unknown."
            )
    if real_index is None:
        notes.append(f"The real folder ({real_dir}) is not readable here: no real tiles shown.")
    tiles = {}
    for name in classes:
        real = _class_paths(real_index, name)[:count]
        generated = _class_paths(synthetic_index, name)[:count]
        entry: dict[str, Any] = {"real": [thumbnail(p, size) for p in real], "notes": [], "references": []}
        entry["generated"] = [thumbnail(p, size) for p in generated]
        if manifest is not None and generated:
            references = [manifest.references.get(p.resolve()) for p in generated]
            if not any(references):
                entry["notes"].append("No reference tiles for this class: generated without one (see manifest.csv).")
            entry["references"] = [thumbnail(r, size) if r else None for r in references]
        for role, paths in (("real", real), ("generated", generated)):
            if not paths:
                entry["notes"].append(f"No {role} tiles of this class were found.")
        tiles[name] = entry
    return tiles, notes


def _index(folder: str | None, classes: list[str]) -> ImageFolderIndex | None:
    if not folder or not Path(folder).is_dir():
        return None
    return scan_image_folder(folder, classes=classes, allow_missing_classes=True, verify=False)


def _class_paths(index: ImageFolderIndex | None, name: str) -> list[Path]:
    if index is None or name not in index.class_names:
        return []
    label = index.class_names.index(name)
    return [r.path for r in index.records if r.label == label]


def distribution_rows(distribution: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Cells of ``value [low, high]`` that wrap, if the page is narrow, only between the value and its interval."""
    return {
        group: {
            "n": values.get("n"),
            **{m: fmt(values.get(m)).replace(", ", ",\u00a0") for m in DISTRIBUTION_METRICS},
        }
        for group, values in distribution.items()
    }


def feature_spaces(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Per feature space: the overall and per-class distribution rows (and the VAE floor's), the probes and the
    low-data points."""
    spaces = []
    floors = (metrics.get("vae_floor") or {}).get("extractors") or {}
    for name, entry in (metrics.get("extractors") or {}).items():
        distribution = entry.get("distribution") or {}
        probe = entry.get("probe") or {}
        points = (entry.get("low_data") or {}).get("points") or []
        spaces.append(
            {
                "name": name,
                "description": entry.get("description", ""),
                "random_weights": bool(entry.get("random_weights")),
                "distribution": distribution_rows(distribution),
                "floor": distribution_rows(floors.get(name) or {}),
                "probe": [
                    {
                        "name": side,
                        "guide": PROBE_GUIDE.get(side, ""),
                        "value": fmt(probe[side]["balanced_accuracy_ci"]),
                        "n": probe[side]["balanced_accuracy_ci"].get("n"),
                    }
                    for side in [*PROBES, *sorted(set(probe) - set(PROBES))]
                    if side in probe
                ],
                "low_data": [
                    {
                        "k": p["k"],
                        "real": fmt(p["real"]),
                        "plus": fmt(p["real_plus_synthetic"]),
                        "gain": fmt(low_data_gain(p)),
                    }
                    for p in points
                ],
            }
        )
    return spaces


def provenance(synthetic_dir: str | None) -> list[tuple[str, Any]]:
    """How the set was made, from its generation_config.json ([] when there is none)."""
    config = synthetic_provenance(synthetic_dir) if synthetic_dir else {}
    if not config:
        return []
    sources = config.get("sources") or {}
    per_class = config.get("images_per_class") or {}
    items = [
        ("generator", config.get("generator", "generate_synthetic.py (adapted PixCell)")),
        ("model", sources.get("pretrained_model_name_or_path")),
        ("VAE", sources.get("vae_name_or_path")),
        ("UNI encoder", sources.get("uni_model_name_or_path")),
        ("LoRA folder", sources.get("lora_dir")),
        ("LoRA sha256", config.get("lora_sha256")),
        ("sampler", config.get("scheduler")),
        ("inference steps", config.get("num_inference_steps")),
        ("guidance scale", config.get("guidance_scale")),
        ("seed", config.get("seed")),
        ("precision", config.get("dtype")),
        ("reference tiles", sources.get("reference_data_dir")),
        ("images per class", ", ".join(f"{name} {count}" for name, count in per_class.items()) or None),
    ]
    return [(key, value) for key, value in items if value is not None]


KNOWN_FIELDS = {
    "classes",
    "counts",
    "synthetic_is_standin",
    "probe_split",
    "extractors",
    "skipped_extractors",
    "memorisation",
    "vae_floor",
    "lpips",
    "warnings",
    "notes",
    "config",
    "plots",
    "dataset_cards",
}


def report_context(
    metrics: dict[str, Any], output_dir: Path, *, baseline: dict[str, Any] | None, count: int, size: int
) -> dict[str, Any]:
    config = metrics.get("config") or {}
    classes = list(metrics.get("classes") or [])
    tiles, tile_notes = class_tiles(classes, config.get("real_dir"), config.get("synthetic_dir"), count, size)
    floor_index = _index(str(output_dir / FLOOR_FOLDER), classes) if metrics.get("vae_floor") else None
    for name in classes:
        tiles[name]["round_trips"] = [thumbnail(p, size) for p in _class_paths(floor_index, name)[:count]]
    memorisation = metrics.get("memorisation") or {}
    lpips = metrics.get("lpips") or {}
    plots = embedded_plots(output_dir)
    return {
        "verdicts": [asdict(v) for v in verdicts(metrics, baseline)],
        "standin": bool(metrics.get("synthetic_is_standin")),
        "warnings": list(metrics.get("warnings") or []),
        "notes": list(metrics.get("notes") or []),
        "tile_notes": tile_notes,
        "classes": classes,
        "overall": OVERALL,
        "tiles": tiles,
        "counts": metrics.get("counts") or {},
        "spaces": feature_spaces(metrics),
        "floor_note": (metrics.get("vae_floor") or {}).get("note"),
        "skipped": dict(metrics.get("skipped_extractors") or {}),
        "metrics": DISTRIBUTION_METRICS,
        "guide": METRIC_GUIDE,
        "probe_split": metrics.get("probe_split"),
        "memorisation": {
            "skipped": memorisation.get("skipped") if "possible_copies" not in memorisation else None,
            "rows": [
                ("possible copies", fmt(memorisation.get("possible_copies"), percent=True)),
                ("expected by chance", memorisation.get("expected_by_chance")),
                ("p-value", memorisation.get("p_value")),
                ("flagged", memorisation.get("flagged")),
                ("feature space", memorisation.get("feature_space")),
                (
                    "median distance, generated / held-out",
                    (memorisation.get("generated_median_distance"), memorisation.get("held_out_median_distance")),
                ),
                ("training / held-out tiles", (memorisation.get("n_training"), memorisation.get("n_held_out"))),
            ],
        },
        "lpips": {
            "skipped": lpips.get("skipped") or (None if lpips.get("per_class") else "LPIPS was not computed."),
            "guide": LPIPS_GUIDE,
            "columns": LPIPS_KEYS,
            "rows": {
                name: {k: fmt(v.get(k)) for k in LPIPS_KEYS} for name, v in (lpips.get("per_class") or {}).items()
            },
            "net": lpips.get("net"),
        },
        "plots": plots,
        "projection_keys": [key for key in plots if key not in PLOTS],
        "provenance": provenance(config.get("synthetic_dir")),
        "licence": LICENCE_CAVEAT,
        "extra_fields": sorted(set(metrics) - KNOWN_FIELDS),
    }


def render_report(
    metrics: dict[str, Any],
    output_dir: str | Path,
    *,
    baseline: dict[str, Any] | None = None,
    thumbnails_per_class: int = 8,
    thumbnail_size: int = 96,
) -> Path:
    """Write ``output_dir/report.html`` from a metrics.json dict (and the tiles and plots it points to)."""
    output_dir = Path(output_dir)
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=True, undefined=jinja2.StrictUndefined
    )
    context = report_context(metrics, output_dir, baseline=baseline, count=thumbnails_per_class, size=thumbnail_size)
    html = environment.get_template("report.html.j2").render(**context)
    path = output_dir / REPORT_FILE
    write_text_atomically(path, html)
    return path
