"""The evaluation on synthetic sets whose answers are known, in the mini stack's feature spaces (CPU, offline).

Real tiles are the toy TARGET domain (`pixcell_ext.stacks.toy_histology`); the features are the committed mini UNI2-h
and the judge (a classifier trained on TARGET, read as an independent encoder). Three stand-in "generators":

- ``fresh``: new TARGET tiles from another seed (an ideal generator: same distribution, nothing copied);
- ``copies``: the training tiles re-saved with slight pixel noise (a generator that memorised its training set);
- ``source``: tiles of the SOURCE domain (a generator that was never adapted to TARGET).

    python benchmarks/evaluation_known_answers.py --output_dir outputs/evaluation-known-answers

Prints one line per set: matched n, FD / KID / precision / recall / density / coverage with intervals in the judge's
space, TSTR vs TRTR, the low-data gain at the smallest k, and the memorisation flag.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluate_synthetic  # noqa: E402
from pixcell_ext.data import read_rgb  # noqa: E402
from pixcell_ext.files import write_folder_once  # noqa: E402
from pixcell_ext.stacks.judge import timm_extractor_arguments  # noqa: E402
from pixcell_ext.stacks.mini import MINI_ASSETS, PART_FOLDERS  # noqa: E402
from pixcell_ext.stacks.toy_histology import write_toy_dataset  # noqa: E402


def noisy_copy(source: Path, target: Path, sigma: float = 2.0) -> Path:
    def write(folder: Path) -> None:
        rng = np.random.default_rng(0)
        for path in sorted(source.glob("*/*")):
            pixels = np.asarray(read_rgb(path), dtype=np.float64)
            noisy = np.clip(np.rint(pixels + rng.normal(0, sigma, pixels.shape)), 0, 255).astype(np.uint8)
            (folder / path.parent.name).mkdir(exist_ok=True)
            Image.fromarray(noisy).save(folder / path.parent.name / f"{path.stem}.png")

    return write_folder_once(target, write)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/evaluation-known-answers")
    parser.add_argument("--tiles_per_class", type=int, default=40)
    args = parser.parse_args()
    root = Path(args.output_dir)
    n = args.tiles_per_class
    train = write_toy_dataset(root / "target-train", "target", "train", n)
    real = write_toy_dataset(root / "target-heldout", "target", "heldout", n)
    test = write_toy_dataset(root / "target-test", "target", "heldout", n, seed=1)
    sets = {
        "fresh": write_toy_dataset(root / "fresh", "target", "heldout", n, seed=2),
        "copies": noisy_copy(train, root / "copies"),
        "source": write_toy_dataset(root / "source", "source", "heldout", n),
    }
    architecture, weights, options = timm_extractor_arguments(MINI_ASSETS / PART_FOLDERS["judge"])
    for name, synthetic in sets.items():
        argv = ["--real_dir", str(real), "--real_test_dir", str(test), "--synthetic_dir", str(synthetic)]
        argv += ["--train_data_dir", str(train), "--output_dir", str(root / f"eval-{name}")]
        argv += ["--extractors", "uni", "timm", "--uni_model_name_or_path", str(MINI_ASSETS / PART_FOLDERS["uni"])]
        argv += ["--timm_encoder", architecture, "--timm_encoder_weights", weights]
        argv += ["--timm_encoder_kwargs", json.dumps(options["model_kwargs"])]
        argv += ["--timm_image_size", str(options["image_size"]), "--timm_mean", *map(str, options["mean"])]
        argv += ["--timm_std", *map(str, options["std"]), "--low_data_ks", "1", "5", "20"]
        argv += ["--dataloader_num_workers", "0", "--batch_size", "60"]
        evaluate_synthetic.main(evaluate_synthetic.parse_args(argv))
        report = json.loads((root / f"eval-{name}" / "metrics.json").read_text())
        memo = report["memorisation"]
        print(
            f"{name}: memorisation ({memo['feature_space']}): possible copies {_ci(memo['possible_copies'])}, "
            f"flagged {memo['flagged']}"
        )
        for space in ("uni", f"timm:{architecture}"):
            entry = report["extractors"][space]
            overall = entry["distribution"]["overall"]
            cells = [f"{m} {_ci(overall[m])}" for m in ("fd", "kid", "precision", "recall", "density", "coverage")]
            probes = [f"{k} {_ci(v['balanced_accuracy_ci'])}" for k, v in entry["probe"].items()]
            curve = [
                f"k={p['k']}: {p['real']['value']:.3f} -> {p['real_plus_synthetic']['value']:.3f}"
                for p in entry["low_data"]["points"]
            ]
            print(f"  {space} n={overall['n']}: " + "; ".join(cells + probes + curve))


def _ci(entry: dict) -> str:
    return f"{entry['value']:.3g} [{entry['low']:.3g}, {entry['high']:.3g}]"


if __name__ == "__main__":
    main()
