"""Training the built-in checkpoints that the MiniLLM and QDPO configs start from (which they are:
:data:`lit_modules.builtin_checkpoints.BUILT_IN`), the explicit step before a run that needs one.

``litpapers fit|validate|test`` calls :func:`ensure_built_in` for every model argument that names one
(``LitPapersCLI._train_missing_built_ins``), so that ``litpapers fit --config configs/minillm/base.yaml`` (or
``smollm2.yaml``) works on a fresh clone, like the RADT datasets that are generated on first use; benchmarks call it
themselves. A missing one (no finished export yet) is trained with its config in a separate process (``python -m
training fit --config ...``, the LightningCLI of this floor), with a line saying so. A file lock makes parallel
processes (DDP ranks, several runs) train it once; the others wait and then load it. The training run's logs
(TensorBoard, its ``config.yaml``) go beside the checkpoints, under ``checkpoints/logs/<config stem>/version_N``
(:func:`training_log_dir`), not into the working directory's ``logs/``: a run that needed a built-in checkpoint
writes nothing outside its own output folder and ``checkpoints/``.

An interrupted training run resumes: the run keeps a ``last.ckpt`` in its log folder while it trains (checkpointing
is switched on for it), the next :func:`ensure_built_in` continues from the newest one (:func:`resume_checkpoint`,
exact resume as for any ``litpapers fit``), and once the export is complete the training checkpoints are deleted
(they exist only to resume).

The training process dies with the process that started it (Linux: ``prctl(PR_SET_PDEATHSIG)``), and it holds
the lock itself (the locked file descriptor is passed to it), so a killed run leaves neither an orphan training
into the folder nor a free lock while something still writes there.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from lit_modules.builtin_checkpoints import built_in_config, is_finished_export

ROOT = Path(__file__).resolve().parents[1]
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when this process dies (Linux ``prctl``), or ``None``
    on other systems. It also exits at once if this process already died between ``fork`` and ``prctl``."""
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()

    def preexec() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


@contextlib.contextmanager
def exclusive_lock(path: str | Path) -> Iterator[int]:
    """Hold an exclusive ``flock`` on ``path`` for the block and yield its file descriptor; a child given that
    descriptor (``pass_fds``) holds the lock too, until every holder has closed it or died."""
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield f.fileno()
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def training_log_dir(spec: str | Path) -> Path:
    """Where the training run of the built-in checkpoint ``spec`` logs: ``logs`` beside it
    (``checkpoints/minillm_teacher`` -> ``checkpoints/logs``). Not inside ``spec`` itself: the export replaces that
    folder as a whole when it is written."""
    return Path(spec).parent / "logs"


def resume_checkpoint(spec: str | Path, config: str | Path) -> Path | None:
    """The newest ``last.ckpt`` that an interrupted training run of ``spec`` (with ``config``, whose stem names the
    run) left under :func:`training_log_dir`, or None."""
    found = (training_log_dir(spec) / Path(config).stem).glob("version_*/checkpoints/last.ckpt")
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def remove_training_checkpoints(spec: str | Path, config: str | Path) -> None:
    """Delete the ``checkpoints/`` folders of ``spec``'s training runs (their logs stay): the export is complete."""
    for folder in (training_log_dir(spec) / Path(config).stem).glob("version_*/checkpoints"):
        shutil.rmtree(folder, ignore_errors=True)


def ensure_built_in(spec: object, *overrides: str) -> None:
    """Train the built-in checkpoint ``spec`` names if it is missing (see the module docstring); else nothing.

    ``overrides`` are extra ``litpapers fit`` arguments (tests shorten the run with them). A failed training run
    raises ``RuntimeError`` naming the command, which can then be run by hand.
    """
    config = built_in_config(spec)
    if config is None or is_finished_export(spec) or not (ROOT / config).is_file():
        return
    Path(spec).parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(f"{spec}.lock") as lock_fd:
        if is_finished_export(spec):  # another process made it while this one waited
            return
        command = [sys.executable, "-m", "training", "fit", "--config", str(ROOT / config), "--trainer.devices", "1",
                   "--trainer.logger.init_args.save_dir", str(training_log_dir(spec)),
                   "--trainer.enable_checkpointing", "true", *overrides]
        resume = resume_checkpoint(spec, config)
        if resume is not None:
            command += ["--ckpt_path", str(resume)]
            print(f"{spec}: resuming its interrupted training from {resume}", flush=True)
        print(f"{spec} not found: training it first with `litpapers fit --config {config}` (a few minutes on a CPU; "
              f"its logs go to {training_log_dir(spec)})", flush=True)
        done = subprocess.run(command, check=False, preexec_fn=die_with_parent(), pass_fds=(lock_fd,))
        if done.returncode != 0 or not is_finished_export(spec):
            raise RuntimeError(f"training the built-in checkpoint {spec} failed (exit code {done.returncode}); "
                               f"run it by hand to see why: litpapers fit --config {config}")
        remove_training_checkpoints(spec, config)
