"""Checkpoints that are either complete or absent, and a clear message for a file that is not a checkpoint.

- :class:`AtomicCheckpointIO` writes a checkpoint to a temporary name in the destination folder, flushes it to
  disk (``fsync``) and renames it over the destination, so a full disk, a quota or a crash mid-write never
  leaves a truncated ``last.ckpt`` under a valid name: the previous file stays as it was. A failed write raises
  :class:`CheckpointWriteError` naming the path and the free space. :class:`callbacks.LastCheckpoint` installs
  it on the trainer's strategy (so ``litpapers fit`` uses it for every checkpoint it writes).
- :func:`check_checkpoint_file` reads a ``--ckpt_path`` safely (``weights_only``) and raises
  :class:`CorruptCheckpointError` ("checkpoint file X is corrupt or not a Lightning checkpoint") when it cannot.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, file-size limit, permissions)."""


class CorruptCheckpointError(ValueError):
    """A file given as a checkpoint cannot be read as one."""


def _size(n: float) -> str:
    """``n`` bytes as a short human-readable size (``12.3 MiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # unreachable


def free_space(folder: Path) -> str:
    """The free space on ``folder``'s file system, or ``unknown``."""
    try:
        return _size(shutil.disk_usage(folder).free)
    except OSError:
        return "unknown"


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, ``fsync`` and rename: ``path`` holds
    either its previous content or all of ``data``. On failure the temporary file is removed and
    :class:`CheckpointWriteError` names ``path`` and the free space."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        kept = "; the previous file there is unchanged" if path.exists() else ""
        error = CheckpointWriteError(f"could not write {path}: {e.strerror or e} "
                                     f"({free_space(path.parent)} free there){kept}")
        error.errno = e.errno
        raise error from None
    _fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`~lightning.fabric.plugins.io.TorchCheckpointIO` whose local saves are atomic
    (:func:`write_atomically`); remote paths (``s3://`` ...) are saved as Lightning does."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomically(buffer.getbuffer(), path)


def use_atomic_checkpoints(strategy: Any) -> None:
    """Give ``strategy`` an :class:`AtomicCheckpointIO` when it uses Lightning's plain ``TorchCheckpointIO``
    (a strategy or plugin with its own checkpoint IO, e.g. sharded or XLA, is left alone)."""
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


#: What ``torch.load`` raises on a truncated, damaged or foreign file.
_UNREADABLE = (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, zipfile.BadZipFile, KeyError,
               AttributeError, ImportError, IndexError, OSError)


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Raise :class:`CorruptCheckpointError` when ``path`` (an existing local file) cannot be read safely
    (``torch.load(weights_only=True)``, memory-mapped: nothing is copied) or holds no ``state_dict``. The message
    never suggests unpickling the file unsafely: it may not be trusted."""
    prefix = f"checkpoint file {path} is corrupt or not a Lightning checkpoint"
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise  # the file is not there or not ours to read: that message is already clear
    except _UNREADABLE as e:
        why = ("truncated, or not written by torch.save" if not zipfile.is_zipfile(path)
               else f"unreadable: {type(e).__name__}")
        raise CorruptCheckpointError(f"{prefix} ({why})") from None
    if not isinstance(loaded, dict) or "state_dict" not in loaded:
        raise CorruptCheckpointError(f"{prefix} (it has no 'state_dict')")
