"""Class-organised synthetic datasets from an adapted PixCell: the model, its batches and the contact sheets.

Layout of an output directory (the original notebook's, plus bookkeeping that class-folder loaders ignore):

    OUT/<CLASS>/gen_0000.png ...     one image per (class, index)
    OUT/manifest.csv                 one row per image, sorted by (class, index)
    OUT/metadata.jsonl               the same rows for `datasets`' imagefolder (provenance columns per image)
    OUT/generation_config.json       what the images were made with (checked on every rerun)
    OUT/.contact_sheet_<CLASS>.png   references above, synthetic tiles below

The contact sheets are hidden top-level files on purpose: a folder beside the classes would become a class for
torchvision's `ImageFolder`, and an image file at the top level makes `datasets`' imagefolder drop the labels.

Every image is a pure function of the configuration and its (class, index): its noise comes from its own generator
seeded from (seed, class, index), its reference tile from a seeded permutation of the class folder, and every forward
runs at the full batch shape (a short batch is padded by repeating its last item), because CPU kernels round
differently for different batch sizes. So the files do not depend on how the work list was split across processes
or resumed, and the manifest can be rebuilt from the configuration at the end instead of being accumulated.
On CPUs the oneDNN convolutions of the VAE also round differently for different thread counts: byte identity across
process counts there needs the same OMP_NUM_THREADS per process (`accelerate launch` gives each process 1).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pixcell_ext.data import UNI_IMAGE_SIZE, UNI_RESAMPLE, DataError, load_tile, read_rgb
from pixcell_ext.files import write_png_atomically
from pixcell_ext.generation.work_list import WorkItem
from pixcell_ext.model.adapter import ADAPTER_FILE, AdapterConfig, UNIAdapter, read_adapter_config
from pixcell_ext.model.conditioning import AdaptedPixCell
from pixcell_ext.model.lora import merge_lora
from pixcell_ext.model.lora_files import DamagedFileError, LoRAMismatchError, read_lora_config
from pixcell_ext.model.networks import AutoencoderKL, PixCellTransformer2DModel, UNIEncoder, decode_latents
from pixcell_ext.model.sampling import sample_latents_cfg, to_uint8_images
from pixcell_ext.training.run_directory import LORA_FILE, load_trained, read_training_config
from pixcell_ext.training.validation import contact_sheet

logger = logging.getLogger(__name__)
CONTACT_SHEET_PAIRS = 8


def check_lora_dir(lora_dir: str | None) -> None:
    """Refuse a missing, incomplete or damaged --lora_dir in a second, before any model loads (reads headers only)."""
    if lora_dir is None:
        return
    directory = Path(lora_dir)
    fix = "Pass the --output_dir of a train_adapter_lora.py run (or a checkpoint-N folder inside it)."
    if not directory.is_dir():
        problem = "is a file, not a folder" if directory.exists() else "does not exist"
        raise DataError(f"--lora_dir '{lora_dir}' {problem}. {fix}")
    missing = [name for name in (ADAPTER_FILE, LORA_FILE) if not (directory / name).is_file()]
    if missing:
        raise DataError(f"--lora_dir '{lora_dir}' is not a training output: {', '.join(missing)} missing. {fix}")
    read_adapter_config(directory / ADAPTER_FILE)
    read_lora_config(directory / LORA_FILE)


def load_generation_model(
    transformer: PixCellTransformer2DModel, lora_dir: str | None, model_name: str
) -> AdaptedPixCell:
    """The adapted model, its LoRA merged into fp32 weights (inference then costs exactly the base model).

    In bf16/fp16 the LoRA stays unmerged and runs in fp32 beside the half-precision base: rounding W + ΔW to bf16
    would erase most of a small update (see `LoRALinear.merge`), and generated sets would then show less of the
    fine-tuning than the (unmerged) validation panels did. Without `lora_dir` the adapter is `UNIAdapter` at init,
    which is the identity: the released PixCell.
    """
    if lora_dir is None:
        adapter = UNIAdapter(AdapterConfig(embed_dim=transformer.config.caption_channels))
        return AdaptedPixCell(transformer, adapter.to(transformer.device)).eval()
    trained_on = read_training_config(lora_dir).get("pretrained_model_name_or_path")
    if trained_on is not None and trained_on != model_name:
        logger.warning(
            "--lora_dir %s was trained on '%s' but generation uses '%s'; fine if they are copies of one checkpoint.",
            lora_dir,
            trained_on,
            model_name,
        )
    try:
        model = load_trained(lora_dir, transformer)
    except DamagedFileError:
        raise  # the file is at fault, not the choice of model: its message says so
    except (LoRAMismatchError, ValueError) as error:
        raise LoRAMismatchError(
            f"--lora_dir '{lora_dir}' does not fit the model '{model_name}': {error}\n"
            "Pass the --pretrained_model_name_or_path the run was trained on."
        ) from error
    if transformer.dtype == torch.float32:
        merge_lora(transformer)
    else:
        logger.info("LoRA kept unmerged: merging into %s weights would round the update away.", transformer.dtype)
    return model.eval()


def reference_pixels(path: Path) -> torch.Tensor:
    """uint8 [3, 224, 224]: the centre square of a tile resized once for UNI2-h, as training saw it."""
    return load_tile(path, UNI_IMAGE_SIZE, UNI_RESAMPLE)


@dataclass(frozen=True)
class SamplingSettings:
    guidance_scale: float
    num_inference_steps: int
    sampler: str
    batch_size: int


@torch.no_grad()
def generate_batch(
    model: AdaptedPixCell,
    uni: UNIEncoder,
    vae: AutoencoderKL,
    scheduler_config: dict,
    items: list[WorkItem],
    settings: SamplingSettings,
) -> np.ndarray:
    """uint8 [len(items), H, W, 3] for at most `settings.batch_size` items.

    Every forward (UNI2-h, adapter, transformer with both guidance branches, VAE decode) runs at the full batch
    shape: a short batch is padded by repeating its last item and the padding is discarded, so an image is the same
    bytes whichever batch or process made it.
    """
    if not 0 < len(items) <= settings.batch_size:
        raise ValueError(f"A batch holds 1 to {settings.batch_size} items, got {len(items)}.")
    padded = items + [items[-1]] * (settings.batch_size - len(items))
    device = model.transformer.device
    null_context = model.unconditional_context(len(padded))
    class_ids = None
    fallback = null_context
    if model.adapter.class_embedding is not None:
        class_ids = model.adapter.class_ids([item.class_name for item in padded])
        fallback = model.class_only_context(class_ids)
    conditional = torch.tensor([item.reference is not None for item in padded], device=device)
    context = fallback
    if conditional.any():
        blank = torch.zeros(3, UNI_IMAGE_SIZE, UNI_IMAGE_SIZE, dtype=torch.uint8)
        pixels = torch.stack([reference_pixels(i.reference) if i.reference else blank for i in padded])
        with_reference = model.context(uni(pixels.to(device)), labels=class_ids)
        context = torch.where(conditional.view(-1, 1, 1), with_reference, fallback)
    latents = sample_latents_cfg(
        model.transformer,
        scheduler_config,
        context,
        null_context,
        [torch.Generator().manual_seed(item.seed) for item in padded],
        guidance_scale=settings.guidance_scale,
        num_inference_steps=settings.num_inference_steps,
        sampler=settings.sampler,
    )
    return to_uint8_images(decode_latents(vae, latents)).numpy()[: len(items)]


def write_contact_sheet(output_dir: Path, class_name: str, items: list[WorkItem], resolution: int) -> None:
    """The first generated images of a class under their reference tiles; grey where a class has no references."""
    done = [item for item in items if (output_dir / item.file).exists()][:CONTACT_SHEET_PAIRS]
    if not done:
        return
    grey = np.full((resolution, resolution, 3), 128, dtype=np.uint8)
    references = [
        load_tile(item.reference, resolution).permute(1, 2, 0).numpy() if item.reference else grey for item in done
    ]
    synthetic = [np.asarray(read_rgb(output_dir / item.file)) for item in done]
    titles = ["reference" if done[0].reference else "(none)", "synthetic"]
    sheet = contact_sheet([references, synthetic], [str(item.index) for item in done], titles)
    write_png_atomically(output_dir / f".contact_sheet_{class_name}.png", sheet)
