"""The trained mini stack as users run it: committed models plus toy TARGET tiles written on first use.

The models (mini PixCell pretrained on SOURCE, the mini SD3.5-style VAE, the mini UNI2-h and an independent judge
trained on TARGET) are committed under `pixcell_ext/assets/mini` (built by `python -m pixcell_ext.stacks.mini_stack`).
The tiles are procedural (`toy_histology`), so they are written, not shipped: TARGET train tiles for adaptation,
two TARGET held-out sets for evaluation (FD reference, probe test set) and SOURCE held-out tiles for checking the
base model. They are a synthetic toy domain, not histology.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MINI_ASSETS = Path(__file__).resolve().parents[1] / "assets" / "mini"  # as pixcell_ext.stacks.mini_stack writes it
PART_FOLDERS = {"vae": "sd35-vae-mini", "uni": "uni2h-mini", "judge": "judge", "transformer": "pixcell-256-mini"}
MINI_RESOLUTION = 64  # VAE input; the committed VAE's latents are [16, 8, 8]
MINI_DIR = "mini_assets"
TRAIN_TILES_PER_CLASS = 40
HELDOUT_TILES_PER_CLASS = 40


@dataclass(frozen=True)
class MiniStack:
    pixcell: Path
    vae: Path
    uni: Path
    judge: Path
    target_train: Path
    target_heldout: Path
    target_test: Path  # a second held-out TARGET set: the probes' test set, independent of the FD reference
    source_heldout: Path


def mini_stack(data_root: str | os.PathLike = MINI_DIR, assets: Path = MINI_ASSETS) -> MiniStack:
    """Paths of the committed models and of the tile folders under `data_root` (which may not exist yet)."""
    root = Path(data_root)
    return MiniStack(
        pixcell=assets / PART_FOLDERS["transformer"],
        vae=assets / PART_FOLDERS["vae"],
        uni=assets / PART_FOLDERS["uni"],
        judge=assets / PART_FOLDERS["judge"],
        target_train=root / "target-train",
        target_heldout=root / "target-heldout",
        target_test=root / "target-test",
        source_heldout=root / "source-heldout",
    )


def write_mini_stack(
    data_root: str | os.PathLike = MINI_DIR,
    assets: Path = MINI_ASSETS,
    train_per_class: int = TRAIN_TILES_PER_CLASS,
    heldout_per_class: int = HELDOUT_TILES_PER_CLASS,
) -> MiniStack:
    """The mini stack with its tile folders written (once; existing folders are kept whatever their size);
    refuses a checkout without the committed models."""
    from pixcell_ext.stacks.toy_histology import write_toy_dataset

    stack = mini_stack(data_root, assets)
    missing = [str(p) for p in (stack.pixcell, stack.vae, stack.uni, stack.judge) if not p.is_dir()]
    if missing:
        raise FileNotFoundError(
            f"The mini stack is incomplete: {', '.join(missing)} missing. These folders are committed with the "
            "project; restore them from git, or rebuild with `python -m pixcell_ext.stacks.mini_stack --output_dir "
            "pixcell_ext/assets/mini`."
        )
    write_toy_dataset(stack.target_train, "target", "train", train_per_class)
    write_toy_dataset(stack.target_heldout, "target", "heldout", heldout_per_class)
    write_toy_dataset(stack.target_test, "target", "heldout", heldout_per_class, seed=1)
    write_toy_dataset(stack.source_heldout, "source", "heldout", heldout_per_class)
    return stack


def mini_models(stack: MiniStack) -> dict:
    return {
        "pretrained_model_name_or_path": str(stack.pixcell),
        "vae_name_or_path": str(stack.vae),
        "uni_model_name_or_path": str(stack.uni),
    }
