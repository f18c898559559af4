"""Writes that are complete or absent: a killed run never leaves a truncated PNG, JSON or text file.

Each file is written under a hidden temporary name in the same folder (so the rename stays on one file system),
flushed to disk, then renamed over the target.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomically(path, text.encode())


def write_json_atomically(path: str | os.PathLike, payload: dict) -> None:
    write_text_atomically(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


def write_png_atomically(path: str | os.PathLike, image: np.ndarray | Image.Image) -> None:
    """A uint8 HWC array or a PIL image, encoded in memory first."""
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, format="PNG")
    write_bytes_atomically(path, buffer.getvalue())
