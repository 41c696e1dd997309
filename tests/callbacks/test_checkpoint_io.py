"""Checkpoints are complete or absent; a file that is not a checkpoint is named as such (issue 24 items 6, 9)."""

import errno
import resource
import signal
from contextlib import contextmanager

import pytest
import torch

from callbacks.checkpoint_io import (
    AtomicCheckpointIO,
    CheckpointWriteError,
    CorruptCheckpointError,
    check_checkpoint_file,
)


@contextmanager
def file_size_limit(n_bytes: int):
    """Files this process writes may not grow past ``n_bytes`` (a full disk, as the writer sees it): a write
    past it fails with EFBIG instead of the default SIGXFSZ."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def _checkpoint(value: float) -> dict:
    return {"state_dict": {"w": torch.full((64, 1024), value)}, "global_step": int(value)}


def test_a_failed_write_keeps_the_previous_checkpoint_and_names_path_and_free_space(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(_checkpoint(1.0), path)
    with file_size_limit(64 * 1024), pytest.raises(CheckpointWriteError) as error:
        io.save_checkpoint(_checkpoint(2.0), path)
    assert error.value.errno == errno.EFBIG
    assert str(path) in str(error.value) and "free there" in str(error.value) and "unchanged" in str(error.value)
    assert torch.load(path, weights_only=True)["global_step"] == 1  # the previous one, whole
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", "truncated"])
def test_unreadable_files_are_named_without_suggesting_unsafe_loading(tmp_path, content):
    path = tmp_path / "x.ckpt"
    if content == "truncated":
        torch.save(_checkpoint(1.0), path)
        content = path.read_bytes()[:5000]
    path.write_bytes(content)
    with pytest.raises(CorruptCheckpointError) as error:
        check_checkpoint_file(path)
    assert str(error.value).startswith(f"checkpoint file {path} is corrupt or not a Lightning checkpoint")
    assert "weights_only" not in str(error.value)


def test_a_torch_file_without_state_dict_is_not_a_lightning_checkpoint(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "w.pt")
    with pytest.raises(CorruptCheckpointError, match="has no 'state_dict'"):
        check_checkpoint_file(tmp_path / "w.pt")
    torch.save(_checkpoint(1.0), tmp_path / "ok.ckpt")
    check_checkpoint_file(tmp_path / "ok.ckpt")
