"""Frozen-model features of a tile: computed on the fly, or once into a content-addressed cache.

The cache stores the VAE posterior's mean and std (the sample is drawn at load time, as the authors' own cache does)
and the UNI2-h embedding. Each entry is keyed by the SHA-256 of the image's encoded bytes (the file, or the bytes a
dataset row stores), the identities of the VAE and UNI models, the resolution and the dtype the encoders ran in, so an
edited image, a different model or another precision never reuses a stale feature. Entries live in safetensors shards;
every shard is written under a temporary name and renamed, so a killed run loses at most the shard in progress and
never leaves a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset, Subset

from pixcell_ext.console import progress_bar
from pixcell_ext.data import ImageFolderIndex, TileDataset, dihedral, file_digest, split_map, vae_input
from pixcell_ext.files import save_safetensors_atomically
from pixcell_ext.model.networks import AutoencoderKL, UNIEncoder, encode_latent_distribution, posterior_latents

SHARD_ROWS = 1024


def model_identity(name_or_path: str) -> str:
    """A hub id as given, or a local folder/file by the names, sizes and mtimes of its files (cheap, and changes
    whenever the weights are rewritten)."""
    path = Path(name_or_path.removeprefix("local-dir:"))
    if not path.exists():
        return name_or_path
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stats = [(str(p.relative_to(path.parent)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


PREPROCESSING = "uni-bilinear-224"


def entry_keys(
    digests: list[str], vae_identity: str, uni_identity: str, resolution: int, dtype: torch.dtype
) -> list[str]:
    """`dtype` is the one the encoders ran in: bf16 features differ from fp32 ones by more than training noise.
    `PREPROCESSING` names how pixels reach the encoders, so a change there invalidates entries made the old way."""
    parts = f"{vae_identity}|{uni_identity}|{resolution}|{dtype}|{PREPROCESSING}"
    return [hashlib.sha256(f"{d}|{parts}".encode()).hexdigest() for d in digests]


class ShardStore:
    """Named tensors per key in safetensors shards; `rows` maps a key to (shard file, row).

    Each writer adds whole shards under unique names, so processes never write the same file.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.rows: dict[str, tuple[str, int]] = {}
        self.refresh()

    def refresh(self) -> None:
        for shard in sorted(self.directory.glob("shard-*.safetensors")):
            with safe_open(str(shard), framework="pt") as handle:
                keys = json.loads(handle.metadata()["keys"])
            for row, key in enumerate(keys):
                self.rows.setdefault(key, (shard.name, row))

    def write(self, keys: list[str], tensors: dict[str, torch.Tensor]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"shard-{uuid.uuid4().hex}.safetensors"
        tensors = {k: v.float().contiguous().cpu() for k, v in tensors.items()}
        save_safetensors_atomically(tensors, self.directory / name, metadata={"keys": json.dumps(keys)})

    def read(self, keys: list[str], name: str) -> torch.Tensor:
        """Rows of tensor `name` for `keys`, in order, reading each shard once."""
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for position, key in enumerate(keys):
            shard, row = self.rows[key]
            by_shard.setdefault(shard, []).append((position, row))
        parts: dict[int, torch.Tensor] = {}
        for shard, pairs in by_shard.items():
            with safe_open(str(self.directory / shard), framework="pt") as handle:
                table = handle.get_tensor(name)
            parts.update({position: table[row] for position, row in pairs})
        return torch.stack([parts[i] for i in range(len(keys))])


class ShardBuffer:
    """Rows gathered batch by batch and written to `store` a shard (`SHARD_ROWS` rows) at a time: few files, and a
    killed run loses at most one shard's work. `flush()` writes what is left."""

    def __init__(self, store: ShardStore, rows: int = SHARD_ROWS):
        self.store, self.rows = store, rows
        self.keys: list[str] = []
        self.parts: dict[str, list[torch.Tensor]] = {}

    def add(self, keys: list[str], tensors: dict[str, torch.Tensor]) -> None:
        self.keys.extend(keys)
        for name, tensor in tensors.items():
            self.parts.setdefault(name, []).append(tensor.cpu())
        if len(self.keys) >= self.rows:
            self.flush()

    def flush(self) -> None:
        if self.keys:
            self.store.write(self.keys, {name: torch.cat(parts) for name, parts in self.parts.items()})
        self.keys, self.parts = [], {}


class FeatureCache(ShardStore):
    """Training features: `latent_mean`, `latent_std` and `uni_embedding` per image."""


class CachedFeatureDataset(Dataset):
    """The cached features of an image folder, in the folder's order; shards are memory-mapped per worker."""

    def __init__(self, index: ImageFolderIndex, keys: list[str], cache: FeatureCache):
        self.labels = [record.label for record in index.records]
        self.locations = [cache.rows[key] for key in keys]
        self.directory = cache.directory
        self._handles: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.locations)

    def __getitem__(self, i: int) -> dict:
        shard, row = self.locations[i]
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.directory / shard), framework="pt")
        handle = self._handles[shard]
        item = {name: handle.get_slice(name)[row] for name in ("latent_mean", "latent_std", "uni_embedding")}
        return {"index": i, "label": self.labels[i], **item}


