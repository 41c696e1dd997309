"""The built-in checkpoints that the MiniLLM and QDPO configs start from, trained on first use.

``configs/minillm/teacher_sft.yaml`` writes ``checkpoints/minillm_teacher`` (MiniLLM's teacher and QDPO's
full-precision model) and ``configs/minillm/sft.yaml`` writes ``checkpoints/minillm_student_sft`` (the student
every MiniLLM row starts from). When a module is given one of these two default paths (relative to the working
directory, as in the shipped configs) and it does not hold a finished export yet, :func:`ensure_built_in`
trains it first with its config in a separate ``litpapers fit`` process (a few minutes on a CPU), so that
``litpapers fit --config configs/minillm/minillm.yaml`` works on a fresh clone, like the RADT datasets that are
generated on first use. A file lock makes parallel processes (DDP ranks, several runs) train it once; the
others wait and then load it. Any other path is loaded as given.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from filelock import FileLock

ROOT = Path(__file__).resolve().parents[1]
BUILT_IN = {"checkpoints/minillm_teacher": "configs/minillm/teacher_sft.yaml",
            "checkpoints/minillm_student_sft": "configs/minillm/sft.yaml"}
log = logging.getLogger(__name__)


def is_finished_export(path: str | Path) -> bool:
    """Whether ``path`` holds a complete ``save_pretrained`` export (config and weights)."""
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def ensure_built_in(spec: object, *overrides: str) -> None:
    """Train the built-in checkpoint ``spec`` names if it is missing (see the module docstring); else nothing.

    ``overrides`` are extra ``litpapers fit`` arguments (tests shorten the run with them). A failed training run
    raises ``RuntimeError`` naming the command, which can then be run by hand.
    """
    config = BUILT_IN.get(os.path.normpath(spec)) if isinstance(spec, str) else None
    if config is None or is_finished_export(spec) or not (ROOT / config).is_file():
        return
    Path(spec).parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{spec}.lock"):
        if is_finished_export(spec):  # another process made it while this one waited
            return
        command = [sys.executable, "-m", "cli", "fit", "--config", str(ROOT / config), "--trainer.devices", "1",
                   *overrides]
        log.warning("%s not found: training it first with `litpapers fit --config %s` (a few minutes on a CPU)",
                    spec, config)
        done = subprocess.run(command, check=False)
        if done.returncode != 0 or not is_finished_export(spec):
            raise RuntimeError(f"training the built-in checkpoint {spec} failed (exit code {done.returncode}); "
                               f"run it by hand to see why: litpapers fit --config {config}")
