"""Weight-only integer quantization of Hugging Face causal LMs with torchao: fake quantization for
quantization-aware training (QAT), real low-bit weights for export, and the round-to-nearest (RTN) baseline.

One quantizer everywhere — symmetric round-to-nearest per group of ``group_size`` input columns (or per
output row when ``group_size`` is ``None``) at ``bits`` ∈ {2..8}::

    scale_g = max_{i∈g} |w_i| / ((2^bits − 1) / 2)
    q_i     = clamp(round(w_i / scale_g), −2^(bits−1), 2^(bits−1) − 1)
    Q(w)_i  = q_i · scale_g                              so |w_i − Q(w)_i| ≤ scale_g / 2

- :func:`prepare_qat` swaps every quantized ``nn.Linear`` for torchao's ``FakeQuantizedLinear``
  (``quantize_(model, QATConfig(weight_config=IntxFakeQuantizeConfig(...), step="prepare"))``): the forward
  uses Q(w), the backward is the straight-through estimator ∂L/∂w := ∂L/∂Q(w) onto the latent fp weights,
  clipped as torchao does: zero where round(w/scale) fell outside the integer range — only a group's positive
  maximum can (max/scale = (2^bits − 1)/2 may round up to 2^(bits−1)), depending on float rounding.
- :func:`convert_qat` turns those layers into ``nn.Linear`` with real quantized weights
  (``QATConfig(IntxWeightOnlyConfig(...), step="convert")``: torchao's ``IntxUnpackedToInt8Tensor`` — the
  integer codes stored one per int8 byte plus fp32 per-group scales; it runs on CPU and GPU by dequantizing
  in the matmul). torchao's ``Int4WeightOnlyConfig`` (packed int4) needs CUDA kernels, hence this format.
  The converted model computes exactly the fake-quantized forward (checked in the tests).
- :func:`quantize_rtn` = prepare + convert with no training: the post-training RTN baseline.
- :func:`save_quantized` writes a converted model with ``save_pretrained`` (safetensors + a
  ``TorchAoConfig`` in ``config.json``); ``AutoModelForCausalLM.from_pretrained(dir)`` loads it back as
  quantized weights when torchao is installed (no ``weights_only=False`` needed).

Only the symmetric mapping is offered: torchao 0.18's asymmetric per-group fake quantizer does not reproduce
its own asymmetric convert numerics (measured: up to 0.1 max abs output difference at int4), so QAT with it
would train against a different quantizer than the one exported.

Supported layers: ``torch.nn.Linear`` and GPT-2's ``transformers.pytorch_utils.Conv1D`` (converted to an
equivalent ``nn.Linear`` first). Embeddings and norms stay in full precision, as does ``lm_head`` unless
``include_lm_head``. Any other layer holding a ≥2-D weight raises an error naming it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from lm.extras import require

SUPPORTED_BITS = tuple(range(2, 9))


def _check_spec(bits: int, group_size: int | None) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported: weight-only quantization here takes bits in "
                         f"{SUPPORTED_BITS[0]}..{SUPPORTED_BITS[-1]} (torchao IntxWeightOnlyConfig)")
    if group_size is not None and group_size < 2:
        raise ValueError(f"group_size must be >= 2 or None (per output channel), got {group_size}")


def quantization_tag(bits: int, group_size: int | None, include_lm_head: bool = False) -> str:
    """A short name for the quantizer, e.g. ``"int4-g32"`` / ``"int8-perchannel+lm_head"`` (cache keys, logs)."""
    _check_spec(bits, group_size)
    tag = f"int{bits}-" + (f"g{group_size}" if group_size else "perchannel")
    return tag + ("+lm_head" if include_lm_head else "")


def _granularity(group_size: int | None):
    granularity = require("torchao.quantization.granularity", "quant")
    return granularity.PerGroup(group_size) if group_size else granularity.PerAxis(0)


def weight_only_config(bits: int, group_size: int | None):
    """torchao's real-quantization config for the quantizer above (``IntxWeightOnlyConfig``, symmetric)."""
    _check_spec(bits, group_size)
    symmetric = require("torchao.quantization.quant_primitives", "quant").MappingType.SYMMETRIC
    return require("torchao.quantization", "quant").IntxWeightOnlyConfig(
        weight_dtype=getattr(torch, f"int{bits}"), granularity=_granularity(group_size), mapping_type=symmetric)


def fake_quantize_config(bits: int, group_size: int | None):
    """torchao's fake-quantization config for the same quantizer (``IntxFakeQuantizeConfig``, symmetric)."""
    _check_spec(bits, group_size)
    return require("torchao.quantization.qat", "quant").IntxFakeQuantizeConfig(
        getattr(torch, f"int{bits}"), granularity=_granularity(group_size), is_symmetric=True)


def conv1d_to_linear(model: nn.Module) -> int:
    """Replace every ``transformers`` ``Conv1D`` (GPT-2: y = x·W + b with W of shape (in, out)) by the
    equivalent ``nn.Linear`` (weight Wᵀ); returns how many were replaced."""
    from transformers.pytorch_utils import Conv1D

    replaced = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, Conv1D):
            continue
        n_in, n_out = module.weight.shape
        linear = nn.Linear(n_in, n_out, bias=module.bias is not None, device=module.weight.device,
                           dtype=module.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(module.weight.t())
            if module.bias is not None:
                linear.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, linear)
        replaced += 1
    return replaced