@torch.no_grad()
def build_feature_cache(
    accelerator: Accelerator,
    index: ImageFolderIndex,
    digests: list[str],
    cache: FeatureCache,
    *,
    vae_identity: str,
    uni_identity: str,
    resolution: int,
    load_encoders,
    batch_size: int,
    num_workers: int = 0,
    dtype: torch.dtype = torch.float32,
) -> list[str]:
    """Fill the cache for every image of `index` (`digests`: its `tile_digests`), the missing entries split across
    processes; returns the keys.

    `load_encoders()` returns (vae, uni) in `dtype` on the device and is called only when something is missing.
    """
    keys = entry_keys(digests, vae_identity, uni_identity, resolution, dtype)
    missing = sorted({key: i for i, key in enumerate(keys) if key not in cache.rows}.values())
    if missing:
        vae, uni = load_encoders()
        _encode_into_cache(accelerator, index, keys, missing, cache, vae, uni, resolution, batch_size, num_workers)
        del vae, uni
    accelerator.wait_for_everyone()
    cache.refresh()
    return keys


def hash_files(accelerator: Accelerator, paths: list[Path]) -> list[str]:
    """SHA-256 of every file, split across processes; every process gets the full list, in order."""
    return split_map(accelerator, lambda i: file_digest(paths[i]), len(paths), desc="hashing")


def _encode_into_cache(accelerator, index, keys, missing, cache, vae, uni, resolution, batch_size, num_workers):
    mine = missing[accelerator.process_index :: accelerator.num_processes]
    loader = DataLoader(Subset(TileDataset(index, resolution), mine), batch_size=batch_size, num_workers=num_workers)
    shards = ShardBuffer(cache)
    progress = progress_bar(len(missing), "caching features", enabled=accelerator.is_main_process)
    for batch in loader:
        tensors = cache_entries(
            vae, uni, batch["uni_pixels"].to(accelerator.device), batch["vae_pixels"].to(accelerator.device)
        )
        shards.add([keys[i] for i in batch["index"].tolist()], tensors)
        progress.update(len(batch["index"]) * accelerator.num_processes)
    shards.flush()
    progress.close()


def cache_entries(
    vae: AutoencoderKL, uni: UNIEncoder, uni_pixels: torch.Tensor, vae_pixels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """What the cache stores for a batch of uint8 views: the VAE posterior's mean and std (the latent is sampled from
    them at each step) and the UNI2-h embedding."""
    mean, std = encode_latent_distribution(vae, vae_input(vae_pixels))
    return {"latent_mean": mean, "latent_std": std, "uni_embedding": uni(uni_pixels).squeeze(1).float()}


@torch.no_grad()
def batch_features(
    batch: dict,
    *,
    vae: AutoencoderKL | None,
    uni: UNIEncoder | None,
    vae_config,
    posterior_noise: torch.Tensor,
    augment_codes: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, UNI embedding [B, 1, C]) of a batch, from the cache when it carries features, else computed.

    The posterior sample uses the step's own noise, so cached and on-the-fly training draw the same latents.
    """
    if "uni_embedding" in batch:
        mean, std, embedding = batch["latent_mean"], batch["latent_std"], batch["uni_embedding"].unsqueeze(1)
    else:
        uni_pixels, vae_pixels = batch["uni_pixels"], batch["vae_pixels"]
        if augment_codes is not None:
            uni_pixels = torch.stack([dihedral(p, c) for p, c in zip(uni_pixels, augment_codes.tolist(), strict=True)])
            vae_pixels = torch.stack([dihedral(p, c) for p, c in zip(vae_pixels, augment_codes.tolist(), strict=True)])
        embedding = uni(uni_pixels)
        mean, std = encode_latent_distribution(vae, vae_input(vae_pixels))
    return posterior_latents(vae_config, mean, std, posterior_noise), embedding.float()
