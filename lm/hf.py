"""Loading Hugging Face causal LMs and tokenizers from a name, a local directory or a config dict.

Every module in this package builds its language models through :func:`load_causal_lm` and
:func:`lm.tokenizers.load_tokenizer`, so a YAML config can say any of::

    model: meta-llama/Llama-3.2-1B          # a hub name (needs the files in the local HF cache)
    model: /path/to/exported/model          # a directory written by ``save_pretrained``
    model: {model_type: llama, hidden_size: 64, num_hidden_layers: 2, ...}   # a tiny random model
    model: smollm2-135m-instruct            # an alias (lm/model_aliases.py), converted locally once

Without a tokenizer the default is byte-level (``ByT5Tokenizer(extra_ids=0)``): 256 bytes plus
pad/eos/unk, no files needed.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from lm.model_aliases import resolve_model_alias
from lm.tokenizers import is_local, offline

ModelSpec = str | dict[str, Any]

#: A Llama-style configuration small enough for CPU tests; override any field in YAML.
TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Map ``"bf16"``/``"bfloat16"``/... (or a ``torch.dtype``) to a ``torch.dtype``; ``None`` stays ``None``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(_DTYPES)}") from None


def check_attention_heads(config: dict[str, Any], given: dict[str, Any]) -> None:
    """Raise a ``ValueError`` naming the fields when a config dict's attention shape cannot work:
    ``hidden_size`` must be a multiple of ``num_attention_heads``, and ``num_attention_heads`` a multiple of
    ``num_key_value_heads`` (grouped-query attention). ``given`` is the user's dict: a value it left out is named
    as the default it came from (:data:`TINY_LLAMA`), e.g. ``num_key_value_heads`` 4 under 2 heads."""
    def named(key: str) -> str:
        return f"{key} {config[key]}" + ("" if key in given else " (the default: the dict does not set it)")

    hidden, heads, kv = (config.get(k) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads"))
    if isinstance(heads, int) and heads < 1:
        raise ValueError(f"model config: num_attention_heads must be >= 1, got {heads}")
    if isinstance(hidden, int) and isinstance(heads, int) and hidden % heads:
        raise ValueError(f"model config: hidden_size {hidden} is not a multiple of {named('num_attention_heads')}")
    if isinstance(heads, int) and isinstance(kv, int) and (kv < 1 or heads % kv):
        raise ValueError(f"model config: num_attention_heads {heads} is not a multiple of "
                         f"{named('num_key_value_heads')}; set num_key_value_heads to a divisor of {heads}")


def check_vocabulary_fits(lm: PreTrainedModel, vocab_size: int | None, model: ModelSpec) -> None:
    """Raise a ``ValueError`` naming both sizes when the tokenizer (``vocab_size`` = ``len(tokenizer)``) has ids
    beyond the model's input embedding: those ids would fail deep inside the model (``index out of range``)."""
    embedding = lm.get_input_embeddings()
    rows = getattr(embedding, "num_embeddings", None)
    if vocab_size is not None and rows is not None and vocab_size > rows:
        name = model if isinstance(model, str) else "the config dict"
        raise ValueError(f"the tokenizer has {vocab_size} tokens but the model ({name}) embeds only {rows}: use the "
                         f"model's own tokenizer, or a model whose vocab_size is at least {vocab_size}")


def load_causal_lm(model: ModelSpec, vocab_size: int | None = None, dtype: str | torch.dtype | None = None,
                   seed: int | None = None) -> PreTrainedModel:
    """Build a causal LM (see :func:`_build_causal_lm`); with ``vocab_size`` (the tokenizer's size) check that the
    model embeds every token id (:func:`check_vocabulary_fits`)."""
    lm = _build_causal_lm(model, vocab_size, dtype, seed)
    check_vocabulary_fits(lm, vocab_size, model)
    return lm


