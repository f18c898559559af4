"""LPIPS between image files (backbone from a local file, so it runs offline) and the report's LPIPS section."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pixcell_ext.data import load_tile
from pixcell_ext.evaluation.extractors import load_state_dict_file
from pixcell_ext.evaluation.feature_store import TileSet
from pixcell_ext.evaluation.intervals import bootstrap_mean
from pixcell_ext.evaluation.pairwise import pairwise_values
from pixcell_ext.generation.manifest import References

OVERALL = "overall"


class LPIPSScorer:
    """LPIPS distances between image files, with the backbone from a local torchvision state dict.

    The `lpips` package ships its calibrated linear heads but fetches the AlexNet/VGG backbone through torchvision,
    which fails offline; the backbone is therefore built without weights and loaded from ``backbone`` (a
    torchvision ``alexnet`` / ``vgg16`` state dict, or just its ``features.*`` part). With a random backbone the
    scores run but mean nothing (tests only). Both images of a pair are resized to ``size`` from their originals.
    """

    def __init__(self, backbone: str | os.PathLike, net: str = "alex", *, size: int = 224, device: str = "cpu"):
        import lpips

        state = load_state_dict_file(backbone)
        features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        with warnings.catch_warnings():  # lpips calls torchvision with its deprecated `pretrained=` argument
            warnings.simplefilter("ignore", UserWarning)
            self.model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
        # lpips cuts torchvision's `features` into slices that keep the layer indices: "3.weight" -> "slice2.3.weight"
        owner = {index: name for name, part in self.model.net.named_children() for index in part._modules}
        try:
            self.model.net.load_state_dict({f"{owner[k.split('.')[0]]}.{k}": v for k, v in features.items()})
        except (KeyError, RuntimeError) as error:
            raise ValueError(
                f"--lpips_backbone '{backbone}' is not the 'features' part of a torchvision {net} state dict: {error}"
            ) from error
        self.model = self.model.to(torch.device(device)).requires_grad_(False).eval()
        self.net, self.size, self.device = net, size, device

    def _batch(self, paths: Sequence[Path]) -> Tensor:
        images = torch.stack([load_tile(p, self.size) for p in paths]).to(self.device)
        return images.float() / 127.5 - 1.0

    @torch.no_grad()
    def distances(self, paths_a: Sequence[Path], paths_b: Sequence[Path]) -> np.ndarray:
        """LPIPS between ``paths_a[i]`` and ``paths_b[i]`` for every i."""
        out = self.model(self._batch(paths_a), self._batch(paths_b))
        return out.reshape(-1).double().cpu().numpy()


@dataclass(frozen=True)
class LPIPSSettings:
    """Pairs per class, batch size, bootstrap replicates over pairs, interval level and seed."""

    max_pairs: int = 1000
    batch_size: int = 64
    replicates: int = 200
    confidence: float = 0.95
    seed: int = 0


def lpips_metrics(
    scorer: LPIPSScorer,
    synthetic: TileSet,
    real: TileSet,
    classes: Sequence[str],
    manifest: References | None,
    settings: LPIPSSettings,
) -> dict[str, dict[str, Any]]:
    """Per class, three LPIPS means with intervals, each read against the one beside it:

    - ``generated_pairs``: distinct pairs of generated tiles of the class (diversity; a collapsed generator -> 0);
    - ``real_pairs``: distinct pairs of real tiles of the class: the diversity a faithful generator should match,
      and the scale of "two unrelated tiles of this class" for the next one;
    - ``generated_to_reference``: each generated tile against the reference it was conditioned on (manifest). A
      UNI-conditioned sample does not share its reference's layout, so this is near ``real_pairs``, not near 0;
      clearly below it means the generator reproduces its references.
    ``overall`` averages the per-class pair means (cross-class pairs would measure class differences) and pools the
    reference distances.
    """
    common = {"replicates": settings.replicates, "seed": settings.seed, "confidence": settings.confidence}

    def pair_values(paths: list[Path]) -> np.ndarray:
        if len(paths) < 2:
            return np.empty(0)
        return pairwise_values(
            scorer.distances, paths, max_pairs=settings.max_pairs, batch_size=settings.batch_size, seed=settings.seed
        )

    results: dict[str, dict[str, Any]] = {}
    pooled: list[np.ndarray] = []
    for name in classes:
        generated = [p for p, label in zip(synthetic.paths, synthetic.labels, strict=True) if label == name]
        real_paths = [p for p, label in zip(real.paths, real.labels, strict=True) if label == name]
        pairs = [(p, manifest.references.get(p.resolve())) for p in generated] if manifest else []
        pairs = [(p, r) for p, r in pairs if r is not None]
        to_reference = np.concatenate(
            [np.empty(0)]
            + [
                scorer.distances(*zip(*pairs[start : start + settings.batch_size], strict=True))
                for start in range(0, len(pairs), settings.batch_size)
            ]
        )
        pooled.append(to_reference)
        results[name] = {
            "generated_pairs": bootstrap_mean(pair_values(generated), **common),
            "real_pairs": bootstrap_mean(pair_values(real_paths), **common),
            "generated_to_reference": bootstrap_mean(to_reference, **common),
        }
    overall: dict[str, Any] = {}
    for key in ("generated_pairs", "real_pairs"):
        values = [results[c][key]["value"] for c in classes if results[c][key]["value"] is not None]
        overall[key] = bootstrap_mean(values, **common)  # interval over classes
    overall["generated_to_reference"] = bootstrap_mean(np.concatenate([np.empty(0), *pooled]), **common)
    results[OVERALL] = overall
    return results


def lpips_report(
    backbone: str | None,
    net: str,
    resolution: int,
    synthetic: TileSet,
    real: TileSet,
    classes: Sequence[str],
    manifest: References | None,
    settings: LPIPSSettings,
    *,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, Any], list[str]]:
    """The report's ``lpips`` section and notes; LPIPS is skipped (with a note) when no backbone file is given."""
    if backbone is None:
        note = "LPIPS skipped: pass --lpips_backbone (a torchvision alexnet/vgg16 state dict) to compute it."
        return {"skipped": note}, [note]
    notes = []
    if manifest is not None and manifest.unresolved:
        notes.append(f"{len(manifest.unresolved)} manifest references were not found, e.g. '{manifest.unresolved[0]}'.")
    scorer = LPIPSScorer(backbone, net, size=resolution, device=device)
    per_class = lpips_metrics(scorer, synthetic, real, classes, manifest, settings)
    return {"net": net, "backbone": str(backbone), "resolution": resolution, "per_class": per_class}, notes
