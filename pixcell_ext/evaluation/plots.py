"""The evaluation plots: per-class FD/KID bars, probe bars and a real-vs-synthetic PCA projection per space."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pixcell_ext.evaluation.feature_store import TileSet
from pixcell_ext.files import write_bytes_atomically

OVERALL = "overall"


def _save_figure(figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    write_bytes_atomically(path, buffer.getvalue())


PLOT_LABELS = {"fd": "Fréchet distance", "kid": "KID", "density": "density", "coverage": "coverage"}


def _errors(entries: list[dict[str, Any]]) -> np.ndarray:
    """Asymmetric error bars (value - low, high - value); zero where there is no interval."""
    low = [0.0 if e["low"] is None or e["value"] is None else e["value"] - e["low"] for e in entries]
    high = [0.0 if e["high"] is None or e["value"] is None else e["high"] - e["value"] for e in entries]
    return np.array([low, high])


def plot_per_class_bars(report: dict[str, Any], metric: str, path: Path) -> Path | None:
    """One panel per feature space: ``metric`` per class and pooled, with intervals; hatched: n < 2 d (FD)."""
    from matplotlib.figure import Figure

    spaces = {k: v["distribution"] for k, v in report["extractors"].items() if v.get("distribution")}
    if not spaces:
        return None
    names = [*report["classes"], OVERALL]
    figure = Figure(figsize=(max(6.0, 0.7 * len(names) + 2), 2.8 * len(spaces)))
    axes = figure.subplots(len(spaces), 1, squeeze=False)[:, 0]
    for ax, (space, results) in zip(axes, spaces.items(), strict=True):
        entries = [results[n][metric] for n in names]
        heights = [np.nan if e["value"] is None else e["value"] for e in entries]  # nan: no bar
        bars = ax.bar(names, heights, yerr=_errors(entries), color="tab:blue", capsize=2)
        for bar, n in zip(bars, names, strict=True):
            if metric == "fd" and results[n]["n"] < 2 * results[n]["dim"]:
                bar.set_hatch("//")
                bar.set_alpha(0.6)
        bars[-1].set_color("tab:gray")
        flag = " (RANDOM WEIGHTS: smoke test only)" if report["extractors"][space]["random_weights"] else ""
        ax.set_title(f"{PLOT_LABELS[metric]} per class at matched n, 95 % intervals, {space}{flag}", fontsize=9)
        ax.tick_params(axis="x", labelsize=8, rotation=45)
    if metric == "fd":
        axes[0].text(
            0.99, 0.95, "hatched: n < 2 d (biased)", transform=axes[0].transAxes, ha="right", va="top", fontsize=7
        )
    figure.tight_layout()
    _save_figure(figure, path)
    return path


PROBE_COLOURS = {"TSTR": "tab:orange", "TSTR_colour_jitter": "tab:red", "TRTR": "tab:blue", "TRTR_full": "tab:gray"}


def plot_probe(report: dict[str, Any], path: Path) -> Path | None:
    """Balanced accuracy with intervals of every probe per feature space, the colour-histogram baseline included."""
    from matplotlib.figure import Figure

    probes = {k: v["probe"] for k, v in report["extractors"].items() if v.get("probe")}
    if not probes:
        return None
    figure = Figure(figsize=(max(5.0, 1.8 * len(probes) + 2), 3.4))
    ax = figure.subplots()
    x = np.arange(len(probes))
    sides = [s for s in PROBE_COLOURS if any(s in p for p in probes.values())]
    width = 0.8 / len(sides)
    for i, side in enumerate(sides):
        entries = [p[side]["balanced_accuracy_ci"] for p in probes.values()]
        offset = (i - (len(sides) - 1) / 2) * width
        heights = [e["value"] for e in entries]
        ax.bar(x + offset, heights, width, yerr=_errors(entries), label=side, color=PROBE_COLOURS[side], capsize=2)
    ax.set_xticks(x, list(probes), fontsize=8, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("balanced accuracy (real test)")
    ax.legend(fontsize=7)
    ax.set_title("Linear probes: TSTR vs TRTR at equal counts; TRTR_full = every real tile (ceiling)", fontsize=9)
    figure.tight_layout()
    _save_figure(figure, path)
    return path


def plot_low_data(report: dict[str, Any], path: Path) -> Path | None:
    """Balanced accuracy vs k real tiles per class, with and without the synthetic set, one panel per space."""
    from matplotlib.figure import Figure

    curves = {k: v["low_data"] for k, v in report["extractors"].items() if v.get("low_data")}
    if not curves:
        return None
    figure = Figure(figsize=(3.2 * len(curves) + 1, 3.2))
    axes = figure.subplots(1, len(curves), squeeze=False)[0]
    for ax, (space, curve) in zip(axes, curves.items(), strict=True):
        ks = [p["k"] for p in curve["points"]]
        for key, label, colour in (
            ("real", "real only", "tab:blue"),
            ("real_plus_synthetic", "+ synthetic", "tab:orange"),
        ):
            entries = [p[key] for p in curve["points"]]
            ax.errorbar(
                ks,
                [e["value"] for e in entries],
                yerr=_errors(entries),
                marker="o",
                label=label,
                color=colour,
                capsize=2,
            )
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_xlabel("real tiles per class (k)")
        ax.set_title(space, fontsize=9)
    axes[0].set_ylabel("balanced accuracy (real test)")
    axes[0].legend(fontsize=7)
    figure.suptitle("Low-data use: does the synthetic set help a probe with k real tiles per class?", fontsize=9)
    figure.tight_layout()
    _save_figure(figure, path)
    return path


def plot_projection(
    real: np.ndarray,
    real_labels: Sequence[str],
    synthetic: np.ndarray,
    synthetic_labels: Sequence[str],
    classes: Sequence[str],
    title: str,
    path: Path,
    *,
    max_points: int,
    seed: int,
) -> Path:
    """2-D PCA (fitted on both sets) of real (dots) and synthetic (crosses) features, coloured by class."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    keep_real = np.sort(rng.permutation(len(real))[:max_points])
    keep_syn = np.sort(rng.permutation(len(synthetic))[:max_points])
    real, synthetic = real[keep_real], synthetic[keep_syn]
    real_labels, synthetic_labels = np.asarray(real_labels)[keep_real], np.asarray(synthetic_labels)[keep_syn]
    pca = PCA(n_components=2, svd_solver="full").fit(np.concatenate([real, synthetic]).astype(np.float64))
    real_2d, syn_2d = pca.transform(real), pca.transform(synthetic)
    colours = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    figure = Figure(figsize=(6.4, 5.2))
    ax = figure.subplots()
    for i, name in enumerate(classes):
        colour = colours(i % colours.N)
        ax.scatter(*real_2d[real_labels == name].T, s=14, marker="o", color=colour, alpha=0.6, label=f"{name} real")
        ax.scatter(*syn_2d[synthetic_labels == name].T, s=22, marker="x", color=colour, label=f"{name} synthetic")
    ratio = pca.explained_variance_ratio_
    ax.set_xlabel(f"PC1 ({ratio[0]:.0%})")
    ax.set_ylabel(f"PC2 ({ratio[1]:.0%})")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    _save_figure(figure, path)
    return path