def _build_causal_lm(model: ModelSpec, vocab_size: int | None = None, dtype: str | torch.dtype | None = None,
                     seed: int | None = None) -> PreTrainedModel:
    """Build a causal LM from a hub name, a local ``save_pretrained`` directory or a config dict.

    For a config dict, ``model_type`` picks the architecture (default ``llama``) and missing fields come
    from :data:`TINY_LLAMA`; ``vocab_size`` (usually ``len(tokenizer)``) fills the vocabulary size when the
    dict leaves it out. ``seed`` makes the random initialisation of a config-dict model reproducible.
    """
    torch_dtype = resolve_dtype(dtype)
    if isinstance(model, dict):
        fields = dict(model)
        model_type = fields.pop("model_type", "llama")
        base = TINY_LLAMA if model_type == "llama" else {}
        merged = {k: v for k, v in base.items() if k != "model_type"} | fields
        if "vocab_size" not in merged:
            if vocab_size is None:
                raise ValueError("model config dict has no 'vocab_size' and no tokenizer size was given")
            merged["vocab_size"] = vocab_size
        merged.setdefault("pad_token_id", 0)
        merged.setdefault("eos_token_id", 1)
        merged.setdefault("bos_token_id", None)
        check_attention_heads(merged, fields)
        config = AutoConfig.for_model(model_type, **merged)
        if seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                lm = AutoModelForCausalLM.from_config(config)
        else:
            lm = AutoModelForCausalLM.from_config(config)
        return lm.to(torch_dtype) if torch_dtype is not None else lm
    if not isinstance(model, str):
        raise TypeError(f"model must be a name, a path or a config dict, got {type(model).__name__}")
    model = resolve_model_alias(model)
    if is_local(model) and not (Path(model) / "config.json").exists():
        raise FileNotFoundError(f"model directory {model!r} has no config.json (expected a save_pretrained export)")
    kwargs = {"local_files_only": is_local(model) or offline()}
    if torch.empty(0).is_meta:  # under `with torch.device("meta")`: the architecture only, no weights read
        config = AutoConfig.from_pretrained(model, **kwargs)
        return AutoModelForCausalLM.from_config(config, dtype=torch_dtype or config.dtype).train()
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    # from_pretrained returns eval mode and Lightning keeps submodules' modes: a model loaded to be trained
    # must train with its dropout; frozen teachers/references call .eval() themselves.
    return AutoModelForCausalLM.from_pretrained(model, **kwargs).train()


def keep_layers(model: PreTrainedModel, layers: list[int], name: str = "layers") -> PreTrainedModel:
    """Keep only the decoder layers ``layers`` (indices into the model's layer stack, strictly increasing) of
    ``model``, in place: the usual distillation initialisation of a smaller student from its teacher (DistilBERT,
    Sanh et al. 2019 §3: "taking one layer out of two"; Gu et al. 2024's students share the teacher's tokenizer).

    The embeddings, final norm and LM head are kept whole; the kept layers are re-indexed 0..k−1 (their
    attention's ``layer_idx``, which addresses the KV cache) and the config says ``num_hidden_layers = k`` (and
    keeps the matching ``layer_types`` entries when the architecture has them), so the result generates with a
    cache and round-trips through ``save_pretrained``. Dropping layer i is the same as making it the identity:
    a residual block whose output projections are zero. ``name`` labels the argument in errors."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    stack = getattr(decoder, "layers", None)
    if not isinstance(stack, torch.nn.ModuleList):
        raise ValueError(f"{name}: {type(model).__name__} has no decoder layer list (model.get_decoder().layers) "
                         "to take layers from")
    n = len(stack)
    layers = [int(i) for i in layers]
    if not layers or any(b <= a for a, b in zip(layers, layers[1:])) or layers[0] < 0 or layers[-1] >= n:
        raise ValueError(f"{name}: expected a non-empty, strictly increasing list of layer indices in [0, {n - 1}] "
                         f"(the model has {n} layers), got {layers}")
    kept = torch.nn.ModuleList(stack[i] for i in layers)
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    decoder.layers = kept
    config = model.config
    if isinstance(getattr(config, "layer_types", None), list) and len(config.layer_types) == n:
        config.layer_types = [config.layer_types[i] for i in layers]
    config.num_hidden_layers = len(layers)
    return model


def save_pretrained_with_tokenizer(model: PreTrainedModel, tokenizer, path: str | Path) -> Path:
    """``save_pretrained`` ``model`` and ``tokenizer`` into ``path`` (loadable again by :func:`load_causal_lm`).

    Written into ``<path>.partial`` and renamed when complete, so an interrupted save never leaves a directory
    that looks finished (an older export at ``path`` is replaced only then).
    """
    path = Path(path)
    partial, old = path.with_name(path.name + ".partial"), path.with_name(path.name + ".old")
    for leftover in (partial, old):
        shutil.rmtree(leftover, ignore_errors=True)
    partial.mkdir(parents=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if path.exists():
        path.rename(old)
    partial.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def check_same_vocabulary(a: PreTrainedModel, b: PreTrainedModel, names: tuple[str, str] = ("student", "teacher")):
    """Raise a clear ``ValueError`` when two models cannot be compared token by token."""
    va, vb = a.get_output_embeddings().weight.shape[0], b.get_output_embeddings().weight.shape[0]
    if va != vb:
        raise ValueError(f"{names[0]} vocabulary size {va} != {names[1]} vocabulary size {vb}: "
                         "both models must share one tokenizer/vocabulary")
