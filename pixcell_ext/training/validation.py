"""Reference/synthetic panels: one real tile per class next to what the adapted model makes from its embedding.

The classes are split across processes and the images gathered on the main process, so validation takes
1/N of the time on N processes and no process waits long enough to hit a collective timeout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from PIL import Image, ImageDraw

from pixcell_ext.data import ImageFolderIndex
from pixcell_ext.files import write_png_atomically
from pixcell_ext.model.conditioning import AdaptedPixCell
from pixcell_ext.model.networks import decode_latents
from pixcell_ext.model.sampling import sample_latents_cfg, to_uint8_images
from pixcell_ext.seeding import generator_for


def contact_sheet(rows: list[list[np.ndarray]], labels: list[str], row_titles: list[str]) -> Image.Image:
    """A grid of uint8 HWC tiles, one column per label, with the labels above and a title left of each row."""
    tile = rows[0][0].shape[0]
    margin, title = 14, 72
    sheet = Image.new("RGB", (title + tile * len(labels), margin + tile * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for column, label in enumerate(labels):
        draw.text((title + column * tile + 2, 1), label, fill="black")
    for r, (row, name) in enumerate(zip(rows, row_titles, strict=True)):
        draw.text((2, margin + r * tile + tile // 2 - 6), name, fill="black")
        for column, image in enumerate(row):
            sheet.paste(Image.fromarray(image), (title + column * tile, margin + r * tile))
    return sheet


@torch.no_grad()
def generate_validation_images(
    accelerator: Accelerator,
    model: AdaptedPixCell,
    vae,
    scheduler_config: dict,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    *,
    seed: int,
    guidance_scale: float,
    num_inference_steps: int,
) -> list[np.ndarray] | None:
    """One image per embedding [N, 1, C] (labels feed class conditioning when the adapter has it); returns them in
    order on the main process, None elsewhere."""
    mine = list(range(accelerator.process_index, len(embeddings), accelerator.num_processes))
    produced = []
    if mine:
        uni = embeddings[mine].to(accelerator.device)
        latents = sample_latents_cfg(
            model.transformer,
            scheduler_config,
            model.context(uni, labels=labels[mine].to(accelerator.device)),
            model.unconditional_context(len(mine)),
            [generator_for(seed, "validation", i) for i in mine],
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
        )
        images = to_uint8_images(decode_latents(vae, latents)).numpy()
        produced = list(zip(mine, images, strict=True))
    everything = gather_object(produced) if accelerator.num_processes > 1 else produced
    if not accelerator.is_main_process:
        return None
    return [image for _, image in sorted(everything, key=lambda item: item[0])]


def log_panel(accelerator: Accelerator, panel: Image.Image, step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(panel), step, dataformats="HWC")


def first_tile_per_class(index: ImageFolderIndex) -> list[int]:
    """The first tile (in sorted file order) of every class: the same references at every validation."""
    first: dict[int, int] = {}
    for i, record in enumerate(index.records):
        first.setdefault(record.label, i)
    return [first[label] for label in sorted(first)]


@torch.no_grad()
def reference_embeddings(dataset, ids: list[int], uni, device) -> torch.Tensor:
    """UNI embeddings [N, 1, C] of the reference tiles, from the feature cache when the dataset carries them."""
    items = [dataset[i] for i in ids]
    if "uni_embedding" in items[0]:
        return torch.stack([item["uni_embedding"] for item in items]).unsqueeze(1).float()
    pixels = torch.stack([item["uni_pixels"] for item in items]).to(device)
    return uni(pixels).float().cpu()


def reference_tiles(index: ImageFolderIndex, ids: list[int], resolution: int) -> list[np.ndarray]:
    return [index.tile(i, resolution).permute(1, 2, 0).numpy() for i in ids]


def run(
    accelerator: Accelerator,
    model: AdaptedPixCell,
    vae,
    scheduler_config: dict,
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    references: list[np.ndarray],
    label_names: list[str],
    path: Path,
    *,
    step: int,
    seed: int,
    guidance_scale: float,
    num_inference_steps: int,
) -> None:
    """Generate, then (main process) save the reference/synthetic panel and log it to TensorBoard."""
    images = generate_validation_images(
        accelerator,
        model,
        vae,
        scheduler_config,
        embeddings,
        labels,
        seed=seed,
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
    )
    if accelerator.is_main_process:
        panel = contact_sheet([references, images], label_names, ["real", "synthetic"])
        path.parent.mkdir(parents=True, exist_ok=True)
        write_png_atomically(path, panel)
        log_panel(accelerator, panel, step)
