"""Adapt PixCell-256 to a class-folder histology dataset: a UNI2-h -> PixCell adapter plus LoRA in the transformer.

accelerate launch train_adapter_lora.py --train_data_dir NCT-CRC-HE-100K --output_dir runs/nct
python train_adapter_lora.py --preset mini          # offline: adapt the trained mini stack to a toy domain
python train_adapter_lora.py --preset tiny          # offline, random tiny models, a minute on a CPU
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from pixcell_ext import arguments
from pixcell_ext.console import progress_bar, run_main, setup_logging
from pixcell_ext.model.lora_targets import DEFAULT_TARGET_MODULES
from pixcell_ext.stacks import presets

if TYPE_CHECKING:  # the heavy modules are imported where they are used, so that --help answers at once
    import torch
    from accelerate import Accelerator

    from pixcell_ext import data
    from pixcell_ext.model import networks
    from pixcell_ext.model.adapter import AdapterConfig
    from pixcell_ext.model.lora import LoRAConfig
    from pixcell_ext.training import checkpoints, loop

logger = logging.getLogger(__name__)
PRESETS = presets.TRAINING_PRESETS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = presets.make_parser(__doc__)
    presets.add_preset_arguments(parser, PRESETS)
    presets.add_model_arguments(parser)
    group = parser.add_argument_group("data")
    group.add_argument("--train_data_dir", default=None, help="One folder per class (.tif/.png/.jpg).")
    group.add_argument(
        "--dataset_name", default=None, help="A hub dataset (or a save_to_disk folder) with image and label columns."
    )
    group.add_argument("--dataset_split", default="train")
    group.add_argument("--image_column", default="image")
    group.add_argument("--label_column", default="label")
    group.add_argument("--classes", nargs="+", default=None, help="Train on these class folders only.")
    group.add_argument("--resolution", type=int, default=None, help="VAE input size; default: the checkpoint's.")
    group.add_argument("--class_balanced", action="store_true", help="Sample every class equally often.")
    group.add_argument("--augment", action="store_true", help="Random dihedral flips/rotations (on-the-fly only).")
    group.add_argument("--skip_bad_images", action="store_true", help="Skip unreadable images instead of failing.")
    group.add_argument("--feature_cache", default=None, help="Cache VAE/UNI2-h features here and train from it.")
    group.add_argument("--dataloader_num_workers", type=int, default=2)
    group = parser.add_argument_group("adapter and LoRA")
    group.add_argument("--adapter_tokens", type=int, default=1)
    group.add_argument("--adapter_hidden_dim", type=int, default=1024)
    group.add_argument("--lora_rank", type=int, default=16)
    group.add_argument("--lora_alpha", type=float, default=None, help="Default: the rank (scale 1).")
    group.add_argument("--lora_targets", nargs="+", default=list(DEFAULT_TARGET_MODULES))
    group.add_argument("--lora_blocks", default="all", help="Transformer blocks with LoRA, e.g. 'all', '0-13'.")
    group.add_argument("--lora_dropout", type=float, default=0.0)
    group.add_argument("--use_rslora", action="store_true")
    group.add_argument(
        "--lora_block_ranks",
        default=None,
        help="Per-block ranks overriding --lora_rank, e.g. '0-13=16,14-27=4' (see README: which blocks to target).",
    )
    group = parser.add_argument_group("class-aware adaptation")
    group.add_argument(
        "--class_loss_weight", type=float, default=0.0, help="Weight of a class head's cross-entropy on the context."
    )
    group.add_argument(
        "--class_conditioning", action="store_true", help="Add a learned class embedding (zero at start) to context."
    )
    group.add_argument(
        "--reference_dropout",
        type=float,
        default=0.1,
        help="With --class_conditioning: probability of keeping the class but dropping the reference tile, which "
        "teaches class-only generation.",
    )
    group = parser.add_argument_group("optimisation")
    group.add_argument("--train_batch_size", type=int, default=16, help="Per process.")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--num_train_epochs", type=int, default=1)
    group.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help="Optimiser updates (at least 1); overrides --num_train_epochs.",
    )
    group.add_argument("--learning_rate", type=float, default=1e-4)
    group.add_argument("--lr_scheduler", default="constant_with_warmup")
    group.add_argument("--lr_warmup_steps", type=int, default=100, help="In optimiser updates.")
    group.add_argument("--adam_beta1", type=float, default=0.9)
    group.add_argument("--adam_beta2", type=float, default=0.999)
    group.add_argument("--adam_weight_decay", type=float, default=1e-2)
    group.add_argument("--adam_epsilon", type=float, default=1e-8)
    group.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit.")
    group.add_argument("--max_grad_norm", type=float, default=1.0)
    group.add_argument("--cond_dropout", type=float, default=0.1, help="Probability of the null condition.")
    group.add_argument("--snr_gamma", type=float, default=None, help="min-SNR-gamma weighting, e.g. 5.0.")
    group.add_argument("--max_bad_steps", type=int, default=10, help="Stop after this many non-finite in a row.")
    group = parser.add_argument_group("speed and memory")
    group.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    group.add_argument("--gradient_checkpointing", action="store_true")
    group.add_argument("--enable_vae_slicing", action="store_true")
    group.add_argument("--enable_vae_tiling", action="store_true")
    group.add_argument("--allow_tf32", action="store_true")
    group.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks.")
    group = parser.add_argument_group("outputs")
    group.add_argument("--output_dir", default="outputs/pixcell-adapter-lora")
    group.add_argument("--logging_dir", default="logs", help="Under --output_dir.")
    group.add_argument("--report_to", default="tensorboard")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--checkpointing_steps", type=int, default=500)
    group.add_argument("--checkpoints_total_limit", type=int, default=None)
    group.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder.")
    group.add_argument(
        "--allow_other_data",
        action="store_true",
        help="Resume on data other than the checkpoint's (refused otherwise); training_config.json records both.",
    )
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="Start a new run in an --output_dir that holds another run, deleting what that run wrote.",
    )
    group.add_argument("--validation_steps", type=int, default=500)
    group.add_argument("--num_validation_inference_steps", type=int, default=20)
    group.add_argument("--validation_guidance_scale", type=float, default=2.0)
    args = presets.parse_with_preset(parser, argv, PRESETS)
    if args.dataset_name and args.train_data_dir == parser.get_default("train_data_dir"):
        args.train_data_dir = None  # a dataset replaces the preset's folder
    if (args.train_data_dir is None) == (args.dataset_name is None):
        parser.error("Give exactly one of --train_data_dir or --dataset_name (or --preset tiny).")
    if args.augment and args.feature_cache:
        parser.error(
            "--augment cannot be combined with --feature_cache: cached features are of the unrotated tile. "
            "Drop --augment, or train on the fly without --feature_cache."
        )
    if args.overwrite and args.resume_from_checkpoint:
        parser.error("--overwrite starts a new run and --resume_from_checkpoint continues one: give one of them.")
    arguments.check_training(vars(args), {flag: parser.get_default(flag) for flag in vars(args)})
    return args


def main(args: argparse.Namespace) -> None:
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from pixcell_ext import data
    from pixcell_ext.model import networks
    from pixcell_ext.model.compilation import compile_transformer
    from pixcell_ext.runtime import apply_gradient_clipping_to_deepspeed, check_replicas_identical
    from pixcell_ext.training import checkpoints, loop, run_directory

    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(args, output_dir)

    # Output folder, checkpoint and data first: a mistake should fail in seconds, not after loading 1.3 B parameters.
    run_directory.check_writable(output_dir)
    run_directory.claim_output_dir(
        output_dir,
        resuming=bool(args.resume_from_checkpoint),
        overwrite=args.overwrite,
        logging_dir=args.logging_dir,
        is_main=accelerator.is_main_process,
    )
    accelerator.wait_for_everyone()
    checkpoint = checkpoints.resolve_checkpoint(output_dir, args.resume_from_checkpoint)
    index, digests = load_index(args, accelerator)
    run_config = {
        **vars(args),
        "class_names": index.class_names,
        "data_sha256": data.content_fingerprint(index, digests),
    }
    updates_per_epoch = checkpoints.updates_per_epoch(
        len(index.records), args.train_batch_size, accelerator.num_processes, args.gradient_accumulation_steps
    )
    max_train_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    if checkpoint is not None:
        checkpoints.check_resumable(checkpoint, vars(args))
        run_config["earlier_data"] = checkpoints.earlier_data(checkpoint, run_config, args.allow_other_data)
        if finish_if_complete(accelerator, checkpoint, output_dir, max_train_steps):
            return

    # Frozen models, the adapted model, its data, optimiser and schedule.
    stack, resolution = load_frozen_models(args, accelerator)
    set_seed(args.seed)  # the initial LoRA/adapter weights must not depend on which models were built before
    lora_config, adapter_config = model_configs(args, stack.transformer.config, index.class_names)
    model = loop.build_adapted_model(
        stack.transformer, lora_config, adapter_config, gradient_checkpointing=args.gradient_checkpointing
    )
    if args.compile:
        compile_transformer(stack.transformer)
    trainable = loop.trainable_parameters(model)
    dataset = training_dataset(args, accelerator, index, digests, resolution)
    noise_scheduler = networks.training_scheduler(stack.scheduler_config)
    train_dataloader = training_dataloader(args, dataset, index, stack, resolution, noise_scheduler)
    optimizer = loop.make_optimizer(
        trainable,
        use_8bit=args.use_8bit_adam,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    apply_gradient_clipping_to_deepspeed(accelerator, args.max_grad_norm)
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    # Stepped once per optimiser update, so warm-up and decay are in updates for any number of processes.
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=max_train_steps
    )
    accelerator.register_for_checkpointing(lr_scheduler)
    accelerator.register_save_state_pre_hook(run_directory.checkpoint_save_hook(accelerator, lora_config))
    accelerator.register_load_state_pre_hook(run_directory.checkpoint_load_hook(accelerator))
    modules = loop.TrainingModules(model, trainable, optimizer, lr_scheduler, noise_scheduler, stack.vae, stack.uni)
    validate = validation_panels(args, accelerator, index, dataset, stack, resolution)
    run_config["resolution"] = resolution

    progress = checkpoints.load_checkpoint(accelerator, checkpoint)
    if accelerator.is_main_process:
        with run_directory.disk_full_explained(output_dir, "the TensorBoard logs"):
            accelerator.init_trackers("pixcell_adapter_lora", config=run_directory.loggable_config(run_config))
    num_epochs = math.ceil(max_train_steps / updates_per_epoch)
    log_plan(args, accelerator, model, checkpoint, progress, (max_train_steps, num_epochs, updates_per_epoch))
    train_loop(
        args, accelerator, modules, train_dataloader, validate, progress, (max_train_steps, num_epochs), run_config
    )

    check_replicas_identical(accelerator, trainable)
    logger.info(f"Trainable weights are bit-identical on all {accelerator.num_processes} process(es)")
    if accelerator.is_main_process:
        with run_directory.disk_full_explained(output_dir, "the final weights"):
            run_directory.save_trained(output_dir, accelerator.unwrap_model(model), lora_config)
            run_directory.write_run_summary(output_dir, {**run_config, "trained_steps": progress.global_step})
        logger.info(f"Wrote adapter, LoRA, config and model card to {output_dir}")
    with run_directory.disk_full_explained(output_dir, "the TensorBoard logs"):
        accelerator.end_training()


def train_loop(
    args: argparse.Namespace,
    accelerator: Accelerator,
    modules: loop.TrainingModules,
    train_dataloader,
    validate,
    progress: checkpoints.TrainingProgress,
    schedule: tuple[int, int],
    run_config: dict,
) -> None:
    """Updates until the last of `schedule` (max_train_steps, num_epochs), from where `progress` says the run
    stopped; checkpoints and panels on the way. A full disk stops it with the sentence naming the last complete
    checkpoint."""
    from pixcell_ext.runtime import RunStopped, too_many_bad_steps_message
    from pixcell_ext.training import checkpoints, loop, run_directory

    output_dir, model, (max_train_steps, num_epochs) = Path(args.output_dir), modules.model, schedule
    step_config = loop.StepConfig(args.max_grad_norm, args.snr_gamma, args.class_loss_weight, args.augment)
    bar = progress_bar(
        max_train_steps, "steps", enabled=accelerator.is_local_main_process, initial=progress.global_step
    )
    bad_steps = 0
    for epoch in range(progress.epoch, num_epochs):
        # Through the prepared loader: it calls set_epoch with its own counter at every pass (0 in a resumed process),
        # and `skip_first_batches` copies that counter, so setting the sampler directly would be overridden.
        train_dataloader.set_epoch(epoch)
        model.train()
        skip = progress.batches_in_epoch if epoch == progress.epoch else 0
        batches = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        progress.epoch, progress.batches_in_epoch = epoch, skip
        for batch in batches:
            progress.batches_in_epoch += 1
            stats = loop.train_step(accelerator, modules, batch, step_config)
            if not stats.updated:
                continue
            progress.global_step += 1
            bar.update(1)
            bad_steps = bad_steps + 1 if stats.skipped else 0
            if stats.skipped:
                progress.skipped_steps += 1
                logger.warning(f"Non-finite loss at step {progress.global_step}: update skipped ({bad_steps})")
            if bad_steps >= args.max_bad_steps:
                raise RunStopped(
                    too_many_bad_steps_message(bad_steps, args.max_bad_steps, args.learning_rate, args.max_grad_norm)
                )
            logs = {**stats.terms, "lr": modules.lr_scheduler.get_last_lr()[0], "skipped_steps": progress.skipped_steps}
            bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")  # non-finite shows as nan
            with run_directory.disk_full_explained(output_dir, "the TensorBoard logs"):
                accelerator.log(logs, step=progress.global_step)

            last = progress.global_step == max_train_steps
            if progress.global_step % args.checkpointing_steps == 0 or last:
                saved = checkpoints.save_checkpoint(
                    accelerator, output_dir, progress, args.checkpoints_total_limit, run_config
                )
                logger.info(
                    f"Saved {saved}: update {progress.global_step} of {max_train_steps}, loss {logs['loss']:.4f}"
                )
            if progress.global_step % args.validation_steps == 0 or last:
                validate(model, progress.global_step)
            if progress.global_step >= max_train_steps:
                break
        if progress.global_step >= max_train_steps:
            break
    bar.close()


def make_accelerator(args: argparse.Namespace, output_dir: Path) -> Accelerator:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from pixcell_ext.runtime import check_process_group

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    check_process_group(accelerator)
    setup_logging(accelerator.process_index, accelerator.num_processes)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def load_index(args: argparse.Namespace, accelerator: Accelerator) -> tuple[data.ImageFolderIndex, list[str]]:
    """Every image checked and hashed before any model loads: bad files are named, copies warned about."""
    from pixcell_ext import data

    if args.dataset_name:
        index = data.load_hub_dataset(
            args.dataset_name,
            split=args.dataset_split,
            image_column=args.image_column,
            label_column=args.label_column,
            classes=args.classes,
            skip_bad_images=args.skip_bad_images,
            accelerator=accelerator,
        )
    else:
        index = data.scan_image_folder(
            args.train_data_dir, classes=args.classes, skip_bad_images=args.skip_bad_images, accelerator=accelerator
        )
    logger.info(f"Data: {len(index.records)} tiles in {len(index.class_names)} classes {index.counts()}")
    if index.skipped:
        logger.warning(f"Skipped {len(index.skipped)} unusable images (listed above).")
    digests = data.tile_digests(index, accelerator)
    copies = data.duplicate_tiles(index, digests)
    if copies:
        logger.warning(
            f"{sum(len(c) - 1 for c in copies)} tile(s) repeat the bytes of another, e.g. "
            f"{' = '.join(map(str, copies[0][:3]))}: each copy is trained on again (and copies filed under two classes "
            "contradict each other). Remove the copies unless the repetition is intended."
        )
    return index, digests


def finish_if_complete(accelerator: Accelerator, checkpoint: Path, output_dir: Path, max_train_steps: int) -> bool:
    """A resubmitted run that already made its last update trains nothing (not step N+1): it only writes the final
    outputs a kill after the last checkpoint left missing."""
    from pixcell_ext.training import checkpoints

    done = checkpoints.read_progress(checkpoint).global_step
    if done < max_train_steps:
        return False
    written = checkpoints.finish_from_checkpoint(checkpoint, output_dir) if accelerator.is_main_process else []
    accelerator.wait_for_everyone()
    logger.info(
        f"The run in {output_dir} is complete: {checkpoint.name} holds {done} of {max_train_steps} updates, so "
        "nothing is trained" + (f"; wrote {', '.join(written)} from it." if written else ".")
    )
    return True


def load_frozen_models(args: argparse.Namespace, accelerator: Accelerator) -> tuple[networks.PixCellStack, int]:
    """PixCell, the VAE (decoder only when training from the cache) and UNI2-h (not at all then), in the compute
    dtype of the mixed-precision mode; and the tile resolution."""
    from pixcell_ext.model import networks
    from pixcell_ext.runtime import weight_dtype

    dtype, use_cache = weight_dtype(accelerator), args.feature_cache is not None
    stack = networks.load_pixcell_stack(
        args.pretrained_model_name_or_path,
        args.vae_name_or_path,
        args.uni_model_name_or_path,
        dtype=dtype,
        device=accelerator.device,
        with_uni=not use_cache,
        vae_decoder_only=use_cache,
        revision=args.revision,
    )
    resolution = args.resolution or stack.transformer.config.sample_size * networks.vae_scale_factor(stack.vae)
    if args.enable_vae_slicing:
        stack.vae.enable_slicing()
    if args.enable_vae_tiling:
        stack.vae.enable_tiling()
    logger.info(
        f"Loaded PixCell from {args.pretrained_model_name_or_path}, VAE from {args.vae_name_or_path}"
        + ("" if use_cache else f", UNI2-h from {args.uni_model_name_or_path}")
        + f"; frozen models in {dtype}, resolution {resolution} px"
    )
    return stack, resolution


def model_configs(
    args: argparse.Namespace, transformer_config, class_names: list[str]
) -> tuple[LoRAConfig, AdapterConfig]:
    """The LoRA and adapter configurations the flags describe."""
    from pixcell_ext.model.adapter import AdapterConfig
    from pixcell_ext.model.lora import LoRAConfig, alpha_or_rank
    from pixcell_ext.model.lora_targets import block_rank_pattern, parse_block_spec

    num_layers = transformer_config.num_layers
    lora_config = LoRAConfig(
        rank=args.lora_rank,
        alpha=alpha_or_rank(args.lora_alpha, args.lora_rank),
        target_modules=tuple(args.lora_targets),
        blocks=None if args.lora_blocks == "all" else parse_block_spec(args.lora_blocks, num_layers),
        rank_pattern=block_rank_pattern(args.lora_block_ranks, num_layers),
        dropout=args.lora_dropout,
        use_rslora=args.use_rslora,
    )
    adapter_config = AdapterConfig(
        transformer_config.caption_channels,
        args.adapter_tokens,
        args.adapter_hidden_dim,
        class_names=tuple(class_names) if args.class_conditioning or args.class_loss_weight > 0 else (),
        class_conditioning=args.class_conditioning,
        class_head=args.class_loss_weight > 0,
    )
    return lora_config, adapter_config


def training_dataset(args: argparse.Namespace, accelerator: Accelerator, index, digests: list[str], resolution: int):
    """Tiles decoded on the fly, or their cached VAE/UNI2-h features (the cache is filled first where incomplete)."""
    from pixcell_ext import data
    from pixcell_ext.model import networks
    from pixcell_ext.runtime import weight_dtype
    from pixcell_ext.training import feature_cache

    if args.feature_cache is None:
        return data.TileDataset(index, resolution)
    dtype, cache = weight_dtype(accelerator), feature_cache.FeatureCache(args.feature_cache)
    keys = feature_cache.build_feature_cache(
        accelerator,
        index,
        digests,
        cache,
        vae_identity=feature_cache.model_identity(args.vae_name_or_path),
        uni_identity=feature_cache.model_identity(args.uni_model_name_or_path),
        resolution=resolution,
        load_encoders=lambda: (
            networks.load_vae(args.vae_name_or_path, dtype=dtype).to(accelerator.device),
            networks.load_uni(args.uni_model_name_or_path, dtype=dtype).to(accelerator.device),
        ),
        batch_size=args.train_batch_size,
        num_workers=args.dataloader_num_workers,
        dtype=dtype,
    )
    return feature_cache.CachedFeatureDataset(index, keys, cache)


def training_dataloader(args: argparse.Namespace, dataset, index, stack, resolution: int, noise_scheduler):
    """Each sample carries its step randomness, drawn in the loader workers from (seed, epoch, index)."""
    from pixcell_ext.training import loop

    spec = loop.step_randomness_spec(
        stack.transformer,
        stack.vae,
        noise_scheduler,
        resolution,
        seed=args.seed,
        cond_dropout=args.cond_dropout,
        reference_dropout=args.reference_dropout if args.class_conditioning else 0.0,
    )
    return loop.training_dataloader(
        dataset,
        [r.label for r in index.records],
        spec,
        batch_size=args.train_batch_size,
        class_balanced=args.class_balanced,
        num_workers=args.dataloader_num_workers,
    )


def validation_panels(args: argparse.Namespace, accelerator: Accelerator, index, dataset, stack, resolution: int):
    """`validate(model, step)`: a panel of one reference tile per class beside what the model makes from it."""
    import torch

    from pixcell_ext.training import validation

    ids = validation.first_tile_per_class(index)
    embeddings = validation.reference_embeddings(dataset, ids, stack.uni, accelerator.device)
    references = validation.reference_tiles(index, ids, resolution)
    labels = torch.tensor([index.records[i].label for i in ids])
    names = [index.class_names[index.records[i].label] for i in ids]

    def validate(model: torch.nn.Module, step: int) -> None:
        model.eval()
        validation.run(
            accelerator,
            accelerator.unwrap_model(model),
            stack.vae,
            stack.scheduler_config,
            embeddings,
            labels,
            references,
            names,
            Path(args.output_dir) / "validation" / f"step-{step:06d}.png",
            step=step,
            seed=args.seed,
            guidance_scale=args.validation_guidance_scale,
            num_inference_steps=args.num_validation_inference_steps,
        )
        model.train()

    return validate


def log_plan(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model: torch.nn.Module,
    checkpoint: Path | None,
    progress: checkpoints.TrainingProgress,
    schedule: tuple[int, int, int],
) -> None:
    """What will be trained, in words: `schedule` is (updates, epochs, updates per epoch)."""
    from pixcell_ext.model.lora import lora_parameters

    max_train_steps, num_epochs, updates_per_epoch = schedule
    if checkpoint is not None:
        logger.info(f"Resumed from {checkpoint}: step {progress.global_step}, epoch {progress.epoch}")
    elif args.resume_from_checkpoint:
        logger.info(f"No checkpoint in {args.output_dir} yet: starting a new run.")
    adapted = accelerator.unwrap_model(model)
    adapter_size = sum(p.numel() for p in adapted.adapter.parameters())
    lora_size = sum(p.numel() for p in lora_parameters(adapted.transformer))
    frozen = sum(p.numel() for p in adapted.transformer.parameters() if not p.requires_grad)
    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"Trainable: adapter {adapter_size:,} + LoRA {lora_size:,} parameters; frozen transformer {frozen:,}")
    logger.info(
        f"Training: {accelerator.num_processes} process(es), {args.train_batch_size} per process x "
        f"{args.gradient_accumulation_steps} accumulation = {total_batch} tiles per update; {max_train_steps} "
        f"updates in all, {_count(updates_per_epoch, 'update')} per epoch, so {_count(num_epochs, 'epoch')}"
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


if __name__ == "__main__":
    run_main(parse_args, main)
