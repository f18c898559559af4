"""Measure a class-organised synthetic set against real tiles: FD, KID, precision/recall, LPIPS, TSTR vs TRTR.

    accelerate launch evaluate_synthetic.py --real_dir NCT-CRC-HE-100K --real_test_dir CRC-VAL-HE-7K \\
        --synthetic_dir synthetic --output_dir evaluation --inception_weights fid_inception.pt \\
        --timm_encoder ARCHITECTURE --timm_encoder_weights encoder.safetensors --lpips_backbone alexnet.pth \\
        --vae_name_or_path stabilityai/stable-diffusion-3.5-large
    python evaluate_synthetic.py --preset tiny      # offline smoke test on random tiny models, under a minute on a CPU

Writes OUTPUT/metrics.json (everything, with warnings and caveats), OUTPUT/per_class_metrics.csv, OUTPUT/plots/,
OUTPUT/vae_floor/ (with --vae_name_or_path: real held-out tiles through the VAE alone, scored like the synthetic set),
OUTPUT/report.html (the same as one page to look at: tiles side by side, verdicts, numbers with intervals) and
OUTPUT/logs/ (the headline numbers with the run's settings for TensorBoard's hparams view).
Features are cached per file content under OUTPUT/feature_cache (or --feature_cache_dir) and reused by later runs.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from pixcell_ext import UNI2H_ID, arguments
from pixcell_ext.console import run_main, setup_logging
from pixcell_ext.stacks import presets

if TYPE_CHECKING:  # the heavy modules are imported where they are used, so that --help answers at once
    from pixcell_ext.evaluation import pipeline

logger = logging.getLogger(__name__)
PRESETS = presets.EVALUATION_PRESETS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = presets.make_parser(__doc__)
    presets.add_preset_arguments(parser, PRESETS)
    group = parser.add_argument_group("data")
    group.add_argument("--real_dir", default=None, help="Real tiles, one folder per class.")
    group.add_argument("--synthetic_dir", default=None, help="Generated tiles, one folder per class (+ manifest.csv).")
    group.add_argument("--real_test_dir", default=None, help="Held-out real tiles (other patients) for the probes.")
    group.add_argument("--classes", nargs="+", default=None, help="Default: the class folders of --synthetic_dir.")
    group.add_argument(
        "--real_test_fraction", type=float, default=0.5, help="Probe test share without --real_test_dir."
    )
    group.add_argument("--skip_bad_images", action="store_true", help="Skip unreadable images instead of failing.")
    group = parser.add_argument_group("feature extractors")
    group.add_argument(
        "--extractors",
        nargs="+",
        choices=["uni", "inception", "timm"],
        default=["uni", "inception", "timm"],
        help="Feature spaces; Inception is skipped with a note when its weights are unavailable, timm needs "
        "--timm_encoder. The colour-histogram probe baseline always runs.",
    )
    group.add_argument("--uni_model_name_or_path", default=UNI2H_ID, help="hf-hub:id, a folder or a file.")
    group.add_argument("--inception_weights", default=None, help="TorchScript FID Inception or torchvision state dict.")
    group.add_argument("--timm_encoder", default=None, help="timm architecture name of an independent encoder.")
    group.add_argument("--timm_encoder_weights", default=None, help="Its weights (.safetensors or torch state dict).")
    group.add_argument("--timm_encoder_kwargs", type=json.loads, default=None, help="e.g. '{\"init_values\": 1e-5}'")
    group.add_argument("--timm_image_size", type=int, default=None, help="Default: timm's input size for the model.")
    group.add_argument("--timm_mean", type=float, nargs=3, default=None, help="Default: timm's, for its own weights.")
    group.add_argument("--timm_std", type=float, nargs=3, default=None, help="Default: timm's, for its own weights.")
    group.add_argument(
        "--train_data_dir",
        default=None,
        help="The generator's training tiles, for the memorisation check (nearest-training-tile distances).",
    )
    group.add_argument(
        "--vae_name_or_path",
        default=None,
        help="The generator's VAE (folder or hub id holding vae/): real held-out tiles are encoded and decoded by it "
        "alone and measured like the synthetic set, the VAE floor a perfect generator would reach. Off without it.",
    )
    group = parser.add_argument_group("metrics")
    group.add_argument("--kid_subsets", type=int, default=100, help="KID subsets, for matched sets over 1000 tiles.")
    group.add_argument("--pr_k", type=int, default=3, help="k of the k-NN manifolds of precision/recall.")
    group.add_argument("--dc_k", type=int, default=5, help="k of the real k-NN balls of density/coverage.")
    group.add_argument("--matched_draws", type=int, default=5, help="Seeded draws of the larger side at matched n.")
    group.add_argument("--jackknife_groups", type=int, default=10, help="Groups per side for the FD/KID intervals.")
    group.add_argument("--half_samples", type=int, default=20, help="Half-samples for the k-NN metric intervals.")
    group.add_argument("--bootstrap_replicates", type=int, default=200, help="Resamples for probe/LPIPS intervals.")
    group.add_argument("--confidence", type=float, default=0.95, help="Level of every interval.")
    group.add_argument("--probe_max_per_class", type=int, default=None, help="Subsample both probe training sets.")
    group.add_argument("--low_data_ks", type=int, nargs="+", default=[10, 50, 100, 500], help="Real tiles per class.")
    group.add_argument("--low_data_draws", type=int, default=5, help="Seeded draws of the k real tiles per k.")
    group.add_argument("--lpips_backbone", default=None, help="torchvision alexnet/vgg16 state dict; no LPIPS without.")
    group.add_argument("--lpips_net", choices=["alex", "vgg"], default="alex")
    group.add_argument("--lpips_resolution", type=int, default=224)
    group.add_argument("--lpips_max_pairs", type=int, default=1000, help="Pairs per class for LPIPS diversity.")
    group = parser.add_argument_group("outputs and speed")
    group.add_argument("--output_dir", default="outputs/evaluation")
    group.add_argument("--feature_cache_dir", default=None, help="Default: OUTPUT/feature_cache.")
    group.add_argument("--batch_size", type=int, default=64, help="Images per extraction batch, per process.")
    group.add_argument("--dataloader_num_workers", type=int, default=2)
    group.add_argument("--plot_max_points", type=int, default=2000, help="Per side, in the PCA projections.")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument(
        "--baseline_metrics",
        default=None,
        help="metrics.json of the same evaluation of a set from the unadapted generator: report.html then says "
        "whether this set is closer to the real tiles.",
    )
    args = presets.parse_with_preset(parser, argv, PRESETS)
    if args.real_dir is None or args.synthetic_dir is None:
        parser.error("Give --real_dir and --synthetic_dir (or --preset tiny).")
    arguments.check_evaluation(vars(args), {flag: parser.get_default(flag) for flag in vars(args)})
    return args


def metric_settings(
    args: argparse.Namespace,
) -> tuple[pipeline.DistributionSettings, pipeline.ProbeSettings, pipeline.LPIPSSettings]:
    from pixcell_ext.evaluation import pipeline

    common = {"confidence": args.confidence, "seed": args.seed}
    return (
        pipeline.DistributionSettings(
            pr_k=args.pr_k,
            dc_k=args.dc_k,
            kid_subsets=args.kid_subsets,
            draws=args.matched_draws,
            groups=args.jackknife_groups,
            half_samples=args.half_samples,
            **common,
        ),
        pipeline.ProbeSettings(
            low_data_ks=tuple(args.low_data_ks),
            draws=args.low_data_draws,
            replicates=args.bootstrap_replicates,
            **common,
        ),
        pipeline.LPIPSSettings(
            max_pairs=args.lpips_max_pairs, batch_size=args.batch_size, replicates=args.bootstrap_replicates, **common
        ),
    )


def tile_sets(args: argparse.Namespace) -> tuple[pipeline.TileSet, ...]:
    """Synthetic, real, real test (or None) and training (or None) tiles, every file checked; the real sets are read
    for the classes of the synthetic one."""
    from pixcell_ext.data import scan_image_folder
    from pixcell_ext.evaluation import pipeline

    def scan(folder: str | None, classes: list[str] | None) -> pipeline.TileSet | None:
        if folder is None:
            return None
        return pipeline.TileSet.from_index(
            scan_image_folder(folder, classes=classes, skip_bad_images=args.skip_bad_images)
        )

    synthetic = scan(args.synthetic_dir, args.classes)
    classes = args.classes or sorted(set(synthetic.labels))
    real, real_test = scan(args.real_dir, classes), scan(args.real_test_dir, classes)
    return synthetic, real, real_test, scan(args.train_data_dir, None)


def main(args: argparse.Namespace) -> None:
    from accelerate import Accelerator

    from pixcell_ext.evaluation import pipeline
    from pixcell_ext.runtime import check_process_group
    from pixcell_ext.training.feature_cache import hash_files
    from pixcell_ext.training.run_directory import disk_full_explained

    accelerator = Accelerator()
    check_process_group(accelerator)
    setup_logging(accelerator.process_index, accelerator.num_processes)
    output_dir = Path(args.output_dir)

    synthetic, real, real_test, training = tile_sets(args)
    classes = args.classes or sorted(set(synthetic.labels))
    tiles, rows = pipeline.arrange_tiles(
        real, synthetic, real_test, test_fraction=args.real_test_fraction, seed=args.seed
    )
    manifest = pipeline.read_references(args.synthetic_dir, args.real_dir)
    logger.info(f"{len(real.paths)} real, {len(synthetic.paths)} synthetic tiles in {classes}")
    extractors, notes = pipeline.select_extractors(
        args.extractors,
        uni_model=args.uni_model_name_or_path,
        inception_weights=args.inception_weights,
        timm_encoder=args.timm_encoder,
        timm_encoder_weights=args.timm_encoder_weights,
        timm_options={
            "image_size": args.timm_image_size,
            "mean": args.timm_mean,
            "std": args.timm_std,
            "model_kwargs": args.timm_encoder_kwargs,
        },
        random_weight_root=args.tiny_dir if args.preset == "tiny" else None,
    )

    digests = hash_files(accelerator, tiles.paths)
    extract = {
        "cache_dir": Path(args.feature_cache_dir or output_dir / "feature_cache"),
        "batch_size": args.batch_size,
        "num_workers": args.dataloader_num_workers,
    }
    with disk_full_explained(extract["cache_dir"], "the feature cache", "--feature_cache_dir", training=False):
        features, skipped = pipeline.extract_features(accelerator, extractors, tiles.paths, digests, **extract)
    for reason in skipped.values():
        logger.warning(reason)
    synthetic_rows = rows["synthetic"]
    jitter = pipeline.jittered_features(accelerator, extractors, skipped, tiles, synthetic_rows, digests, **extract)
    floor = pipeline.vae_floor_features(
        accelerator,
        args.vae_name_or_path,
        extractors,
        skipped,
        tiles,
        rows,
        classes,
        output_dir,
        seed=args.seed,
        **extract,
    )
    space = pipeline.memorisation_extractor(extractors, skipped) if training else None
    training_features = pipeline.training_features(accelerator, space, training, **extract) if space else None
    if not accelerator.is_main_process:
        return  # metrics, LPIPS and plots run on the main process alone

    probe_rows = pipeline.select_probe_rows(tiles, rows, args.probe_max_per_class, args.seed)
    if real_test is None:
        notes.append(pipeline.SAME_PATIENT_SPLIT_NOTE)
    if probe_rows is None:
        notes.append("Probes skipped: the real train, real test and synthetic sets each need at least two classes.")
    warnings = [] if args.classes else pipeline.missing_class_warning(args.real_dir, classes)
    warnings += pipeline.dependence_warnings(tiles, digests, rows, manifest)
    for warning in warnings:
        logger.warning(warning)
    extractor_results, found = pipeline.evaluate_feature_spaces(
        extractors,
        features,
        jitter,
        tiles,
        rows,
        probe_rows,
        classes,
        *metric_settings(args)[:2],
        device=accelerator.device,
    )
    memorisation, memorisation_warnings = pipeline.memorisation_report(
        space,
        features,
        training_features,
        tiles,
        rows,
        digests,
        training,
        output_dir / "plots" / "memorisation_pairs.png",
        confidence=args.confidence,
    )
    vae_floor, floor_notes = pipeline.vae_floor_report(
        args.vae_name_or_path, floor, features, tiles, classes, metric_settings(args)[0], device=accelerator.device
    )
    lpips_section, lpips_notes = pipeline.lpips_report(
        args.lpips_backbone,
        args.lpips_net,
        args.lpips_resolution,
        synthetic,
        real,
        classes,
        manifest,
        metric_settings(args)[2],
        device=accelerator.device,
    )
    notes += pipeline.GENERAL_NOTES + floor_notes + lpips_notes
    notes += [memorisation["skipped"]] if "skipped" in memorisation else []
    provenance = pipeline.synthetic_provenance(args.synthetic_dir)
    notes += pipeline.provenance_notes(provenance, random_encoders=args.preset == "tiny")
    report = {
        "classes": classes,
        "counts": {role: tiles.subset(role_rows).counts(classes) for role, role_rows in rows.items()},
        "synthetic_is_standin": pipeline.is_standin(provenance),
        "probe_split": "--real_test_dir" if real_test else f"--real_dir split per class ({args.real_test_fraction})",
        "extractors": extractor_results,
        "skipped_extractors": skipped,
        "memorisation": memorisation,
        "vae_floor": vae_floor,
        "lpips": lpips_section,
        "warnings": warnings + found + memorisation_warnings,
        "notes": notes,
        "config": vars(args),
    }
    written = write_outputs(args, report, features, tiles, rows, provenance)
    summary = "\n".join([f"Overall, value [{args.confidence:.0%} interval] (n):", *pipeline.summary_lines(report)])
    logger.info(f"{summary}\nWrote {written['json']}, {written['csv']} and {written['html']}")


def write_outputs(args: argparse.Namespace, report: dict, features, tiles, rows, provenance: dict) -> dict[str, Path]:
    """Plots, dataset cards, metrics.json/CSV, report.html and the TensorBoard hparams: one sentence if the disk is
    full (metrics.json is written whole or not at all, so nothing half-done looks like a finished evaluation)."""
    from pixcell_ext.evaluation import pipeline
    from pixcell_ext.evaluation.html_report import render_report
    from pixcell_ext.evaluation.tensorboard_logs import log_evaluation
    from pixcell_ext.training.run_directory import disk_full_explained

    output_dir = Path(args.output_dir)
    with disk_full_explained(output_dir, "the report, plots and dataset cards", "--output_dir", training=False):
        plots = pipeline.write_plots(
            report, features, tiles, rows, output_dir / "plots", max_points=args.plot_max_points, seed=args.seed
        )
        report["plots"] = [str(p.relative_to(output_dir)) for p in plots]
        cards, card_notes = pipeline.write_dataset_card(report, provenance, [Path(args.synthetic_dir), output_dir])
        report["dataset_cards"], report["notes"] = [str(c) for c in cards], report["notes"] + card_notes
        written = pipeline.write_report(output_dir, report)
        baseline = json.loads(Path(args.baseline_metrics).read_text()) if args.baseline_metrics else None
        written["html"] = render_report(report, output_dir, baseline=baseline)
        log_evaluation(report, output_dir)
    return written


if __name__ == "__main__":
    run_main(parse_args, main)
