"""Writes that are complete or absent: a killed run never leaves a truncated file or a folder that looks done.

Every writer in the package goes through here. A file is written under a hidden temporary name in the same folder
(so the rename stays on one file system), flushed to disk, then renamed over the target; a write that fails removes
its temporary. A folder is built whole under a hidden temporary name, its files flushed, then renamed into place.
The temporary of a file is named `.<name>.<pid>.tmp` after the writing process, so a sweep can tell a killed
writer's leftover from a live one's (see `remove_stale_temporaries`).
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _file_mode() -> int:
    """What `open` gives a new file under the process's umask (0644 usually). Some writers (safetensors) create
    0600 files, which others on shared storage could not read beside the 0644 files of the same run."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _replace_file(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills the temporary; it is flushed and renamed over `path`, or removed if anything fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> None:
    _replace_file(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomically(path, text.encode())


def write_json_atomically(path: str | os.PathLike, payload: dict) -> None:
    write_text_atomically(path, json.dumps(payload, indent=2, sort_keys=True, default=str))


def write_png_atomically(path: str | os.PathLike, image: np.ndarray | Image.Image) -> None:
    """A uint8 HWC array or a PIL image, encoded in memory first."""
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, format="PNG")
    write_bytes_atomically(path, buffer.getvalue())


def save_safetensors_atomically(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """`safetensors.torch.save_file`, but complete or absent (adapters, LoRA weights and feature shards)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        _replace_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    except SafetensorError as error:
        if "os error 28" not in str(error):
            raise
        # safetensors reports a full disk as its own error type: say it the way every other writer does
        raise OSError(errno.ENOSPC, f"No space left on device writing '{path}'") from error


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, name: str) -> list[Path]:
    """Delete the temporaries of `folder/name` left by killed writers (their pid no longer runs); returns them.

    A kill between a write and its rename leaves the temporary behind and nothing else would ever remove it; a
    live process's write in progress is kept.
    """
    removed = []
    prefix = f".{name}."
    for tmp in Path(folder).glob(f"{prefix}*.tmp"):
        pid = tmp.name[len(prefix) : -len(".tmp")]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            _fsync_file(path)


def replace_folder(built: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move a fully built folder over `target` (replacing it), its files flushed to disk first.

    A kill before the rename leaves `target` as it was; the window between removing an old `target` and the rename
    cannot be closed for folders, so callers name their temporaries so that it is never taken for a complete one.
    """
    built, target = Path(built), Path(target)
    _fsync_tree(built)
    if target.exists():
        shutil.rmtree(target)
    os.replace(built, target)
    return target


def write_folder_once(target: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Build a folder under a temporary name and rename it, so a killed write never leaves a folder that looks done.

    An existing folder is kept. Several processes of one launch may race to write the same folder: the first rename
    wins, the others discard their copy.
    """
    target = Path(target)
    if target.exists():
        return target
    tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writer(tmp)
        _fsync_tree(tmp)
        os.replace(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
