"""Images/s of generate_synthetic.py's batched generation against the one-image-at-a-time loop it replaces.

    python benchmarks/bench_generate.py            # CPU, under 2 minutes; target: batched >= 2x the loop
    python benchmarks/bench_generate.py --quality_table   # sampler x steps against the 30-step result (tiny)

Batched: `pipeline.generate_batch` at batch 8, both guidance branches in one transformer forward, LoRA merged,
UNI2-h and VAE decode batched. Loop: one image at a time, a conditional and an unconditional forward per step, LoRA
unmerged (as the notebook ran PEFT). Both include UNI2-h on the reference tile and the VAE decode; both make the same
images (the largest difference is printed). Presets, both random weights: 'tiny' is the tiny test stack (written to
tiny_assets/ if absent); 'small' builds a bigger PixCell in memory (4 blocks, width 256, 256 px) on the tiny VAE
and UNI, so that the transformer dominates as it does at full size. On a CPU, 256 tokens at batch 1 already keep the
GEMMs busy, so there the batched path gains mostly from the merged LoRA and fewer calls; batching itself pays on GPUs.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pixcell_ext.generation import (
    pipeline,  # noqa: E402
    work_list,  # noqa: E402
)
from pixcell_ext.model import networks  # noqa: E402
from pixcell_ext.model.adapter import AdapterConfig, UNIAdapter  # noqa: E402
from pixcell_ext.model.conditioning import AdaptedPixCell  # noqa: E402
from pixcell_ext.model.lora import LoRAConfig, inject_lora, merge_lora, unmerge_lora  # noqa: E402
from pixcell_ext.model.sampling import to_uint8_images  # noqa: E402
from pixcell_ext.stacks.tiny import TINY_UNI_WIDTH, write_tiny_stack  # noqa: E402

TARGET = 2.0
QUALITY_SAMPLERS = ("dpm", "euler")
QUALITY_STEPS = (10, 15, 20, 30)


def small_transformer() -> networks.PixCellTransformer2DModel:
    torch.manual_seed(0)
    return networks.PixCellTransformer2DModel(
        num_attention_heads=4, attention_head_dim=64, num_layers=4, cross_attention_dim=256, sample_size=32,
        caption_channels=TINY_UNI_WIDTH, interpolation_scale=1.0,
    ).eval()  # fmt: skip


def adapted_with_lora(transformer: networks.PixCellTransformer2DModel) -> AdaptedPixCell:
    """Adapter and rank-4 LoRA with non-zero weights, so both are real work and change the images."""
    model = AdaptedPixCell(
        transformer, UNIAdapter(AdapterConfig(embed_dim=transformer.config.caption_channels, hidden_dim=256))
    )
    inject_lora(transformer, LoRAConfig(rank=4))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name or "adapter.fc2" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.eval()


@torch.no_grad()
def one_at_a_time(model, uni, vae, scheduler_config, item, steps: int, guidance: float) -> np.ndarray:
    """The loop being replaced: batch 1, separate conditional and unconditional forwards."""
    transformer = model.transformer
    channels, size = transformer.config.in_channels, transformer.config.sample_size
    context = model.context(uni(pipeline.reference_pixels(item.reference)[None]))
    null = model.unconditional_context(1)
    scheduler = networks.sampling_scheduler(scheduler_config, "dpm")
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(item.seed)
    latents = torch.randn((channels, size, size), generator=generator)[None] * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(latents, t)
        conditional = transformer(x, context, timestep=t.expand(1)).sample[:, :channels]
        unconditional = transformer(x, null, timestep=t.expand(1)).sample[:, :channels]
        latents = scheduler.step(unconditional + guidance * (conditional - unconditional), t, latents).prev_sample
    return to_uint8_images(networks.decode_latents(vae, latents)).numpy()[0]


def bench(name: str, description: str, transformer, stack, items, args) -> bool:
    model = adapted_with_lora(transformer)
    batch = args.batch_size

    def loop(steps: int) -> np.ndarray:
        unmerge_lora(transformer)
        return np.stack(
            [
                one_at_a_time(model, stack.uni, stack.vae, stack.scheduler_config, item, steps, args.guidance_scale)
                for item in items
            ]
        )

    def batched(steps: int) -> np.ndarray:
        merge_lora(transformer)
        settings = pipeline.SamplingSettings(args.guidance_scale, steps, "dpm", batch)
        return np.concatenate(
            [
                pipeline.generate_batch(
                    model, stack.uni, stack.vae, stack.scheduler_config, items[i : i + batch], settings
                )
                for i in range(0, len(items), batch)
            ]
        )

    seconds: dict = {loop: [], batched: []}
    images: dict = {}
    for function in (loop, batched):
        function(1)  # warm-up at the same shapes, one step: first-call allocations and kernel selection
    for _ in range(args.repeats):  # interleaved, best of: other load on the machine hits both alike
        for function in (loop, batched):
            start = time.perf_counter()
            images[function] = function(args.steps)
            seconds[function].append(time.perf_counter() - start)
    loop_rate, batched_rate = len(items) / min(seconds[loop]), len(items) / min(seconds[batched])
    ratio = batched_rate / loop_rate
    verdict = "PASS" if ratio >= TARGET else "MISS"
    difference = np.abs(images[loop].astype(int) - images[batched].astype(int)).max()
    print(f"{name:6s} {description}; {len(items)} images")
    print(f"       batched (batch {batch}, CFG in one forward, LoRA merged): {batched_rate:7.2f} images/s")
    print(f"       one at a time (2 forwards per step, LoRA unmerged):   {loop_rate:7.2f} images/s")
    print(
        f"       ratio {ratio:5.2f}x (target >= {TARGET:.0f}x) {verdict}; same images: max |difference| "
        f"{difference} grey level(s)"
    )
    return ratio >= TARGET


def quality_table(transformer, stack, items, args) -> None:
    """Each sampler x steps against DPM-Solver++ at 30 steps: mean |difference| and PSNR of the decoded images.

    This measures how far fewer steps move the sampler from the converged trajectory, which is the price of the
    saving whatever the weights. It is not image quality: with random weights there is no real image to be close to.
    """
    model = adapted_with_lora(transformer)
    merge_lora(transformer)
    batch = args.batch_size

    def images(sampler: str, steps: int) -> tuple[np.ndarray, float]:
        settings = pipeline.SamplingSettings(args.guidance_scale, steps, sampler, batch)
        start = time.perf_counter()
        out = [
            pipeline.generate_batch(model, stack.uni, stack.vae, stack.scheduler_config, chunk, settings)
            for chunk in (items[i : i + batch] for i in range(0, len(items), batch))
        ]
        return np.concatenate(out).astype(np.float64), (time.perf_counter() - start) / len(items)

    reference, _ = images("dpm", 30)
    print(f"\n  sampler x steps against dpm at 30 steps ({len(items)} images, guidance {args.guidance_scale})")
    print(f"  {'sampler':<8}{'steps':>6}{'forwards/img':>14}{'s/img':>8}{'mean |diff|':>13}{'PSNR dB':>9}")
    for sampler in QUALITY_SAMPLERS:
        for steps in QUALITY_STEPS:
            out, seconds = images(sampler, steps)
            difference = np.abs(out - reference)
            mse = float((difference**2).mean())
            psnr = 10 * math.log10(255**2 / mse) if mse > 0 else math.inf
            forwards = steps * (2 if args.guidance_scale != 1.0 else 1)
            print(f"  {sampler:<8}{steps:>6}{forwards:>14}{seconds:>8.3f}{difference.mean():>13.2f}{psnr:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", choices=["tiny", "small"], default=["tiny", "small"])
    parser.add_argument("--tiny_dir", default="tiny_assets")
    parser.add_argument("--num_images", type=int, nargs=2, default=[16, 8], help="For tiny and for small.")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="Timed runs of each; the fastest counts.")
    parser.add_argument("--guidance_scale", type=float, default=2.0)
    parser.add_argument(
        "--quality_table",
        action="store_true",
        help=f"instead of the speed comparison: {'/'.join(QUALITY_SAMPLERS)} at {QUALITY_STEPS} steps on the tiny "
        "stack against dpm at 30 steps",
    )
    args = parser.parse_args()
    paths = write_tiny_stack(args.tiny_dir)
    files = work_list.class_files(paths.data, ["ADI", "TUM"])
    references = {
        n: work_list.choose_references(f, 4, seed=0, class_name=n, skip_bad_images=False) for n, f in files.items()
    }
    if args.quality_table:
        count = args.num_images[0]
        items = work_list.work_items(references, {"ADI": count // 2, "TUM": count - count // 2}, seed=0)
        stack = networks.load_pixcell_stack(str(paths.pixcell), str(paths.vae), str(paths.uni))
        print(f"bench_generate --quality_table: tiny stack, random weights; {torch.get_num_threads()} CPU thread(s)")
        quality_table(stack.transformer, stack, items, args)
        return
    print(
        f"bench_generate: {torch.get_num_threads()} CPU thread(s), torch {torch.__version__}, random weights; "
        f"{args.steps} DPM steps, guidance {args.guidance_scale}; one-step warm-up, best of {args.repeats}"
    )
    results = []
    for preset in args.presets:
        count = args.num_images[0 if preset == "tiny" else 1]
        items = work_list.work_items(references, {"ADI": count // 2, "TUM": count - count // 2}, seed=0)
        stack = networks.load_pixcell_stack(str(paths.pixcell), str(paths.vae), str(paths.uni))
        if preset == "tiny":
            description = "tiny stack: PixCell 4 blocks width 32, 64 px"
            transformer = stack.transformer
        else:
            description = "small (built in memory): PixCell 4 blocks width 256, 256 px; tiny VAE and UNI2-h"
            transformer = small_transformer()
        results.append(bench(preset, description, transformer, stack, items, args))
    print("overall:", "PASS" if all(results) else "MISS")


if __name__ == "__main__":
    main()
