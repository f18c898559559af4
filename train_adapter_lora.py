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

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pixcell_ext import artifacts, checkpointing, data, diffusion, features, mini, models, presets, validation
from pixcell_ext.adapter import AdapterConfig, UNIAdapter
from pixcell_ext.conditioning import AdaptedPixCell
from pixcell_ext.lora import (
    DEFAULT_TARGET_MODULES,
    LoRAConfig,
    block_rank_pattern,
    inject_lora,
    lora_parameters,
    parse_block_spec,
)
from pixcell_ext.runtime import (
    apply_gradient_clipping_to_deepspeed,
    check_process_group,
    check_replicas_identical,
    make_optimizer,
    run_main,
    too_many_bad_steps_message,
    weight_dtype,
)

logger = get_logger(__name__)
PRESETS = {"mini": mini.mini_training, "tiny": presets.tiny_training}


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
    group.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
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
    group = parser.add_argument_group("outputs")
    group.add_argument("--output_dir", default="outputs/pixcell-adapter-lora")
    group.add_argument("--logging_dir", default="logs", help="Under --output_dir.")
    group.add_argument("--report_to", default="tensorboard")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--checkpointing_steps", type=int, default=500)
    group.add_argument("--checkpoints_total_limit", type=int, default=None)
    group.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder.")
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
    return args


