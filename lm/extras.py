"""Optional dependencies: one clear error naming the ``pip install`` to run when an extra is missing.

The core install (``pip install litpapers``) runs the language-model papers. RADT/DT need the ``rl`` extra
(gymnasium + MuJoCo, minari, h5py), QDPO the ``quant`` extra (torchao), reading Hugging Face datasets saved
with ``save_to_disk`` the ``data`` extra (datasets), the benchmark anchors the ``bench`` extra (trl,
pytorch-optimizer). Code that needs one of them imports it through :func:`require` at the point of use::

    gym = require("gymnasium", "rl")
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = ("rl", "quant", "data", "bench")
"""The optional-dependency groups of ``pyproject.toml`` that :func:`require` may name."""


def require(module_name: str, extra: str) -> ModuleType:
    """Import and return ``module_name``; if it (or one of its own dependencies) is not installed, raise
    :class:`ModuleNotFoundError` naming the command that installs it: ``pip install 'litpapers[<extra>]'``.

    Raises:
        ValueError: ``extra`` is not one of :data:`EXTRAS`.
        ModuleNotFoundError: the module cannot be imported (the original error is chained).
    """
    if extra not in EXTRAS:
        raise ValueError(f"require({module_name!r}, extra={extra!r}): extra must be one of {list(EXTRAS)}")
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"{module_name} is needed here but could not be imported ({err}). It comes with the "
            f"'{extra}' extra: pip install 'litpapers[{extra}]'", name=err.name) from err
