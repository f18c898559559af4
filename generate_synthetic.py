"""Generate a class-organised synthetic dataset with PixCell-256 adapted by train_adapter_lora.py.

Each generated tile is conditioned on the UNI2-h embedding of a real reference tile of its class (a class without
reference tiles is generated from its class embedding for a run trained with --class_conditioning, and otherwise
refused unless --allow_unconditional asks for the adapted unconditional embedding).
Output: OUT/<CLASS>/gen_0000.png ...,
OUT/manifest.csv, the same rows as OUT/metadata.jsonl (what `datasets`' imagefolder reads), OUT/generation_config.json
and a hidden contact sheet per class, OUT/.contact_sheet_<CLASS>.png.
Images are byte-identical for any number of processes and resume points (on CPUs: at equal threads per
process); a rerun completes an interrupted run, --overwrite starts afresh.

    accelerate launch generate_synthetic.py --lora_dir outputs/pixcell-adapter-lora \\
        --reference_data_dir NCT-CRC-HE-100K --output_dir synthetic --num_images_per_class 500
    python generate_synthetic.py --preset tiny          # offline, random tiny models, seconds on a CPU
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from pixcell_ext import SAMPLER_NAMES, arguments
from pixcell_ext.console import EVERY_PROCESS, progress_bar, run_main, setup_logging
from pixcell_ext.stacks import presets

if TYPE_CHECKING:  # the heavy modules are imported where they are used, so that --help answers at once
    from pixcell_ext.generation import run_config

logger = logging.getLogger(__name__)
PRESETS = presets.GENERATION_PRESETS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = presets.make_parser(__doc__)
    presets.add_preset_arguments(parser, PRESETS)
    presets.add_model_arguments(parser)
    group = parser.add_argument_group("trained weights and precision")
    group.add_argument("--lora_dir", default=None, help="Output of train_adapter_lora.py; default: base PixCell.")
    group.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    group = parser.add_argument_group("data")
    group.add_argument("--reference_data_dir", default=None, help="One folder of real tiles per class.")
    group.add_argument("--classes", nargs="+", default=None, help="Generate these classes; default: every folder.")
    group.add_argument("--skip_bad_images", action="store_true", help="Skip unreadable reference tiles.")
    group.add_argument(
        "--allow_unconditional",
        action="store_true",
        help="Generate a class without reference tiles unconditionally (refused otherwise, unless the run was "
        "trained with --class_conditioning, which generates it from its class embedding).",
    )
    group = parser.add_argument_group("sampling")
    group.add_argument("--num_images_per_class", type=int, default=50)
    group.add_argument("--guidance_scale", type=float, default=2.0)
    group.add_argument("--num_inference_steps", type=int, default=20)
    group.add_argument("--scheduler", choices=SAMPLER_NAMES, default="dpm")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--batch_size", type=int, default=8, help="Images per forward, per process.")
    group.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks.")
    group = parser.add_argument_group("outputs")
    group.add_argument("--output_dir", default=None)
    group.add_argument("--overwrite", action="store_true", help="Delete previously generated images, regenerate.")
    args = presets.parse_with_preset(parser, argv, PRESETS)
    if args.reference_data_dir is None or args.output_dir is None:
        parser.error("--reference_data_dir and --output_dir are required (or --preset tiny).")
    arguments.check_generation(vars(args), {flag: parser.get_default(flag) for flag in vars(args)})
    return args


def generation_settings(args: argparse.Namespace) -> run_config.GenerationSettings:
    from pixcell_ext.generation import run_config

    return run_config.GenerationSettings(
        pretrained_model_name_or_path=args.pretrained_model_name_or_path,
        revision=args.revision,
        vae_name_or_path=args.vae_name_or_path,
        uni_model_name_or_path=args.uni_model_name_or_path,
        lora_dir=args.lora_dir,
        reference_data_dir=args.reference_data_dir,
        seed=args.seed,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.num_inference_steps,
        scheduler=args.scheduler,
    )


def main(args: argparse.Namespace) -> None:
    from accelerate import Accelerator

    from pixcell_ext.files import write_png_atomically
    from pixcell_ext.generation import manifest, pipeline, run_config, work_list
    from pixcell_ext.model import networks
    from pixcell_ext.model.compilation import compile_transformer
    from pixcell_ext.runtime import check_process_group, weight_dtype
    from pixcell_ext.training.run_directory import disk_full_explained

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    check_process_group(accelerator)
    setup_logging(accelerator.process_index, accelerator.num_processes)
    output_dir = Path(args.output_dir)

    # Everything that can refuse the run is checked before the models load.
    pipeline.check_lora_dir(args.lora_dir)
    classes = list(dict.fromkeys(args.classes or work_list.default_classes(args.reference_data_dir)))
    wanted = dict.fromkeys(classes, args.num_images_per_class)
    existing = None if args.overwrite else run_config.existing_config(output_dir)
    extent = run_config.merged_extent(existing, wanted)
    files = work_list.class_files(args.reference_data_dir, list(extent))
    dtype = weight_dtype(accelerator)
    config = run_config.generation_config(generation_settings(args), dtype=dtype, files=files, images_per_class=extent)
    if not args.overwrite:
        run_config.check_output_dir(output_dir, existing, config)
    references = {
        name: work_list.choose_references(
            paths, extent[name], seed=args.seed, class_name=name, skip_bad_images=args.skip_bad_images
        )
        for name, paths in files.items()
    }
    run_config.check_classes(
        {name: references[name] for name in classes},
        run_config.trained_class_names(args.lora_dir),
        args.reference_data_dir,
        allow_unconditional=args.allow_unconditional,
    )

    stack = networks.load_pixcell_stack(
        args.pretrained_model_name_or_path,
        args.vae_name_or_path,
        args.uni_model_name_or_path,
        dtype=dtype,
        device=accelerator.device,
        revision=args.revision,
    )
    model = pipeline.load_generation_model(stack.transformer, args.lora_dir, args.pretrained_model_name_or_path)
    if args.compile:
        compile_transformer(stack.transformer)
    resolution = stack.transformer.config.sample_size * networks.vae_scale_factor(stack.vae)

    accelerator.wait_for_everyone()  # nobody reads the directory's old state after this point
    if accelerator.is_main_process:
        with disk_full_explained(output_dir, "the generation config", "--output_dir", training=False):
            if args.overwrite:
                run_config.clear_generated(output_dir)
            run_config.remove_half_written_images(output_dir)
            run_config.write_generation_config(output_dir, {**config, "resolution": resolution})
            for name in classes:
                (output_dir / name).mkdir(exist_ok=True)
    accelerator.wait_for_everyone()

    everything = work_list.work_items(references, extent, args.seed)
    this_run = [item for item in everything if item.index < wanted.get(item.class_name, 0)]
    pending = work_list.unfinished(this_run, output_dir)
    accelerator.wait_for_everyone()  # every process has listed the same unfinished images before anyone writes
    mine = pending[accelerator.process_index :: accelerator.num_processes]
    EVERY_PROCESS.info(
        f"{len(this_run)} images in {len(classes)} classes, {len(this_run) - len(pending)} already made; process "
        f"{accelerator.process_index + 1}/{accelerator.num_processes} makes {len(mine)} on {accelerator.device}."
    )
    settings = pipeline.SamplingSettings(args.guidance_scale, args.num_inference_steps, args.scheduler, args.batch_size)
    for name, batches in work_list.class_batches(mine, args.batch_size):
        progress = progress_bar(sum(map(len, batches)), name, enabled=accelerator.is_main_process)
        for batch in batches:
            images = pipeline.generate_batch(model, stack.uni, stack.vae, stack.scheduler_config, batch, settings)
            with disk_full_explained(output_dir, f"the {name} images", "--output_dir", training=False):
                for item, image in zip(batch, images, strict=True):
                    write_png_atomically(output_dir / item.file, image)
            progress.update(len(batch))
        progress.close()
        logger.info(f"{name}: {sum(map(len, batches))} images made by this process")

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        rows = manifest.manifest_rows(output_dir, everything, config)
        with disk_full_explained(output_dir, "the manifest and contact sheets", "--output_dir", training=False):
            manifest.write_manifest(output_dir, rows)
            for name in extent:
                pipeline.write_contact_sheet(
                    output_dir, name, [i for i in everything if i.class_name == name], resolution
                )
        logger.info(
            f"{len(rows)} images listed in {output_dir / manifest.MANIFEST_FILE}; contact sheets: "
            f"{output_dir}/.contact_sheet_<CLASS>.png"
        )
    accelerator.end_training()


if __name__ == "__main__":
    run_main(parse_args, main)