def main(args: argparse.Namespace) -> None:
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    check_process_group(accelerator)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    artifacts.check_writable(output_dir)
    artifacts.claim_output_dir(
        output_dir,
        resuming=bool(args.resume_from_checkpoint),
        overwrite=args.overwrite,
        logging_dir=args.logging_dir,
        is_main=accelerator.is_main_process,
    )
    accelerator.wait_for_everyone()

    # Data first: a bad folder should fail in seconds, not after loading 1.3 B parameters.
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
    checkpoint = checkpointing.resolve_checkpoint(output_dir, args.resume_from_checkpoint)
    updates_per_epoch = checkpointing.updates_per_epoch(
        len(index.records), args.train_batch_size, accelerator.num_processes, args.gradient_accumulation_steps
    )
    max_train_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    if checkpoint is not None:
        checkpointing.check_resumable(checkpoint, vars(args))
        done = checkpointing.read_progress(checkpoint).global_step
        if done >= max_train_steps:
            written = []
            if accelerator.is_main_process:
                written = checkpointing.finish_from_checkpoint(checkpoint, output_dir)
            accelerator.wait_for_everyone()
            logger.info(
                f"The run in {output_dir} is complete: {checkpoint.name} holds {done} of {max_train_steps} updates, "
                f"so nothing is trained" + (f"; wrote {', '.join(written)} from it." if written else ".")
            )
            return

    dtype = weight_dtype(accelerator)
    use_cache = args.feature_cache is not None
    stack = models.load_pixcell_stack(
        args.pretrained_model_name_or_path,
        args.vae_name_or_path,
        args.uni_model_name_or_path,
        dtype=dtype,
        device=accelerator.device,
        with_uni=not use_cache,
        vae_decoder_only=use_cache,
        revision=args.revision,
    )
    transformer, vae, uni = stack.transformer, stack.vae, stack.uni
    resolution = args.resolution or transformer.config.sample_size * models.vae_scale_factor(vae)
    if args.enable_vae_slicing:
        vae.enable_slicing()
    if args.enable_vae_tiling:
        vae.enable_tiling()
    logger.info(
        f"Loaded PixCell from {args.pretrained_model_name_or_path}, VAE from {args.vae_name_or_path}"
        + ("" if use_cache else f", UNI2-h from {args.uni_model_name_or_path}")
        + f"; frozen models in {dtype}, resolution {resolution} px"
    )

    set_seed(args.seed)  # the initial LoRA/adapter weights must not depend on which models were built before
    lora_config = LoRAConfig(
        rank=args.lora_rank,
        alpha=args.lora_alpha or args.lora_rank,
        target_modules=tuple(args.lora_targets),
        blocks=None if args.lora_blocks == "all" else parse_block_spec(args.lora_blocks, transformer.config.num_layers),
        rank_pattern=block_rank_pattern(args.lora_block_ranks, transformer.config.num_layers),
        dropout=args.lora_dropout,
        use_rslora=args.use_rslora,
    )
    inject_lora(transformer, lora_config)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    adapter_config = AdapterConfig(
        transformer.config.caption_channels,
        args.adapter_tokens,
        args.adapter_hidden_dim,
        class_names=tuple(index.class_names) if args.class_conditioning or args.class_loss_weight > 0 else (),
        class_conditioning=args.class_conditioning,
        class_head=args.class_loss_weight > 0,
    )
    adapter = UNIAdapter(adapter_config).to(accelerator.device)
    model = AdaptedPixCell(transformer, adapter)
    trainable = [*adapter.parameters(), *lora_parameters(transformer)]
    logger.info(
        f"Trainable: adapter {sum(p.numel() for p in adapter.parameters()):,} + LoRA "
        f"{sum(p.numel() for p in lora_parameters(transformer)):,} parameters; frozen transformer "
        f"{sum(p.numel() for p in transformer.parameters() if not p.requires_grad):,}"
    )

    if use_cache:
        cache = features.FeatureCache(args.feature_cache)
        keys = features.build_feature_cache(
            accelerator,
            index,
            cache,
            vae_identity=features.model_identity(args.vae_name_or_path),
            uni_identity=features.model_identity(args.uni_model_name_or_path),
            resolution=resolution,
            load_encoders=lambda: (
                models.load_vae(args.vae_name_or_path, dtype=dtype).to(accelerator.device),
                models.load_uni(args.uni_model_name_or_path, dtype=dtype).to(accelerator.device),
            ),
            batch_size=args.train_batch_size,
            num_workers=args.dataloader_num_workers,
            dtype=dtype,
        )
        dataset = features.CachedFeatureDataset(index, keys, cache)
    else:
        dataset = data.TileDataset(index, resolution)
    run_config = {**vars(args), "class_names": index.class_names, "resolution": resolution}
    noise_scheduler = models.training_scheduler(stack.scheduler_config)
    latent_size = resolution // models.vae_scale_factor(vae)
    randomness_spec = diffusion.RandomnessSpec(
        seed=args.seed,
        latent_shape=(transformer.config.in_channels, latent_size, latent_size),
        num_train_timesteps=noise_scheduler.config.num_train_timesteps,
        cond_dropout=args.cond_dropout,
        reference_dropout=args.reference_dropout if args.class_conditioning else 0.0,
    )
    sampler = data.EpochSampler([r.label for r in index.records], args.seed, class_balanced=args.class_balanced)
    train_dataloader = DataLoader(
        diffusion.WithStepRandomness(dataset, randomness_spec),
        batch_size=args.train_batch_size,
        sampler=sampler,
        num_workers=args.dataloader_num_workers,
        persistent_workers=args.dataloader_num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )

    optimizer = make_optimizer(
        trainable,
        use_8bit=args.use_8bit_adam,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    apply_gradient_clipping_to_deepspeed(accelerator, args.max_grad_norm)
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    num_epochs = math.ceil(max_train_steps / updates_per_epoch)
    # Stepped by us once per optimiser update, so warm-up and decay are in updates for any number of processes.
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=max_train_steps
    )
    accelerator.register_for_checkpointing(lr_scheduler)
    unwrapped = accelerator.unwrap_model(model)
    accelerator.register_save_state_pre_hook(artifacts.checkpoint_save_hook(accelerator, lora_config))
    accelerator.register_load_state_pre_hook(artifacts.checkpoint_load_hook(accelerator))

    validation_ids = validation.first_tile_per_class(index)
    validation_embeddings = validation.reference_embeddings(dataset, validation_ids, uni, accelerator.device)
    validation_references = validation.reference_tiles(index, validation_ids, resolution)

    progress = checkpointing.TrainingProgress()
    if checkpoint is not None:
        progress = checkpointing.load_checkpoint(accelerator, checkpoint)
        logger.info(f"Resumed from {checkpoint}: step {progress.global_step}, epoch {progress.epoch}")
    elif args.resume_from_checkpoint:
        logger.info(f"No checkpoint in {output_dir} yet: starting a new run.")

    if accelerator.is_main_process:
        accelerator.init_trackers("pixcell_adapter_lora", config=artifacts.loggable_config(run_config))
    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"Training: {accelerator.num_processes} process(es), {args.train_batch_size} per process x "
        f"{args.gradient_accumulation_steps} accumulation = {total_batch} tiles per update; "
        f"{max_train_steps} updates over {num_epochs} epoch(s) of {updates_per_epoch}"
    )
    progress_bar = tqdm(
        total=max_train_steps,
        initial=progress.global_step,
        desc="steps",
        disable=not accelerator.is_local_main_process,
    )
    window_is_bad, bad_in_a_row, window_stats = False, 0, []

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
            with accelerator.accumulate(model):
                randomness = diffusion.StepRandomness.from_batch(batch, accelerator.device)
                latents, embedding = features.batch_features(
                    batch,
                    vae=vae,
                    uni=uni,
                    vae_config=vae.config,
                    posterior_noise=randomness.posterior_noise,
                    augment_codes=randomness.augment_codes if args.augment else None,
                )
                terms = diffusion.diffusion_loss(
                    model,
                    noise_scheduler,
                    latents,
                    embedding,
                    randomness,
                    snr_gamma=args.snr_gamma,
                    labels=batch["label"].to(accelerator.device),
                    class_loss_weight=args.class_loss_weight,
                )
                # One collective for the skip decision (every process must agree, or DDP would step on some ranks
                # and not on others) and for the logged values.
                stats = accelerator.gather(diffusion.loss_statistics(terms))
                window_is_bad |= bool(stats[:, 0].min() == 0)
                window_stats.append(stats[:, 1:].mean(dim=0))
                accelerator.backward(terms.total)
                if accelerator.sync_gradients and not window_is_bad:
                    accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                    optimizer.step()
                    if not accelerator.optimizer_step_was_skipped:
                        lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            if not accelerator.sync_gradients:
                continue
            progress.global_step += 1
            progress_bar.update(1)
            if window_is_bad:
                progress.skipped_steps += 1
                bad_in_a_row += 1
                logger.warning(f"Non-finite loss at step {progress.global_step}: update skipped ({bad_in_a_row})")
                if bad_in_a_row >= args.max_bad_steps:
                    raise RuntimeError(
                        too_many_bad_steps_message(
                            bad_in_a_row,
                            max_bad_steps=args.max_bad_steps,
                            learning_rate=args.learning_rate,
                            max_grad_norm=args.max_grad_norm,
                        )
                    )
            else:
                bad_in_a_row = 0
            window_is_bad = False
            means = torch.stack(window_stats).mean(dim=0).tolist()
            window_stats.clear()
            logged = diffusion.LOGGED_TERMS if args.class_loss_weight > 0 else diffusion.LOGGED_TERMS[:2]
            logs = dict(zip(logged, means, strict=False))  # a non-finite loss is logged as such
            logs.update(lr=lr_scheduler.get_last_lr()[0], skipped_steps=progress.skipped_steps)
            progress_bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            accelerator.log(logs, step=progress.global_step)

            if progress.global_step % args.checkpointing_steps == 0 or progress.global_step == max_train_steps:
                saved = checkpointing.save_checkpoint(
                    accelerator, output_dir, progress, args.checkpoints_total_limit, run_config
                )
                logger.info(f"Saved {saved}")
            if progress.global_step % args.validation_steps == 0 or progress.global_step == max_train_steps:
                model.eval()
                validation.run(
                    accelerator,
                    unwrapped,
                    vae,
                    stack.scheduler_config,
                    validation_embeddings,
                    torch.tensor([index.records[i].label for i in validation_ids]),
                    validation_references,
                    [index.class_names[index.records[i].label] for i in validation_ids],
                    output_dir / "validation" / f"step-{progress.global_step:06d}.png",
                    step=progress.global_step,
                    seed=args.seed,
                    guidance_scale=args.validation_guidance_scale,
                    num_inference_steps=args.num_validation_inference_steps,
                )
                model.train()
            if progress.global_step >= max_train_steps:
                break
        if progress.global_step >= max_train_steps:
            break

    check_replicas_identical(accelerator, trainable)
    logger.info(f"Trainable weights are bit-identical on all {accelerator.num_processes} process(es)")
    if accelerator.is_main_process:
        last = f"checkpoint-{progress.global_step}"
        with artifacts.disk_full_explained(output_dir, "the final weights", last):
            artifacts.save_trained(output_dir, unwrapped, lora_config)
            artifacts.write_run_summary(output_dir, {**run_config, "trained_steps": progress.global_step})
        logger.info(f"Wrote adapter, LoRA, config and model card to {output_dir}")
    accelerator.end_training()


if __name__ == "__main__":
    run_main(main, parse_args())
