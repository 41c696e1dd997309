"""Weight-only integer quantizers of Hugging Face causal LMs behind one interface: post-training quantization
(PTQ) that fixes a grid per layer, fake quantization on that fixed grid for quantization-aware training (QAT),
real low-bit weights for export, and reload.

One config, :class:`QuantizerConfig` (``name``, ``bits``, ``group_size``, ``include_lm_head``, calibration
settings), validated on construction (before any model is loaded). Every quantizer produces, per quantized
``nn.Linear``, a symmetric grid — one ``scale_g`` per group ``g`` of ``group_size`` input columns (per output
row when ``group_size`` is ``None``), integer range q ∈ [−2^(b−1), 2^(b−1) − 1] — and the latent weights to
start QAT from::

    Q(w)_i = clamp(round(w_i / scale_g), −2^(b−1), 2^(b−1) − 1) · scale_g          (torchao quantize_affine /
                                                                                      dequantize_affine)

- ``rtn``: round to nearest, scale_g = max_{i∈g}|w_i| / ((2^b − 1)/2) (torchao ``choose_qparams_affine``,
  ``MappingType.SYMMETRIC``, as ``IntxWeightOnlyConfig`` uses); latent = w.
- ``hqq``: Half-Quadratic Quantization (Badri & Shaji 2023), torchao's CPU-capable scale-only solver
  ``quant_primitives._choose_qparams_and_quantize_scale_only_hqq`` (``IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY``):
  alternate q = clamp(round(w/s)) and the least-squares s = ⟨w, q⟩/⟨q, q⟩ per group; latent = w.
  (``torchao.prototype.hqq`` needs triton, and torchao's zero-point HQQ targets the CUDA tinygemm int4 layout.)
- ``gptq``: GPTQ (Frantar et al., ICLR 2023, arXiv 2210.17323, Algorithm 1) on the Hessian H = 2/n Σ x xᵀ of each
  layer's inputs over the calibration prompts, collected by torchao's ``prototype.gptq.GPTQObserverTensor`` in
  one pass of the full-precision model (torchao's default, not layer-sequential). With U = chol((H + λI)⁻¹)ᵀ
  (upper, λ = ``percdamp``·mean diag H), for each input column j in order: when j starts a group, the group's
  scale is RTN's on that group's columns (as updated up to the current lazy block); then q_j = Q(w_j),
  e = (w_j − q_j)/U_jj and w_{j:} −= e·U_{j,j:}. The latent weight of column j is w_j just before it was rounded,
  so Q(latent) = GPTQ's weights. torchao's ``gptq_quantize`` itself is CUDA-only and int4/int8-only, hence this
  implementation; the tests compare it with the reference implementation's outputs (IST-DASLab/gptq
  ``GPTQ.fasterquant``).
- ``awq``: Activation-aware Weight Quantization (Lin et al., MLSys 2024, arXiv 2306.00978): for each group of
  linear layers reading the same input x (q/k/v; gate/up; o reading v's output; down reading up's output),
  torchao's ``prototype.awq.AWQObserver`` searches s = mean|x|^α (α ∈ {0, 1/n, …}, normalised) minimising
  ‖x Wᵀ − (x/s) Q(W·diag s)ᵀ‖² with RTN as the base quantizer; 1/s is then folded into the preceding
  operation (RMSNorm weight, v_proj rows, up_proj rows) and W·diag(s) is RTN-quantized, as the AWQ paper deploys
  it: the exported model is a plain weight-only model whose norm/preceding weights carry 1/s. (torchao's own
  ``AWQConfig`` convert needs a weight tensor with activation pre-scaling, which its CPU ``intx`` format lacks.)
  Llama-style decoder layers only; o_proj is left unscaled when v_proj's width differs (grouped-query attention).

QAT (:func:`prepare_qat`) trains the latent full-precision weights w through Q with the clipped straight-through
estimator ∂L/∂w := ∂L/∂Q(w) · 1[q_min ≤ round(w/scale) ≤ q_max]; :func:`convert_qat` exports the trained model as
``nn.Linear`` layers holding torchao's ``IntxUnpackedToInt8Tensor`` (int codes round(w/scale), one per int8, plus
the scales; it dequantizes in the matmul on CPU and GPU), computing exactly the fake-quantized forward. Which grid
QAT trains on follows from what each quantizer's grid is a function of:

- ``rtn``: the grid is a function of the weights alone (scale_g = max_{i∈g}|w_i| / ((2^b − 1)/2)), and the QDPO
  paper trains latent weights that are *re-quantized at the end* with RTN as its main setting (docs/papers.md §4).
  So QAT recomputes each group's RTN scale from the current latent weights at every forward (torchao's
  ``FakeQuantizedLinear`` with ``IntxFakeQuantizeConfig``, symmetric) and the export re-applies RTN to the
  trained weights (torchao ``QATConfig(IntxWeightOnlyConfig, step="convert")``): moving a group's largest weight
  rescales the whole group, in training and in the export alike.
- ``awq``: the activation-aware scales s come from calibration and are folded into the model once (before QAT);
  what is then quantized is RTN of the folded weights W·diag(s) (no clip search here), a function of those weights
  alone. So, by the same rule as ``rtn``, QAT recomputes RTN's scales from the folded latent weights and the
  export re-applies RTN to them.
- ``hqq``, ``gptq``: the grid comes from an optimiser or from calibration data and cannot be recomputed from the
  weights alone, so the grid the PTQ method chose stays fixed during QAT (:class:`FixedGridFakeQuantLinear`,
  latent weights initialised so that the fake-quantized model equals the PTQ model) and the export rounds the
  trained weights onto it; with ``QDPO(train_scales=True)`` the fixed grid's scales train too (LSQ gradient).
:func:`save_quantized` writes it with ``save_pretrained`` (safetensors and a ``TorchAoConfig``);
``AutoModelForCausalLM.from_pretrained(dir)`` reloads it with torchao installed.

Supported layers: ``torch.nn.Linear`` and GPT-2's ``transformers.pytorch_utils.Conv1D`` (converted to an
equivalent ``nn.Linear`` first). Embeddings and norms stay in full precision, as does ``lm_head`` unless
``include_lm_head``. Any other layer holding a ≥2-D weight raises an error naming it.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lm.extras import require

#: quantizer name -> supported bit widths (torchao ``IntxUnpackedToInt8Tensor`` holds int2..int8)
SUPPORTED_BITS: dict[str, tuple[int, ...]] = {name: tuple(range(2, 9)) for name in ("rtn", "hqq", "gptq", "awq")}
QUANTIZERS = tuple(SUPPORTED_BITS)
#: quantizers that need calibration prompts
CALIBRATED = ("gptq", "awq")
#: Quantizers whose grid the PTQ method fixes (QAT trains the latent weights on it); the others recompute RTN.
FIXED_GRID = ("hqq", "gptq")
CALIBRATION_SOURCES = ("tasks", "freeform")


@dataclass(frozen=True)
class QuantizerConfig:
    """Which quantizer QDPO trains through and exports, its PTQ baselines use, the pair cache keys on.

    Args:
        name: ``"rtn"``, ``"hqq"``, ``"gptq"`` or ``"awq"`` (module docstring).
        bits: weight bit width (2..8).
        group_size: input columns sharing one scale; ``None`` = one scale per output row.
        include_lm_head: quantize the output projection too.
        calibration: built-in prompt source GPTQ/AWQ calibrate on — ``"tasks"`` or ``"freeform"``, always their
            training side (never the held-out prompts :class:`callbacks.QuantizationEval` evaluates on).
        calibration_size: number of calibration prompts.
        calibration_seed: seed of the calibration prompt generator.
        percdamp: GPTQ's Hessian damping λ / mean diag H.
        awq_grid: number of exponents α AWQ tries.
    """

    name: str = "rtn"
    bits: int = 4
    group_size: int | None = 32
    include_lm_head: bool = False
    calibration: str = "tasks"
    calibration_size: int = 64
    calibration_seed: int = 0
    percdamp: float = 0.01
    awq_grid: int = 20

    def __post_init__(self):
        if self.name not in SUPPORTED_BITS:
            raise ValueError(f"quantizer name {self.name!r} is unknown: choose one of {', '.join(QUANTIZERS)}")
        if self.bits not in SUPPORTED_BITS[self.name]:
            allowed = SUPPORTED_BITS[self.name]
            raise ValueError(f"quantizer bits={self.bits} is not supported by {self.name!r}: it takes bits in "
                             f"{allowed[0]}..{allowed[-1]}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or self.group_size < 2):
            raise ValueError(f"quantizer group_size must be an integer >= 2 or None (one scale per output row), "
                             f"got {self.group_size!r}")
        if self.calibration not in CALIBRATION_SOURCES:
            raise ValueError(f"quantizer calibration must be one of {CALIBRATION_SOURCES}, got {self.calibration!r}")
        if self.calibration_size < 1 or self.awq_grid < 1 or not self.percdamp > 0:
            raise ValueError(f"quantizer calibration_size ({self.calibration_size}) and awq_grid ({self.awq_grid}) "
                             f"must be >= 1 and percdamp ({self.percdamp}) > 0")

    @property
    def calibrated(self) -> bool:
        return self.name in CALIBRATED

    @property
    def tag(self) -> str:
        """A short name, e.g. ``"rtn-int4-g32"`` / ``"gptq-int3-perchannel+lm_head"`` (logs, folder names)."""
        tag = f"{self.name}-int{self.bits}-" + (f"g{self.group_size}" if self.group_size else "perchannel")
        return tag + ("+lm_head" if self.include_lm_head else "")

    def key(self) -> dict:
        """The fields that change the quantized model (cache keys): calibration fields only for GPTQ/AWQ."""
        fields = asdict(self)
        if self.name != "gptq":
            del fields["percdamp"]
        if self.name != "awq":
            del fields["awq_grid"]
        if not self.calibrated:
            for k in ("calibration", "calibration_size", "calibration_seed"):
                del fields[k]
        return fields

    def block_size(self, in_features: int) -> tuple[int, int]:
        """torchao's ``block_size`` of a layer with ``in_features`` inputs: (1, group_size or in_features)."""
        return 1, self.group_size or in_features


