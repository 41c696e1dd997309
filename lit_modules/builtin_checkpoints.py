"""The built-in checkpoints that the MiniLLM and QDPO configs start from: which they are, and a clear error when one
is missing. This floor only loads them; they are trained by an explicit step.

``configs/minillm/teacher_sft.yaml`` writes ``checkpoints/minillm_teacher`` (MiniLLM's teacher and QDPO's
full-precision model) and ``configs/minillm/sft.yaml`` writes ``checkpoints/minillm_student_sft`` (the student
every MiniLLM row starts from); ``configs/minillm/smollm2_teacher_sft.yaml`` and ``smollm2_sft.yaml`` write the
same two for MiniLLM on SmolLM2-135M-Instruct (``checkpoints/smollm2_teacher_sft``, ``checkpoints/smollm2_student_sft``;
tens of CPU minutes). ``litpapers fit`` trains the missing ones a config names before it builds the model
(:mod:`training.builtin_checkpoints`), so ``litpapers fit --config configs/minillm/base.yaml`` works on a fresh
clone; a module constructed in your own code with one of these default paths (relative to the working directory, as
in the shipped configs) that holds no finished export raises :func:`require_built_in`'s error naming the step.
Any other path is loaded as given.
"""

from __future__ import annotations

import os
from pathlib import Path

BUILT_IN = {"checkpoints/minillm_teacher": "configs/minillm/teacher_sft.yaml",
            "checkpoints/minillm_student_sft": "configs/minillm/sft.yaml",
            # MiniLLM on SmolLM2-135M-Instruct (`make real`): its SFT teacher and the layer-subset SFT student
            "checkpoints/smollm2_teacher_sft": "configs/minillm/smollm2_teacher_sft.yaml",
            "checkpoints/smollm2_student_sft": "configs/minillm/smollm2_sft.yaml"}
#: the built-in checkpoints that ``make minillm`` trains (with the MiniLLM row after them)
MAKE_MINILLM = ("checkpoints/minillm_teacher", "checkpoints/minillm_student_sft")


def is_finished_export(path: str | Path) -> bool:
    """Whether ``path`` holds a complete ``save_pretrained`` export (config and weights)."""
    path = Path(path)
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def built_in_config(spec: object) -> str | None:
    """The config that trains ``spec`` if it names a built-in checkpoint (:data:`BUILT_IN`), else None."""
    return BUILT_IN.get(os.path.normpath(spec)) if isinstance(spec, str) else None


def require_built_in(spec: object) -> None:
    """Raise ``FileNotFoundError`` naming the step that makes it when ``spec`` is a built-in checkpoint's default path
    that holds no finished export yet; else nothing (any other path is the loader's to check)."""
    config = built_in_config(spec)
    if config is None or is_finished_export(spec):
        return
    also = " (or `make minillm`)" if os.path.normpath(spec) in MAKE_MINILLM else ""
    raise FileNotFoundError(f"{spec} is a built-in checkpoint that is not trained yet: make it first with "
                            f"`litpapers fit --config {config}`{also}; `litpapers fit` with a config that names it "
                            f"trains it first by itself")