def quantizable_linears(model: nn.Module, group_size: int | None, include_lm_head: bool = False) -> list[str]:
    """Names of the ``nn.Linear`` layers to quantize; raises ``ValueError`` for a layer type that holds a
    ≥2-D weight but is not supported, for a ``group_size`` that does not divide a layer's input width,
    for a tied ``lm_head`` asked to be quantized, and when nothing is left to quantize."""
    from transformers.pytorch_utils import Conv1D

    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if isinstance(module, Conv1D):
            raise ValueError(f"layer {name!r} is a transformers Conv1D: call conv1d_to_linear(model) first")
        if isinstance(module, nn.Linear):
            if module is lm_head and not include_lm_head:
                continue
            if module is lm_head and lm_head.weight is model.get_input_embeddings().weight:  # tied
                raise ValueError(f"layer {name!r} (lm_head) shares its weight with the input embedding; "
                                 "set include_lm_head=False or untie the embeddings")
            if group_size and module.in_features % group_size:
                raise ValueError(f"group_size={group_size} does not divide the input width {module.in_features} "
                                 f"of layer {name!r}")
            names.append(name)
        elif not isinstance(module, nn.Embedding):
            own = [p for p in module.parameters(recurse=False) if p.ndim >= 2]
            if own:
                raise ValueError(f"layer {name!r} of type {type(module).__name__} holds a {own[0].ndim}-D weight "
                                 "that weight-only quantization here does not support (supported: torch.nn.Linear, "
                                 "transformers Conv1D via conv1d_to_linear; embeddings and norms stay fp)")
    if not names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to quantize")
    return names


def prepare_qat(model: nn.Module, bits: int = 4, group_size: int | None = 32,
                include_lm_head: bool = False) -> nn.Module:
    """Fake-quantize the weights of ``model``'s linear layers in place (GPT-2 ``Conv1D`` converted first).

    Forward uses Q(w) (module docstring); backward passes gradients straight through the rounding to the
    latent full-precision ``weight`` parameters (STE). Returns ``model``.
    """
    quantize_ = require("torchao.quantization", "quant").quantize_
    QATConfig = require("torchao.quantization.qat", "quant").QATConfig

    _check_spec(bits, group_size)
    conv1d_to_linear(model)
    targets = set(quantizable_linears(model, group_size, include_lm_head))
    quantize_(model, QATConfig(weight_config=fake_quantize_config(bits, group_size), step="prepare"),
              filter_fn=lambda module, fqn: fqn in targets and isinstance(module, nn.Linear))
    return model


def is_fake_quantized(model: nn.Module) -> bool:
    FakeQuantizedLinear = require("torchao.quantization.qat", "quant").FakeQuantizedLinear
    return any(isinstance(m, FakeQuantizedLinear) for m in model.modules())


def convert_qat(model: nn.Module, bits: int = 4, group_size: int | None = 32) -> nn.Module:
    """Turn every fake-quantized linear layer of ``model`` (in place) into an ``nn.Linear`` holding real
    quantized weights (torchao ``IntxUnpackedToInt8Tensor``); ``bits``/``group_size`` must be the ones
    :func:`prepare_qat` used. Returns ``model``."""
    quantize_ = require("torchao.quantization", "quant").quantize_
    qat = require("torchao.quantization.qat", "quant")
    FakeQuantizedLinear, QATConfig = qat.FakeQuantizedLinear, qat.QATConfig

    if not is_fake_quantized(model):
        raise ValueError("convert_qat: the model has no fake-quantized layer (run prepare_qat first)")
    quantize_(model, QATConfig(weight_only_config(bits, group_size), step="convert"),
              filter_fn=lambda module, fqn: isinstance(module, FakeQuantizedLinear))
    return model


def quantize_rtn(model: nn.Module, bits: int = 4, group_size: int | None = 32, include_lm_head: bool = False,
                 inplace: bool = False) -> nn.Module:
    """The post-training baseline: round-to-nearest with the same quantizer, no training
    (:func:`prepare_qat` then :func:`convert_qat`). Works on a copy unless ``inplace``."""
    model = model if inplace else copy.deepcopy(model)
    prepare_qat(model, bits, group_size, include_lm_head)
    return convert_qat(model, bits, group_size)


def save_quantized(model, path: str | Path, bits: int, group_size: int | None, include_lm_head: bool = False,
                   tokenizer=None) -> Path:
    """``save_pretrained`` a model converted by :func:`convert_qat`/:func:`quantize_rtn` (and ``tokenizer``).

    The weights are written as safetensors in torchao's flattened format with a ``TorchAoConfig`` in
    ``config.json``; ``AutoModelForCausalLM.from_pretrained(path)`` (or ``lm.hf.load_causal_lm``)
    rebuilds the quantized model when ``torchao`` is installed.
    """
    from transformers import TorchAoConfig
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    if is_fake_quantized(model):
        raise ValueError("save_quantized: the model is still fake-quantized; call convert_qat first")
    skip = [] if include_lm_head else [n for n, m in model.named_modules() if m is model.get_output_embeddings()]
    config = TorchAoConfig(quant_type=weight_only_config(bits, group_size), modules_to_not_convert=skip)
    model.config.quantization_config = config
    model.hf_quantizer = TorchAoHfQuantizer(config, pre_quantized=False)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
