"""Tiles and their features: a fixed list of files per role, and a per-file feature cache shared across runs.

Features are cached per file under ``feature_cache/<extractor-id>/``, keyed by the SHA-256 of the image bytes and the
extractor's identity, so a rerun, or another synthetic set against the same real set, recomputes nothing it has
already seen. Missing files are split across processes; each process writes its own shards and the main process
reads them back once all are done.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from accelerate import Accelerator
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from pixcell_ext.console import progress_bar
from pixcell_ext.data import ImageFolderIndex, load_tile
from pixcell_ext.evaluation.extractors import FeatureExtractor
from pixcell_ext.files import write_text_atomically
from pixcell_ext.training.feature_cache import ShardBuffer, ShardStore


@dataclass
class TileSet:
    """Image files with their class names, in a fixed order."""

    paths: list[Path]
    labels: list[str]

    @classmethod
    def from_index(cls, index: ImageFolderIndex) -> TileSet:
        return cls([r.path for r in index.records], [index.class_names[r.label] for r in index.records])

    def subset(self, rows: Sequence[int]) -> TileSet:
        return TileSet([self.paths[i] for i in rows], [self.labels[i] for i in rows])

    def counts(self, classes: Sequence[str]) -> dict[str, int]:
        return {c: self.labels.count(c) for c in classes}


class _Tiles(Dataset):
    def __init__(self, paths: Sequence[Path], size: int):
        self.paths, self.size = list(paths), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        return load_tile(self.paths[i], self.size)


class FeatureStore(ShardStore):
    """Features of one extractor keyed by file digest; a human-readable `identity.txt` says which extractor."""

    def __init__(self, directory: str | os.PathLike, identity: str):
        super().__init__(directory)
        self.identity = identity

    def write(self, keys: list[str], tensors: dict[str, Tensor]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        identity_file = self.directory / "identity.txt"
        if not identity_file.exists():
            write_text_atomically(identity_file, self.identity + "\n")
        super().write(keys, tensors)

    def read_features(self, keys: Sequence[str]) -> np.ndarray:
        return self.read(list(keys), "features").numpy() if keys else np.empty((0, 0), dtype=np.float32)


def compute_features(
    accelerator: Accelerator,
    extractor: FeatureExtractor,
    paths: Sequence[Path],
    digests: Sequence[str],
    cache_dir: str | os.PathLike,
    *,
    batch_size: int,
    num_workers: int = 0,
) -> np.ndarray | None:
    """``[N, D]`` features of ``paths`` on the main process (None elsewhere), extracting only uncached files.

    Files with equal content are extracted once. The missing files are split ``process_index::num_processes``;
    each process writes its shards, and after a barrier the main process reads every row from the cache. Every
    process loads the network when anything is missing, so an unavailable extractor fails on all of them alike.
    """
    store = FeatureStore(Path(cache_dir) / extractor.cache_id, extractor.identity)
    first_path = dict(zip(digests, paths, strict=True))
    missing = sorted(d for d in first_path if d not in store.rows)
    accelerator.wait_for_everyone()  # every process has its list of missing files before any shard is written
    mine = missing[accelerator.process_index :: accelerator.num_processes]
    if missing:
        extractor.load(accelerator.device)
    if mine:
        loader = DataLoader(
            _Tiles([first_path[d] for d in mine], extractor.image_size), batch_size=batch_size, num_workers=num_workers
        )
        shards = ShardBuffer(store)
        progress = progress_bar(len(missing), f"{extractor.name} features", enabled=accelerator.is_main_process)
        for start, images in zip(range(0, len(mine), batch_size), loader, strict=True):
            shards.add(mine[start : start + len(images)], {"features": extractor.extract(images)})
            progress.update(len(images) * accelerator.num_processes)
        shards.flush()
        progress.close()
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    store.refresh()
    return store.read_features(list(digests))