def _quant_primitives():
    return require("torchao.quantization.quant_primitives", "quant")


def _qrange(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _granularity(group_size: int | None):
    granularity = require("torchao.quantization.granularity", "quant")
    return granularity.PerGroup(group_size) if group_size else granularity.PerAxis(0)


def weight_only_config(bits: int, group_size: int | None):
    """torchao's real-quantization config of the export format (``IntxWeightOnlyConfig``, symmetric): applied to
    float weights it is RTN; it also describes every converted model in ``config.json``."""
    symmetric = _quant_primitives().MappingType.SYMMETRIC
    return require("torchao.quantization", "quant").IntxWeightOnlyConfig(
        weight_dtype=getattr(torch, f"int{bits}"), granularity=_granularity(group_size), mapping_type=symmetric)


def fake_quantize_config(bits: int, group_size: int | None):
    """torchao's fake-quantization config of RTN (``IntxFakeQuantizeConfig``, symmetric, scales recomputed from the
    weights at every forward)."""
    return require("torchao.quantization.qat", "quant").IntxFakeQuantizeConfig(
        getattr(torch, f"int{bits}"), granularity=_granularity(group_size), is_symmetric=True)


def quantize_codes(weight: Tensor, scale: Tensor, bits: int, block_size: tuple[int, int]) -> Tensor:
    """int8 codes clamp(round(w/scale), q_min, q_max) (torchao ``quantize_affine``, zero point 0)."""
    qmin, qmax = _qrange(bits)
    return _quant_primitives().quantize_affine(weight, block_size, scale, torch.zeros_like(scale, dtype=torch.int8),
                                               torch.int8, qmin, qmax)


def dequantize_codes(codes: Tensor, scale: Tensor, bits: int, block_size: tuple[int, int], dtype) -> Tensor:
    """codes · scale (torchao ``dequantize_affine``, zero point 0), in ``dtype``."""
    qmin, qmax = _qrange(bits)
    return _quant_primitives().dequantize_affine(codes, block_size, scale, torch.zeros_like(scale, dtype=torch.int8),
                                                 torch.int8, qmin, qmax, output_dtype=dtype)


def rtn_scale(weight: Tensor, bits: int, block_size: tuple[int, int]) -> Tensor:
    """RTN's symmetric scales max|w_g| / ((2^b − 1)/2), shape (out, in/group) (torchao ``choose_qparams_affine``)."""
    qp = _quant_primitives()
    qmin, qmax = _qrange(bits)
    scale, _ = qp.choose_qparams_affine(weight, qp.MappingType.SYMMETRIC, block_size, torch.int8, qmin, qmax,
                                        zero_point_dtype=torch.int8, keepdim=True)
    return scale


def hqq_scale(weight: Tensor, bits: int, block_size: tuple[int, int]) -> Tensor:
    """HQQ's scale-only scales (torchao ``_choose_qparams_and_quantize_scale_only_hqq``; module docstring)."""
    qmin, qmax = _qrange(bits)
    _, scale = _quant_primitives()._choose_qparams_and_quantize_scale_only_hqq(weight, list(block_size), qmin, qmax)
    return scale


def gptq_quantize_weight(weight: Tensor, hessian: Tensor, bits: int, group_size: int | None,
                         percdamp: float = 0.01, lazy_block: int = 128) -> tuple[Tensor, Tensor]:
    """GPTQ (module docstring) of one (out, in) ``weight`` given the (in, in) input ``hessian``, with the paper's
    lazy batch updates: columns are processed in blocks of ``lazy_block``, updates inside a block at once, the
    rest of the matrix once per block. As in the reference implementation (IST-DASLab/gptq ``fasterquant``), a
    group's scale is RTN's on its columns as they stand at the start of the block the group begins in.

    Returns ``(latent, scale)``: the weights each column had just before it was rounded (dead inputs, with
    H_jj = 0, set to 0) and the per-group scales, so that ``Q(latent)`` on ``scale`` is GPTQ's result."""
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    n_in = W.shape[1]
    g = group_size or n_in
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.diag(H).mean() * torch.eye(n_in, dtype=H.dtype, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    latent, scales = torch.empty_like(W), []
    for b0 in range(0, n_in, lazy_block):
        b1 = min(b0 + lazy_block, n_in)
        block, errors = W[:, b0:b1].clone(), torch.zeros_like(W[:, b0:b1])
        for i in range(b1 - b0):
            j = b0 + i
            if j % g == 0:
                scales.append(rtn_scale(W[:, j:j + g], bits, (1, g)))
            scale = scales[-1]
            w = block[:, i:i + 1]
            latent[:, j:j + 1] = w
            q = dequantize_codes(quantize_codes(w, scale, bits, (1, 1)), scale, bits, (1, 1), W.dtype)
            errors[:, i:i + 1] = (w - q) / U[j, j]
            block[:, i:] -= errors[:, i:i + 1] @ U[j:j + 1, j:b1]
        W[:, b1:] -= errors @ U[b0:b1, b1:]
    return latent.to(weight.dtype), torch.cat(scales, dim=1).to(weight.dtype)


class _GridSTE(torch.autograd.Function):
    """Q(w) on the grid ``scale`` forward; backward the clipped straight-through gradient to w (module docstring)
    and, when ``scale`` is trained, LSQ's gradient (Esser et al., ICLR 2020, arXiv 1902.08153) to each group's scale:
    ∂Q_i/∂s = round(w_i/s) − w_i/s inside the integer range, the clamped code q_min or q_max outside it."""

    @staticmethod
    def forward(ctx, weight, scale, bits, block_size):
        codes = quantize_codes(weight, scale, bits, block_size)
        qmin, qmax = _qrange(bits)
        ratio = weight * (1.0 / scale.repeat_interleave(block_size[1], dim=1))
        ctx.save_for_backward(ratio, codes)
        ctx.qrange, ctx.group = (qmin, qmax), block_size[1]
        return dequantize_codes(codes, scale, bits, block_size, weight.dtype)

    @staticmethod
    def backward(ctx, grad):
        ratio, codes = ctx.saved_tensors
        unclamped = torch.round(ratio)
        inside = (unclamped >= ctx.qrange[0]) & (unclamped <= ctx.qrange[1])
        grad_scale = None
        if ctx.needs_input_grad[1]:
            d_scale = torch.where(inside, unclamped - ratio, codes.to(ratio.dtype))
            grad_scale = (grad * d_scale).view(grad.shape[0], -1, ctx.group).sum(-1)
        return grad * inside, grad_scale, None, None


class FixedGridFakeQuantLinear(nn.Linear):
    """``nn.Linear`` whose forward multiplies by Q(weight) on a fixed per-group ``scale`` buffer (QAT of the
    hqq/gptq grids; module docstring); ``weight`` holds the trainable latent full-precision weights.
    :meth:`learn_scale` makes the scales trainable too (LSQ gradient, see ``_GridSTE``); the export then holds the
    trained scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int | None,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.bits, self.block_size = bits, (1, group_size or in_features)
        self.register_buffer("scale", torch.ones(out_features, in_features // self.block_size[1], device=device,
                                                 dtype=dtype))

    @classmethod
    def from_linear(cls, linear: nn.Linear, latent: Tensor, scale: Tensor, bits: int,
                    group_size: int | None) -> FixedGridFakeQuantLinear:
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size,
                  device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(latent)
            new.scale.copy_(scale)
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
        new.weight.requires_grad_(linear.weight.requires_grad)
        return new

    def learn_scale(self) -> None:
        """Turn the ``scale`` buffer into a trainable parameter (same name in the state dict)."""
        scale = self.scale.detach().clone()
        del self._buffers["scale"]
        self.scale = nn.Parameter(scale)

    def quantized_weight(self) -> Tensor:
        return _GridSTE.apply(self.weight, self.scale, self.bits, self.block_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)

    def to_quantized(self) -> nn.Linear:
        """An ``nn.Linear`` holding torchao's ``IntxUnpackedToInt8Tensor`` of the same codes and scales."""
        Intx = require("torchao.quantization", "quant").IntxUnpackedToInt8Tensor
        with torch.no_grad():
            codes = quantize_codes(self.weight, self.scale, self.bits, self.block_size)
            qweight = Intx(codes, self.scale.detach().clone(), torch.zeros_like(self.scale, dtype=torch.int8),
                           getattr(torch, f"int{self.bits}"), self.block_size, self.weight.dtype, None)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        linear.weight = nn.Parameter(qweight, requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bits={self.bits}, block_size={self.block_size}"


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
        _set_module(model, name, linear)
        replaced += 1
    return replaced


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


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
                raise ValueError(f"quantizer group_size={group_size} does not divide the input width "
                                 f"{module.in_features} of layer {name!r}")
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


def _run_calibration(model: nn.Module, calibration: Iterable[Tensor]) -> None:
    device = next(model.parameters()).device
    with torch.no_grad():
        for ids in calibration:
            model(ids.reshape(1, -1).to(device))


def _gptq_hessians(model: nn.Module, names: list[str], calibration: list[Tensor]) -> dict[str, Tensor]:
    """Each layer's input Hessian 2/n Σ x xᵀ over the calibration sequences (torchao ``GPTQObserverTensor``)."""
    Observer = require("torchao.prototype.gptq.observer", "quant").GPTQObserverTensor
    originals = {}
    for name in names:
        layer = model.get_submodule(name)
        originals[name] = layer.weight
        layer.weight = nn.Parameter(Observer.from_hp(layer.weight.detach().contiguous()), requires_grad=False)
    try:
        _run_calibration(model, calibration)
        return {name: model.get_submodule(name).weight.hessian for name in names}
    finally:
        for name, weight in originals.items():
            model.get_submodule(name).weight = weight


#: AWQ's scaling groups in a Llama-style decoder layer: (the operation whose output feeds the group — folded with
#: 1/s —, the linear layers reading that output)
AWQ_GROUPS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
              ("self_attn.v_proj", ("self_attn.o_proj",)),
              ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
              ("mlp.up_proj", ("mlp.down_proj",)))


def _decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = [(n, m) for n, m in model.named_modules() if n.endswith("layers") and isinstance(m, nn.ModuleList)]
    if len(layers) != 1:
        raise ValueError(f"quantizer='awq' folds its scales into Llama-style decoder layers (…layers.N with "
                         f"input_layernorm, self_attn.q/k/v/o_proj, post_attention_layernorm, mlp.gate/up/down_proj); "
                         f"{type(model).__name__} has none")
    prefix, modules = layers[0]
    for i, layer in enumerate(modules):
        for prev, group in AWQ_GROUPS:
            for sub in (prev, *group):
                try:
                    layer.get_submodule(sub)
                except AttributeError:
                    raise ValueError(f"quantizer='awq' needs Llama-style decoder layers: {prefix}.{i} "
                                     f"({type(layer).__name__}) has no {sub}") from None
    return [(f"{prefix}.{i}", layer) for i, layer in enumerate(modules)]


def awq_fold_scales(model: nn.Module, config: QuantizerConfig, calibration: list[Tensor]) -> dict[str, Tensor]:
    """AWQ (module docstring): search each group's s with torchao's ``AWQObserver`` on the calibration inputs
    of the full-precision model, then fold it in place (W_l ← W_l·diag s for the group, the preceding
    operation's output channels ← ·1/s), which leaves the full-precision function unchanged. Returns
    ``{group's first layer: s}``."""
    AWQObserver = require("torchao.prototype.awq.core", "quant").AWQObserver
    layers = _decoder_layers(model)
    inputs: dict[str, list[Tensor]] = {}
    hooks = []
    for prefix, layer in layers:
        for _, group in AWQ_GROUPS:
            name = f"{prefix}.{group[0]}"
            hooks.append(layer.get_submodule(group[0]).register_forward_hook(
                lambda m, args, out, name=name: inputs.setdefault(name, []).append(args[0].detach().reshape(
                    -1, args[0].shape[-1]))))
    try:
        _run_calibration(model, calibration)
    finally:
        for h in hooks:
            h.remove()
    base = weight_only_config(config.bits, config.group_size)
    scales = {}
    with torch.no_grad():
        for prefix, layer in layers:
            for prev_name, group in AWQ_GROUPS:
                prev, linears = layer.get_submodule(prev_name), [layer.get_submodule(n) for n in group]
                out_width = prev.weight.shape[0]
                if out_width != linears[0].in_features:  # v_proj narrower than o_proj's input (GQA): no scaling
                    continue
                observer = AWQObserver(torch.cat([lin.weight for lin in linears]), None, base, config.awq_grid)
                observer.inputs = inputs[f"{prefix}.{group[0]}"]
                s = observer.calculate_qparams().to(prev.weight.dtype)
                prev.weight.div_(s.view(-1, *([1] * (prev.weight.ndim - 1))))
                if getattr(prev, "bias", None) is not None:
                    prev.bias.div_(s)
                for lin in linears:
                    lin.weight.mul_(s)
                scales[f"{prefix}.{group[0]}"] = s
    return scales


def ptq_grids(model: nn.Module, config: QuantizerConfig,
              calibration: list[Tensor] | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Run the fixed-grid PTQ method of ``config`` (``hqq`` or ``gptq``) on ``model`` and return
    ``{layer name: (latent weight, scale)}`` for every layer to quantize."""
    if config.name not in FIXED_GRID:
        raise ValueError(f"ptq_grids: quantizer {config.name!r} has no fixed grid (fixed grids: {FIXED_GRID}); its "
                         "scales are recomputed from the weights (prepare_qat)")
    conv1d_to_linear(model)
    names = quantizable_linears(model, config.group_size, config.include_lm_head)
    if config.calibrated and not calibration:
        raise ValueError(f"quantizer name {config.name!r} needs calibration sequences (token ids), got none")
    hessians = _gptq_hessians(model, names, calibration) if config.name == "gptq" else {}
    grids = {}
    for name in names:
        w = model.get_submodule(name).weight.detach()
        if config.name == "gptq":
            grids[name] = gptq_quantize_weight(w, hessians[name], config.bits, config.group_size, config.percdamp)
        else:
            grids[name] = (w, hqq_scale(w, config.bits, config.block_size(w.shape[1])))
    return grids


def prepare_qat(model: nn.Module, config: QuantizerConfig, calibration: list[Tensor] | None = None) -> nn.Module:
    """Fake-quantize ``model``'s linear layers in place for QAT (GPT-2 ``Conv1D`` converted first), on the grid
    rule of the module docstring; at the start the fake-quantized model equals the PTQ model. Returns ``model``.

    - ``rtn``: each layer becomes torchao's ``FakeQuantizedLinear`` (``quantize_(model, QATConfig(weight_config=
      IntxFakeQuantizeConfig(...), step="prepare"))``), RTN's scales recomputed from the latent weights at every
      forward.
    - ``awq``: the AWQ scales are folded into the model first (:func:`awq_fold_scales`, ``calibration`` token-id
      sequences), then as ``rtn`` on the folded weights.
    - ``hqq``/``gptq``: the PTQ method chooses each layer's grid (:func:`ptq_grids`; ``calibration`` for GPTQ) and
      the layer becomes a :class:`FixedGridFakeQuantLinear` on it.

    On a model declared on the meta device (no weights) only the layers are swapped and checked: no scale or grid
    can be computed there.
    """
    on_meta = any(p.is_meta for p in model.parameters())
    if config.name == "awq":
        conv1d_to_linear(model)
        if on_meta:
            _decoder_layers(model)  # the Llama-style layout AWQ folds into, checked on the architecture
        else:
            if not calibration:
                raise ValueError("quantizer name 'awq' needs calibration sequences (token ids), got none")
            awq_fold_scales(model, config, calibration)
    if config.name in ("rtn", "awq"):
        quantize_ = require("torchao.quantization", "quant").quantize_
        QATConfig = require("torchao.quantization.qat", "quant").QATConfig
        conv1d_to_linear(model)
        targets = set(quantizable_linears(model, config.group_size, config.include_lm_head))
        quantize_(model, QATConfig(weight_config=fake_quantize_config(config.bits, config.group_size), step="prepare"),
                  filter_fn=lambda module, fqn: fqn in targets and isinstance(module, nn.Linear))
        return model
    if on_meta:
        conv1d_to_linear(model)
        grids = {}
        for name in quantizable_linears(model, config.group_size, config.include_lm_head):
            w = model.get_submodule(name).weight
            grids[name] = (w, torch.empty(w.shape[0], w.shape[1] // config.block_size(w.shape[1])[1], device="meta"))
    else:
        grids = ptq_grids(model, config, calibration)
    for name, (latent, scale) in grids.items():
        _set_module(model, name, FixedGridFakeQuantLinear.from_linear(model.get_submodule(name), latent, scale,
                                                                      config.bits, config.group_size))
    return model


def fake_quantized_layers(model: nn.Module) -> list[nn.Linear]:
    """The layers :func:`prepare_qat` made: torchao ``FakeQuantizedLinear`` (rtn) or
    :class:`FixedGridFakeQuantLinear`."""
    FakeQuantizedLinear = require("torchao.quantization.qat", "quant").FakeQuantizedLinear
    return [m for m in model.modules() if isinstance(m, (FakeQuantizedLinear, FixedGridFakeQuantLinear))]


def is_fake_quantized(model: nn.Module) -> bool:
    return bool(fake_quantized_layers(model))


def _rtn_spec(layer) -> tuple[int, int | None]:
    """(bits, group_size) of a torchao ``FakeQuantizedLinear`` made by :func:`prepare_qat`."""
    config = layer.weight_fake_quantizer.config
    bits = next(b for b in range(2, 9) if getattr(torch, f"int{b}") == config.dtype)
    return bits, getattr(config.granularity, "group_size", None)


def convert_qat(model: nn.Module) -> nn.Module:
    """Turn every fake-quantized layer of ``model`` (in place) into an ``nn.Linear`` holding real quantized weights
    (torchao ``IntxUnpackedToInt8Tensor``), the same forward as the fake-quantized one: RTN re-applied to the trained
    weights for torchao's ``FakeQuantizedLinear`` (``QATConfig(IntxWeightOnlyConfig(...), step="convert")``), the
    fixed grid for :class:`FixedGridFakeQuantLinear`. Returns ``model``."""
    quantize_ = require("torchao.quantization", "quant").quantize_
    qat = require("torchao.quantization.qat", "quant")
    FakeQuantizedLinear, QATConfig = qat.FakeQuantizedLinear, qat.QATConfig
    if not is_fake_quantized(model):
        raise ValueError("convert_qat: the model has no fake-quantized layer (run prepare_qat first)")
    for name in [n for n, m in model.named_modules() if isinstance(m, FixedGridFakeQuantLinear)]:
        _set_module(model, name, model.get_submodule(name).to_quantized())
    specs = {_rtn_spec(m) for m in model.modules() if isinstance(m, FakeQuantizedLinear)}
    for bits, group_size in specs:
        quantize_(model, QATConfig(weight_only_config(bits, group_size), step="convert"),
                  filter_fn=lambda module, fqn: isinstance(module, FakeQuantizedLinear)
                  and _rtn_spec(module) == (bits, group_size))
    return model


def quantize(model: nn.Module, config: QuantizerConfig, calibration: list[Tensor] | None = None,
             inplace: bool = False) -> nn.Module:
    """The post-training baseline of ``config``: :func:`prepare_qat` then :func:`convert_qat`, no training.
    Works on a copy unless ``inplace``."""
    model = model if inplace else copy.deepcopy(model)
    return convert_qat(prepare_qat(model, config, calibration))


def quantize_rtn(model: nn.Module, bits: int = 4, group_size: int | None = 32, include_lm_head: bool = False,
                 inplace: bool = False) -> nn.Module:
    """:func:`quantize` with round-to-nearest (``QuantizerConfig("rtn", bits, group_size, include_lm_head)``)."""
    return quantize(model, QuantizerConfig("rtn", bits, group_size, include_lm_head), inplace=inplace)


def save_quantized(model, path: str | Path, config: QuantizerConfig, tokenizer=None) -> Path:
    """``save_pretrained`` a model converted by :func:`convert_qat`/:func:`quantize` (and ``tokenizer``).

    The weights are written as safetensors in torchao's flattened format (codes, scales) with a ``TorchAoConfig``
    (``IntxWeightOnlyConfig`` of the same bits/groups) in ``config.json``;
    ``AutoModelForCausalLM.from_pretrained(path)`` (or ``lm.hf.load_causal_lm``) rebuilds the quantized model,
    scales as saved, when ``torchao`` is installed.
    """
    from transformers import TorchAoConfig
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    if is_fake_quantized(model):
        raise ValueError("save_quantized: the model is still fake-quantized; call convert_qat first")
    weight_config = weight_only_config(config.bits, config.group_size)
    skip = [] if config.include_lm_head else [n for n, m in model.named_modules()
                                              if m is model.get_output_embeddings()]
    hf_config = TorchAoConfig(quant_type=weight_config, modules_to_not_convert=skip)
    model.config.quantization_config = hf_config
    model.hf_quantizer = TorchAoHfQuantizer(hf_config, pre_quantized=False)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
