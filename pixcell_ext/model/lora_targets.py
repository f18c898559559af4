"""Where LoRA can go in a PixCell transformer block, by name, without torch: the command-line defaults and the
checks made before any model loads read these (see `pixcell_ext.lora` for the layers themselves)."""

from __future__ import annotations

import re

DEFAULT_TARGET_MODULES: tuple[str, ...] = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_v",
    "attn2.to_out.0",
)
"""Self-attention fully, cross-attention only where gradient flows with one condition token (see module docstring)."""

OPTIONAL_TARGET_MODULES: tuple[str, ...] = ("ff.net.0.proj", "ff.net.2")

BLOCK_LINEAR_LAYERS: tuple[str, ...] = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
)
"""Every nn.Linear of a PixCell-256 block (diffusers' PixArt `BasicTransformerBlock`): the possible LoRA targets."""


def parse_block_spec(spec: str, num_blocks: int) -> tuple[int, ...]:
    """Turn a CLI block selection ("all", "0-13", "0-3,10,20-27") into sorted unique block indices."""
    valid = f"valid blocks are 0-{num_blocks - 1}"
    if spec.strip().lower() == "all":
        return tuple(range(num_blocks))
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if m is None:
            raise ValueError(
                f"bad block spec part {part!r} in {spec!r}: expected 'all', 'N' or 'N-M' separated by commas; {valid}"
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if lo > hi:
            raise ValueError(f"bad block spec part {part!r} in {spec!r}: range start > end; {valid}")
        if hi >= num_blocks:
            raise ValueError(f"bad block spec part {part!r} in {spec!r}: out of range; {valid}")
        out.update(range(lo, hi + 1))
    return tuple(sorted(out))


def block_rank_pattern(spec: str | None, num_blocks: int) -> dict[str, int]:
    """Per-block ranks from the CLI ("0-13=16,14-27=4") as `LoRAConfig.rank_pattern` regexes over block names.

    Each entry is `BLOCKS=RANK` with BLOCKS a single block or a range; entries are separated by commas.
    """
    if not spec:
        return {}
    pattern: dict[str, int] = {}
    for entry in spec.split(","):
        blocks, _, rank = entry.partition("=")
        if not rank.strip().isdigit() or int(rank) < 1:
            raise ValueError(f"bad per-block rank {entry!r} in {spec!r}: expected 'N=RANK' or 'N-M=RANK'")
        indices = "|".join(str(i) for i in parse_block_spec(blocks, num_blocks))
        pattern[rf"transformer_blocks\.({indices})\..*"] = int(rank)
    return pattern
