"""Which tiles each metric sees: the probes' real train/test split and seeded per-class subsamples.

Every draw is keyed by (seed, purpose, class), so a class's tiles do not depend on which other classes are
evaluated, and a rerun picks the same tiles.
"""

from __future__ import annotations

import math

import numpy as np

from pixcell_ext.evaluation.feature_store import TileSet
from pixcell_ext.seeding import derived_seed


def split_per_class(tiles: TileSet, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic per-class split of ``tiles`` into (train rows, test rows).

    Each class is shuffled by its own seeded generator (keyed by the class name), so a class's split does not
    depend on which other classes are evaluated. ``floor(n * test_fraction)`` tiles of a class go to the test side.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    train, test = [], []
    for name in sorted(set(tiles.labels)):
        rows = [i for i, label in enumerate(tiles.labels) if label == name]
        order = np.random.default_rng(derived_seed(seed, "real-split", name)).permutation(len(rows))
        n_test = int(math.floor(len(rows) * test_fraction))
        test.extend(rows[j] for j in order[:n_test])
        train.extend(rows[j] for j in order[n_test:])
    return sorted(train), sorted(test)


def subsample_per_class(tiles: TileSet, max_per_class: int | None, seed: int, tag: str) -> list[int]:
    """Rows of at most ``max_per_class`` tiles per class (seeded); all rows when ``max_per_class`` is None."""
    if max_per_class is None:
        return list(range(len(tiles.paths)))
    counts = {name: min(tiles.labels.count(name), max_per_class) for name in set(tiles.labels)}
    return matched_subsample(tiles, counts, seed, tag)


def arrange_tiles(
    real: TileSet, synthetic: TileSet, real_test: TileSet | None, *, test_fraction: float, seed: int
) -> tuple[TileSet, dict[str, list[int]]]:
    """All files in one list (real, held-out real, synthetic) and the rows of each role in it.

    Roles: ``real`` and ``synthetic`` (distribution metrics), ``real_train`` and ``real_test`` (probes). Without a
    held-out set, ``real`` is split per class (`split_per_class`) into the probes' train and test tiles.
    """
    held_out = real_test or TileSet([], [])
    tiles = TileSet(real.paths + held_out.paths + synthetic.paths, real.labels + held_out.labels + synthetic.labels)
    n_real, n_test = len(real.paths), len(held_out.paths)
    if real_test is None:
        train, test = split_per_class(real, test_fraction, seed)
    else:
        train, test = list(range(n_real)), list(range(n_real, n_real + n_test))
    rows = {
        "real": list(range(n_real)),
        "synthetic": list(range(n_real + n_test, len(tiles.paths))),
        "real_train": train,
        "real_test": test,
    }
    return tiles, rows


def select_probe_rows(
    tiles: TileSet, rows: dict[str, list[int]], max_per_class: int | None, seed: int
) -> dict[str, list[int]] | None:
    """The probes' rows: ``real_train`` and ``synthetic`` with the same count per class (the smaller of the two,
    capped at ``max_per_class``), ``real_train_full`` (every real training tile, capped) and ``synthetic_all`` for
    the ceiling and the low-data curve, and ``real_test``. None when a side has fewer than two classes."""
    picked = {"real_test": rows["real_test"]}
    for role in ("real_train", "synthetic"):
        keep = subsample_per_class(tiles.subset(rows[role]), max_per_class, seed, f"probe-{role}")
        picked[f"{role}_full" if role == "real_train" else "synthetic_all"] = [rows[role][i] for i in keep]
    full, synthetic = tiles.subset(picked["real_train_full"]), tiles.subset(picked["synthetic_all"])
    counts = {c: min(full.labels.count(c), synthetic.labels.count(c)) for c in set(full.labels) | set(synthetic.labels)}
    for role, subset, source in (("real_train", full, "real_train_full"), ("synthetic", synthetic, "synthetic_all")):
        keep = matched_subsample(subset, counts, seed, f"probe-matched-{role}")
        picked[role] = [picked[source][i] for i in keep]
    if min(len({tiles.labels[i] for i in role_rows}) for role_rows in picked.values()) < 2:
        return None
    return picked


def matched_subsample(tiles: TileSet, counts: dict[str, int], seed: int, tag: str) -> list[int]:
    """Rows of exactly ``counts[c]`` tiles of each class c (seeded draw without replacement, keyed by class)."""
    keep = []
    for name in sorted(counts):
        rows = [i for i, label in enumerate(tiles.labels) if label == name]
        if counts[name] > len(rows):
            raise ValueError(f"class {name} has {len(rows)} tiles, {counts[name]} requested")
        order = np.random.default_rng(derived_seed(seed, tag, name)).permutation(len(rows))
        keep.extend(rows[j] for j in order[: counts[name]])
    return sorted(keep)
