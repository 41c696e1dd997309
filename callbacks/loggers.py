"""Loggers whose ``version_N`` folder is claimed atomically, so two runs started together never share one.

Lightning's ``TensorBoardLogger``/``CSVLogger`` pick ``version_N`` as one more than the largest existing folder,
but create it only when the first file is written: two ``litpapers fit`` of the same config started at the same
time both pick ``version_0`` and then overwrite each other's ``config.yaml`` and ``last.ckpt``. These subclasses
create the folder with ``os.mkdir`` (which fails if it exists) and move on to the next number when another
process got there first. ``litpapers fit`` uses them in place of Lightning's classes (``training/cli.py``); in your own
Lightning code use them instead of Lightning's.
"""

from __future__ import annotations

import os

from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only


def claim_version_dir(root_dir: str, first: int = 0) -> int:
    """Create ``root_dir/version_N`` for the smallest ``N >= first`` whose folder does not exist yet, atomically
    (``os.mkdir`` fails on an existing folder, also one another process created a moment ago), and return ``N``."""
    os.makedirs(root_dir, exist_ok=True)
    version = first
    while True:
        try:
            os.mkdir(os.path.join(root_dir, f"version_{version}"))
            return version
        except FileExistsError:
            version += 1


class _ClaimsVersion:
    """Mixin for a Lightning logger with ``root_dir``, ``_fs`` and ``_get_next_version``: the next version's
    folder is claimed (:func:`claim_version_dir`) on rank 0 of a local file system; other ranks (which never write
    logs: Lightning broadcasts rank 0's folder) and remote file systems keep Lightning's behaviour."""

    def _get_next_version(self) -> int:
        first = super()._get_next_version()
        if rank_zero_only.rank != 0 or not _is_local_file_protocol(self.root_dir):
            return first
        return claim_version_dir(self.root_dir, first)


class VersionedTensorBoardLogger(_ClaimsVersion, TensorBoardLogger):
    """:class:`~lightning.pytorch.loggers.TensorBoardLogger` that claims its ``version_N`` folder atomically."""


class VersionedCSVLogger(_ClaimsVersion, CSVLogger):
    """:class:`~lightning.pytorch.loggers.CSVLogger` that claims its ``version_N`` folder atomically."""


#: Lightning's logger classes (as a config may name them) -> the subclass ``litpapers`` uses instead.
VERSIONED_LOGGERS = {
    "lightning.pytorch.loggers.TensorBoardLogger": "callbacks.loggers.VersionedTensorBoardLogger",
    "lightning.pytorch.loggers.tensorboard.TensorBoardLogger": "callbacks.loggers.VersionedTensorBoardLogger",
    "TensorBoardLogger": "callbacks.loggers.VersionedTensorBoardLogger",
    "lightning.pytorch.loggers.CSVLogger": "callbacks.loggers.VersionedCSVLogger",
    "lightning.pytorch.loggers.csv_logs.CSVLogger": "callbacks.loggers.VersionedCSVLogger",
    "CSVLogger": "callbacks.loggers.VersionedCSVLogger",
}
