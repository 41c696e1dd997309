"""Model aliases: short names for real pretrained models that are built locally on first use."""

from __future__ import annotations

import functools
import os
from pathlib import Path


def resolve_model_alias(name: str) -> str:
    """The local directory an alias stands for (made on first use); any other name unchanged, after
    :func:`check_model_source` (a name that is neither a local directory nor a hub model fails at once)."""
    check_model_source(name)
    return name


def check_model_source(name: str) -> None:
    """Raise ``FileNotFoundError`` naming ``name`` unless it can be loaded: ``"byte"``, an existing directory, or a
    hub id in the local Hugging Face cache or (online) on the hub. A name spelled as a path (``./x``, ``/x``,
    ``~/x``, more than one ``/``, or whose first folder exists here) must exist locally: it is never sent to the
    hub, where a mistyped path used to cost a minute of network retries and an error that did not name it."""
    if name == "byte" or os.path.isdir(name):
        return
    parts = Path(name).parts
    if name.startswith((".", "/", "~")) or len(parts) > 2 or (len(parts) > 1 and os.path.isdir(parts[0])):
        raise FileNotFoundError(f"model path {name!r} does not exist (no directory {Path(name).expanduser().absolute()})")
    reason = _hub_lookup_failure(name)
    if reason:
        raise FileNotFoundError(f"model {name!r} is neither a local directory (no {Path(name).absolute()}) nor a "
                                f"Hugging Face Hub model: {reason}")


@functools.lru_cache(maxsize=None)
def _hub_lookup_failure(name: str) -> str | None:
    """Why the hub id ``name`` cannot be loaded, or ``None``: found in the local cache, or (online) on the hub."""
    from huggingface_hub import model_info, try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(name, f), str) for f in ("config.json", "tokenizer_config.json")):
        return None
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return "not in the local cache and HF_HUB_OFFLINE is set"
    try:
        model_info(name, timeout=10)
    except Exception as e:  # no network, no such repository, no access: all mean it cannot be loaded
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None
