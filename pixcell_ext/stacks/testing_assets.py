"""Stand-in assets for the tiny preset and the tests: a fake "synthetic" folder and random timm encoders.

They live in the package (not under tests/) because `--preset tiny` builds them at run time in a user's clone,
where tests/ is not importable; nothing on a real evaluation path imports this module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from pixcell_ext.data import load_tile
from pixcell_ext.files import write_folder_once, write_json_atomically
from pixcell_ext.generation.manifest import GENERATION_CONFIG_FILE, write_manifest
from pixcell_ext.stacks.tiny import TINY_RESOLUTION

TINY_TIMM_ENCODER = "test_convnext"
STANDIN_GENERATOR = "stand-in: noisy, colour-shifted copies of real tiles (no model)"


def write_standin_synthetic(real_dir: Path, target: Path, copies: int = 1, seed: int = 0) -> Path:
    """A stand-in "synthetic" folder: noisy, colour-shifted 64 px copies of the real tiles, with a manifest.

    Written in the layout of `generate_synthetic.py` (``<CLASS>/gen_XXXX.png``, ``manifest.csv`` and a
    ``generation_config.json`` whose ``generator`` says it is a stand-in) so the tiny preset exercises every code
    path, LPIPS against the reference included, without running the generator.
    """
    from PIL import Image

    def write(tmp: Path) -> None:
        rng = np.random.default_rng(seed)
        rows = []
        for class_dir in sorted(p for p in real_dir.iterdir() if p.is_dir()):
            (tmp / class_dir.name).mkdir()
            for reference in sorted(class_dir.iterdir()):
                for _ in range(copies):
                    tile = load_tile(reference, TINY_RESOLUTION).permute(1, 2, 0).numpy().astype(np.float64)
                    tile = tile + rng.normal(0, 12, tile.shape) + rng.normal(0, 8, (1, 1, 3))
                    index = sum(r["class"] == class_dir.name for r in rows)
                    name = f"{class_dir.name}/gen_{index:04d}.png"
                    Image.fromarray(np.clip(tile, 0, 255).astype(np.uint8)).save(tmp / name)
                    reference_name = reference.relative_to(real_dir).as_posix()
                    rows.append({"file": name, "class": class_dir.name, "index": index, "reference": reference_name})
                    rows[-1].update(conditioning="reference", seed=seed, model=STANDIN_GENERATOR)
        write_manifest(tmp, rows)
        sources = {"reference_data_dir": str(Path(real_dir).resolve())}
        config = {"generator": STANDIN_GENERATOR, "seed": seed, "sources": sources}
        write_json_atomically(tmp / GENERATION_CONFIG_FILE, config)

    return write_folder_once(target, write)


def write_random_timm_encoder(name: str, target: Path, seed: int = 0) -> Path:
    """A timm model with random weights saved to ``target/model.safetensors`` (smoke tests only)."""
    import timm

    def write(tmp: Path) -> None:
        torch.manual_seed(seed)
        network = timm.create_model(name, pretrained=False, num_classes=0)
        save_file({k: v.contiguous() for k, v in network.state_dict().items()}, tmp / "model.safetensors")

    return write_folder_once(target, write) / "model.safetensors"
