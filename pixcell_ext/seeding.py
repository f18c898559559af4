"""Seeds derived from named parts, so that every random draw belongs to one sample and not to a batch or a process.

Drawing each sample's noise from its own generator makes results independent of batch size, number of processes
and resume points: the same (seed, epoch, sample) always gets the same noise, timestep and dropout decision.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def derived_seed(*parts: int | str) -> int:
    """A 63-bit seed from any mix of integers and strings, well mixed by numpy's SeedSequence."""
    words = [zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in parts]
    high, low = np.random.SeedSequence(words).generate_state(2)
    return (int(high) << 31) ^ int(low)


def generator_for(*parts: int | str) -> torch.Generator:
    """A CPU generator: CPU draws are identical on every machine, and are moved to the device afterwards."""
    return torch.Generator().manual_seed(derived_seed(*parts))
