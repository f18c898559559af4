"""LPIPS between image files (backbone from a local file, so it runs offline) and the report's LPIPS section."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pixcell_ext.extractors import load_state_dict_file
from pixcell_ext.feature_store import TileSet, load_tile
from pixcell_ext.manifest import References
from pixcell_ext.metrics import mean_pairwise

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


def lpips_metrics(
    scorer: LPIPSScorer,
    synthetic: TileSet,
    classes: Sequence[str],
    manifest: References | None,
    *,
    max_pairs: int,
    batch_size: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Per class: LPIPS diversity (mean over distinct pairs of generated tiles of the class; collapse -> 0) and
    fidelity (each generated tile against the reference tile it was conditioned on, from the manifest).

    ``overall`` holds the mean of the per-class diversities (pairs across classes would measure class differences,
    not diversity) and the fidelity over every referenced tile.
    """
    results: dict[str, dict[str, Any]] = {}
    all_fidelity: list[np.ndarray] = []
    for name in classes:
        paths = [p for p, label in zip(synthetic.paths, synthetic.labels, strict=True) if label == name]
        entry: dict[str, Any] = {"diversity_mean": None, "diversity_std": None, "fidelity_mean": None}
        entry.update(fidelity_std=None, n_fidelity_pairs=0)
        if len(paths) >= 2:
            entry["diversity_mean"], entry["diversity_std"] = mean_pairwise(
                scorer.distances, paths, max_pairs=max_pairs, batch_size=batch_size, seed=seed
            )
        pairs = [(p, manifest.references.get(p.resolve())) for p in paths] if manifest else []
        pairs = [(p, r) for p, r in pairs if r is not None]
        if pairs:
            values = np.concatenate(
                [
                    scorer.distances(*zip(*pairs[start : start + batch_size], strict=True))
                    for start in range(0, len(pairs), batch_size)
                ]
            )
            all_fidelity.append(values)
            entry.update(fidelity_mean=float(values.mean()), fidelity_std=float(values.std()))
            entry["n_fidelity_pairs"] = len(pairs)
        results[name] = entry
    diversities = [e["diversity_mean"] for e in results.values() if e["diversity_mean"] is not None]
    pooled = np.concatenate(all_fidelity) if all_fidelity else None
    results[OVERALL] = {
        "diversity_mean": float(np.mean(diversities)) if diversities else None,
        "diversity_std": None,
        "fidelity_mean": float(pooled.mean()) if pooled is not None else None,
        "fidelity_std": float(pooled.std()) if pooled is not None else None,
        "n_fidelity_pairs": 0 if pooled is None else int(pooled.shape[0]),
    }
    return results


def lpips_report(
    backbone: str | None,
    net: str,
    resolution: int,
    synthetic: TileSet,
    classes: Sequence[str],
    manifest: References | None,
    *,
    max_pairs: int,
    batch_size: int,
    seed: int,
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
    per_class = lpips_metrics(
        scorer, synthetic, classes, manifest, max_pairs=max_pairs, batch_size=batch_size, seed=seed
    )
    return {"net": net, "backbone": str(backbone), "resolution": resolution, "per_class": per_class}, notes