def write_plots(
    report: dict[str, Any],
    features: dict[str, np.ndarray],
    tiles: TileSet,
    distribution_rows: dict[str, Sequence[int]],
    plot_dir: Path,
    *,
    max_points: int,
    seed: int,
) -> list[Path]:
    """Per-class FD, KID and coverage bars, probe bars, the low-data curve, and a PCA projection per feature space."""
    written = [
        plot_per_class_bars(report, "fd", plot_dir / "fd_per_class.png"),
        plot_per_class_bars(report, "kid", plot_dir / "kid_per_class.png"),
        plot_per_class_bars(report, "coverage", plot_dir / "coverage_per_class.png"),
        plot_probe(report, plot_dir / "probe.png"),
        plot_low_data(report, plot_dir / "low_data.png"),
    ]
    real, syn = list(distribution_rows["real"]), list(distribution_rows["synthetic"])
    for name, entry in report["extractors"].items():
        if "distribution" not in entry:
            continue
        flag = " - RANDOM WEIGHTS, smoke test only" if entry["random_weights"] else ""
        slug = entry["cache_id"].rsplit("-", 1)[0]
        written.append(
            plot_projection(
                features[name][real],
                [tiles.labels[i] for i in real],
                features[name][syn],
                [tiles.labels[i] for i in syn],
                report["classes"],
                f"PCA of {name} features: real (o) vs synthetic (x){flag}",
                plot_dir / f"projection_{slug}.png",
                max_points=max_points,
                seed=seed,
            )
        )
    return [p for p in written if p is not None]
