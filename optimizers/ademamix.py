"""AdEMAMix (Pagliardini, Ablin, Grangier; ICLR 2025; arXiv 2409.03137, Algorithm 1; docs/papers.md §5).

Adam with a second, slow gradient EMA mixed into the numerator:

    m1 ← β1·m1 + (1 − β1)·g                 (fast EMA, bias-corrected: m̂1 = m1 / (1 − β1^t))
    m2 ← β3(t)·m2 + (1 − β3(t))·g           (slow EMA, **no** bias correction)
    ν  ← β2·ν + (1 − β2)·g²                 (ν̂ = ν / (1 − β2^t))
    θ  ← θ − η·[(m̂1 + α(t)·m2) / (√ν̂ + ε) + λ·θ]   (decoupled weight decay, scaled by the learning rate)

α(t) and β3(t) warm up over ``t_alpha``/``t_beta3`` steps (:func:`optimizers.schedules.alpha_schedule`,
:func:`optimizers.schedules.beta3_schedule`, with β_start = β1). ``betas[0] == 0`` keeps no m1 (m̂1 = g):
the state is then as large as AdamW's.

Three implementations of the same update, chosen per parameter group:

* ``foreach=False``: a per-parameter loop, written as the formula above (the reference);
* ``foreach=None/True`` (default, CPU and CUDA): multi-tensor ``torch._foreach_*`` ops per (device, dtype, step)
  bucket, with the bias corrections folded into scalars (9 passes; on CPU run block by block to stay in cache);
* ``fused=True``: a single pass per element — each tensor's p, g, m1, m2, ν read once and p, m1, m2, ν written
  once (9 accesses per element against fused AdamW's 7).

  - On CUDA (contiguous float32/bfloat16/float16 buckets, Triton importable): one hand-written Triton kernel launch
    per bucket for all its tensors (:mod:`optimizers.ademamix_triton`: pointer and per-block tables, fp32 math,
    the folded scalars as kernel arguments, so lr/α/β3 changes never recompile). Measured on an NVIDIA H200
    (torch 2.11, triton 3.6), 36M fp32 parameters in 57 tensors: 0.43 ms/step = 1.22× ``AdamW(fused=True)``
    (0.35 ms); the ``torch.compile`` path it replaces took 2.16 ms (5.1×) there, dominated by per-call overhead.
  - Elsewhere (CPU, float64, non-contiguous tensors, no Triton): the update written as out-of-place ``_foreach``
    expressions and run through ``torch.compile``; Inductor fuses the chain. On CPU (needs a C++ compiler) we checked
    the generated code: one C++ kernel, one vectorised loop per tensor. The first step pays the compilation (~20 s on
    2 CPU cores); the per-step scalars are passed as one small tensor so that changing learning rates and schedules
    never recompile.

Precision: m1, m2 and ν are kept in float32 for bfloat16/float16 parameters by default (``state_dtype=None``), and
the update's arithmetic always runs in at least float32 (parameters and states are upcast, updated, and stored back
rounded once). A low-precision state cannot hold the slow EMA: bfloat16 keeps 8 significant bits, so once
|m2| ≥ 2^e with 2^e > 2⁸·(1 − β3)·|g| the increment (1 − β3)·(g − m2) is below half an ulp (2^(e−8)) and rounds away;
with β3 = 0.9999 and g = 1, m2 stalls at 2⁻⁵ ≈ 0.031 instead of approaching 1 − β3^t (docs/papers.md §5, "Precision"). ``state_dtype="param"`` (or an explicit dtype) keeps the
state in a lower precision where the user asks.

Low-memory state (``state_dtype="low_memory"``): 8 bytes per parameter, as AdamW's two float32 moments (12 with the
default float32 state). The update is computed in float32 exactly as above; only the stored state is narrowed:

    m1 ← bf16_rn(β1·m1 + (1 − β1)·g)        (bfloat16, round to nearest)
    ν  ← bf16_sr(β2·ν + (1 − β2)·g²)        (bfloat16, stochastic rounding: E[bf16_sr(x)] = x)
    m2 ← β3(t)·m2 + (1 − β3(t))·g           (float32)

An EMA x ← x + (1 − β)·(y − x) stored in bfloat16 (8 significant bits) with round-to-nearest loses every increment
smaller than half an ulp of x, i.e. 2⁻⁹ to 2⁻⁸ of |x|:

* m1 (β1 = 0.9) moves by a tenth of (g − m1); it stops only within 2–4 % of g, below the gradient noise: plain bf16.
* ν (β2 = 0.999): its largest possible decrement, (1 − β2)·ν ≈ 2⁻¹⁰·ν, is always below half an ulp, so a
  round-to-nearest bf16 ν never decreases (and with g = 1 from zero it stalls at 0.25). Stochastic rounding — round
  up (in magnitude) with probability (x − ⌊x⌋)/ulp — keeps every increment in expectation: adding a uniform
  16-bit integer to x's float32 bit pattern and clearing the low 16 bits (:func:`stochastic_round_bf16_`). The
  random bits come from a generator seeded with the step count and are indexed by an element's offset in its
  tensor (or CPU cache block), so a resumed run draws the same bits.
* m2 (β3 ≈ 0.9999): the slow EMA moves by 10⁻⁴·(g − m2) per step and stalls in bf16 at 2⁻⁵ as computed above.
  It is the state AdEMAMix adds and averages over ~1/(1 − β3) steps, so it gets exact, deterministic arithmetic
  rather than dithering; a Kahan-compensated bf16 pair (value + compensation term) would take the same 4 bytes as
  float32 and carry ~16 significant bits to float32's 24, so m2 is simply kept in float32.

Not available with ``fused=True`` (its single pass has no random bits for the stochastic rounding).

The step count is a Python ``int`` per parameter (``state["step"]``), saved and restored by ``state_dict``, so a
resumed run continues the α/β3 schedules where it stopped.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import astuple, dataclass

import torch
from torch.optim import Optimizer

from optimizers.schedules import alpha_schedule, beta3_schedule


STATE_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
STATE_KEYS = ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq")  # m1, m2, ν
LOW_MEMORY = "low_memory"  # state_dtype: m1 and ν bfloat16 (ν stochastically rounded), m2 float32
LOW_MEMORY_DTYPES = {"exp_avg_fast": torch.bfloat16, "exp_avg_slow": torch.float32, "exp_avg_sq": torch.bfloat16}


def parse_state_dtype(value: torch.dtype | str | None) -> torch.dtype | str | None:
    """``state_dtype`` as ``None``, ``"param"``, ``"low_memory"`` or a floating ``torch.dtype`` (names such as
    ``"float32"`` or ``"torch.bfloat16"`` are accepted, for YAML); anything else is a ``ValueError`` naming the
    argument."""
    if value is None or value in ("param", LOW_MEMORY):
        return value
    dtype = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else value
    if dtype not in STATE_DTYPES:
        raise ValueError(f"AdEMAMix: state_dtype must be None, 'param', '{LOW_MEMORY}' or one of "
                         f"{[str(d).removeprefix('torch.') for d in STATE_DTYPES]}, got {value!r}")
    return dtype


def state_dtype_for(param_dtype: torch.dtype, option: torch.dtype | str | None, key: str) -> torch.dtype:
    """The dtype of state ``key`` (m1, m2 or ν, :data:`STATE_KEYS`) for a parameter: ``None`` → float32 for
    bfloat16/float16 parameters, else the parameter's dtype; ``"param"`` → the parameter's dtype; ``"low_memory"``
    → :data:`LOW_MEMORY_DTYPES`; a dtype → that dtype."""
    if option is None:
        return torch.float32 if param_dtype in (torch.bfloat16, torch.float16) else param_dtype
    if option == LOW_MEMORY:
        return LOW_MEMORY_DTYPES[key]
    return param_dtype if option == "param" else option


def compute_dtype(param_dtype: torch.dtype, state_dtype: torch.dtype) -> torch.dtype:
    """The precision of the update's arithmetic: the widest of the parameter's, the state's and float32."""
    return torch.promote_types(torch.promote_types(param_dtype, state_dtype), torch.float32)


def validate_hyperparameters(lr: float, betas: tuple[float, float, float], alpha: float, t_alpha: int | None,
                             t_beta3: int | None, eps: float, weight_decay: float) -> None:
    """Raise ``ValueError`` naming the first invalid argument."""
    for name, value in (("lr", lr), ("alpha", alpha), ("eps", eps), ("weight_decay", weight_decay)):
        if not value >= 0.0:
            raise ValueError(f"AdEMAMix: {name} must be >= 0, got {value}")
    if len(betas) != 3:
        raise ValueError(f"AdEMAMix: betas must be (beta1, beta2, beta3), got {betas}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"AdEMAMix: betas[{i}] (beta{i + 1}) must be in [0, 1), got {beta}")
    for name, value in (("t_alpha", t_alpha), ("t_beta3", t_beta3)):
        if value is not None and not value > 0:
            raise ValueError(f"AdEMAMix: {name} must be a positive number of steps or None, got {value}")


@dataclass(frozen=True)
class StepScalars:
    """Everything the update needs at step ``t`` of a parameter group, as plain floats."""

    lr: float
    beta1: float
    beta2: float
    beta3: float
    alpha: float
    bias_correction1: float  # 1 − β1^t (1 when β1 = 0)
    bias_correction2: float  # 1 − β2^t
    eps: float
    weight_decay: float


def step_scalars(group: dict, t: int) -> StepScalars:
    """The group's hyperparameters at step ``t`` (≥ 1) with the α and β3 schedules applied."""
    beta1, beta2, beta3 = group["betas"]
    return StepScalars(lr=float(group["lr"]), beta1=beta1, beta2=beta2,
                       beta3=beta3_schedule(t, beta1, beta3, group["t_beta3"]),
                       alpha=alpha_schedule(t, group["alpha"], group["t_alpha"]),
                       bias_correction1=1.0 - beta1 ** t, bias_correction2=1.0 - beta2 ** t,
                       eps=group["eps"], weight_decay=group["weight_decay"])


def _cast(tensors: list[torch.Tensor] | None, dtype: torch.dtype) -> list[torch.Tensor] | None:
    return None if tensors is None else [t if t.dtype == dtype else t.to(dtype) for t in tensors]


def in_compute_dtype(update: Callable, params: list[torch.Tensor], grads: list[torch.Tensor],
                     m1s: list[torch.Tensor] | None, m2s: list[torch.Tensor], nus: list[torch.Tensor], *args,
                     nu_noise: torch.Tensor | None = None) -> None:
    """Run the in-place ``update(params, grads, m1s, m2s, nus, *args)`` in :func:`compute_dtype`: lists in
    another dtype are replaced by upcast copies, which are written back (rounded once) afterwards — to nearest,
    except a bfloat16 ν when ``nu_noise`` (:func:`rounding_noise`) is given: stochastically
    (:func:`stochastic_round_bf16_`)."""
    acc = compute_dtype(params[0].dtype, m2s[0].dtype)
    if all(lst is None or lst[0].dtype == acc for lst in (params, grads, m1s, m2s, nus)):
        update(params, grads, m1s, m2s, nus, *args)
        return
    work = [_cast(lst, acc) for lst in (params, m1s, m2s, nus)]
    update(work[0], _cast(grads, acc), work[1], work[2], work[3], *args)
    for original, updated in zip((params, m1s, m2s, nus), work):
        if original is None or original[0].dtype == acc:
            continue
        if original is nus and nu_noise is not None and original[0].dtype == torch.bfloat16:
            stochastic_round_bf16_(original, updated, nu_noise)
        else:
            torch._foreach_copy_(original, updated)


def rounding_noise(numel: int, device: torch.device, seed: int) -> torch.Tensor:
    """``numel`` uniform random integers in [0, 2¹⁶) (int32) on ``device``, drawn from a generator seeded with
    ``seed``: the dither of :func:`stochastic_round_bf16_`."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randint(0, 1 << 16, (numel,), dtype=torch.int32, device=device, generator=generator)


def stochastic_round_bf16_(out: list[torch.Tensor], values: list[torch.Tensor], noise: torch.Tensor) -> None:
    """Write ``values`` (float32/float64) into the bfloat16 tensors ``out``, rounded stochastically: a float32 x
    between the neighbouring bfloat16 values a < x < b (|a| < |b|) becomes b with probability (x − a)/(b − a), so
    E[out] = x. bfloat16 is the top half of float32, so adding a uniform integer u ∈ [0, 2¹⁶) to x's bit pattern
    carries into the top half exactly when u ≥ 2¹⁶ − (x's low 16 bits); the low half is then cleared and the cast is
    exact. ``noise`` (:func:`rounding_noise`) holds u for the first ``numel`` elements of every tensor (each
    element's draws are independent across steps, which is what keeps an EMA unbiased). float64 values are rounded
    to float32 first; float32 ``values`` are scratch: they are overwritten."""
    for target, x in zip(out, values):
        x = x.to(torch.float32)
        x.view(torch.int32).add_(noise[:x.numel()].view(x.shape)).bitwise_and_(-(1 << 16))
        target.copy_(x)


def loop_update(params: list[torch.Tensor], grads: list[torch.Tensor], m1s: list[torch.Tensor] | None,
                m2s: list[torch.Tensor], nus: list[torch.Tensor], s: StepScalars, nu_seed: int | None = None) -> None:
    """Reference path: the formula of the module docstring, one parameter at a time (in :func:`compute_dtype`).
    ``nu_seed``: round a bfloat16 ν stochastically with :func:`rounding_noise` of that seed (low-memory state)."""
    noise = None if nu_seed is None else rounding_noise(max(t.numel() for t in nus), nus[0].device, nu_seed)
    in_compute_dtype(_loop_body, params, grads, m1s, m2s, nus, s, nu_noise=noise)


def _loop_body(params: list[torch.Tensor], grads: list[torch.Tensor], m1s: list[torch.Tensor] | None,
               m2s: list[torch.Tensor], nus: list[torch.Tensor], s: StepScalars) -> None:
    for i, (p, g, m2, nu) in enumerate(zip(params, grads, m2s, nus)):
        if m1s is None:
            m1_hat = g
        else:
            m1s[i].mul_(s.beta1).add_(g, alpha=1.0 - s.beta1)
            m1_hat = m1s[i] / s.bias_correction1
        m2.mul_(s.beta3).add_(g, alpha=1.0 - s.beta3)
        nu.mul_(s.beta2).addcmul_(g, g, value=1.0 - s.beta2)
        denom = (nu / s.bias_correction2).sqrt_().add_(s.eps)
        update = (m1_hat + s.alpha * m2) / denom + s.weight_decay * p
        p.add_(update, alpha=-s.lr)


@dataclass(frozen=True)
class FoldedScalars:
    """The update with the bias corrections folded into scalars (c1 = 1 − β1^t, c2 = √(1 − β2^t)):

    θ ← decay·θ − step_size · (m1 + alpha_c1·m2) / (√ν + eps_c2),   with decay = 1 − ηλ, step_size = η·c2/c1,
    alpha_c1 = α·c1, eps_c2 = ε·c2 — equal to the formula in the module docstring, with one division and one
    square root per element and no per-element bias-correction divisions.
    """

    beta1: float
    beta2: float
    beta3: float
    alpha_c1: float
    eps_c2: float
    step_size: float
    decay: float

    @classmethod
    def of(cls, s: StepScalars) -> FoldedScalars:
        c1, c2 = s.bias_correction1, math.sqrt(s.bias_correction2)
        return cls(beta1=s.beta1, beta2=s.beta2, beta3=s.beta3, alpha_c1=s.alpha * c1, eps_c2=s.eps * c2,
                   step_size=s.lr * c2 / c1, decay=1.0 - s.lr * s.weight_decay)


CPU_BLOCK_NUMEL = 1 << 16  # elements per thread of a CPU cache block (7 arrays · 256 KiB ≈ a core's L2)


def cache_blocks(*lists: list[torch.Tensor] | None, block: int = CPU_BLOCK_NUMEL):
    """Split parallel lists of same-shaped tensors into blocks of ≈ ``block`` elements: flat slices of big
    contiguous tensors, small tensors batched together. Yields one tuple of lists per block (``None`` stays)."""
    present = [lst for lst in lists if lst is not None]

    def emit(batch: list[list[torch.Tensor]]) -> tuple:
        it = iter(batch)
        return tuple(None if lst is None else next(it) for lst in lists)

    batch: list[list[torch.Tensor]] = [[] for _ in present]
    size = 0
    for tensors in zip(*present):
        n = tensors[0].numel()
        if n > block and all(t.is_contiguous() for t in tensors):
            flat = [t.view(-1) for t in tensors]
            pieces = [[f[i:i + block] for f in flat] for i in range(0, n, block)]
        else:
            pieces = [list(tensors)]
        for piece in pieces:
            for out, t in zip(batch, piece):
                out.append(t)
            size += piece[0].numel()
            if size >= block:
                yield emit(batch)
                batch, size = [[] for _ in present], 0
    if size:
        yield emit(batch)


def foreach_update(params: list[torch.Tensor], grads: list[torch.Tensor], m1s: list[torch.Tensor] | None,
                   m2s: list[torch.Tensor], nus: list[torch.Tensor], s: StepScalars, nu_seed: int | None = None) -> None:
    """Multi-tensor path (tensors on one device, parameters of one dtype, each state of one dtype):
    :class:`FoldedScalars`' form in nine ``_foreach_*`` passes, in :func:`compute_dtype`. On CPU the whole update
    runs one :func:`cache_blocks` block at a time, so the nine passes (and any up/down casts) hit the cache instead
    of memory (measured ~3x faster on a 7M-parameter set than op by op). A block is :data:`CPU_BLOCK_NUMEL` elements
    per intra-op thread: each thread's share stays cache-sized, and with more threads there are fewer blocks, hence
    fewer parallel regions (a thread barrier per op and block, costly when another process holds a core).
    ``nu_seed``: round a bfloat16 ν stochastically with :func:`rounding_noise` of that seed (low-memory state), one
    draw reused by every block."""
    f = FoldedScalars.of(s)
    if params[0].device.type == "cpu":
        blocks = list(cache_blocks(params, grads, m1s, m2s, nus, block=CPU_BLOCK_NUMEL * torch.get_num_threads()))
    else:
        blocks = [(params, grads, m1s, m2s, nus)]
    noise = None
    if nu_seed is not None:
        noise = rounding_noise(max(t.numel() for block in blocks for t in block[4]), nus[0].device, nu_seed)
    for block in blocks:
        in_compute_dtype(_foreach_folded, *block, f, nu_noise=noise)


def _foreach_folded(params: list[torch.Tensor], grads: list[torch.Tensor], m1s: list[torch.Tensor] | None,
                    m2s: list[torch.Tensor], nus: list[torch.Tensor], f: FoldedScalars) -> None:
    if m1s is not None:
        torch._foreach_lerp_(m1s, grads, 1.0 - f.beta1)
    torch._foreach_lerp_(m2s, grads, 1.0 - f.beta3)
    torch._foreach_mul_(nus, f.beta2)
    torch._foreach_addcmul_(nus, grads, grads, value=1.0 - f.beta2)
    denom = torch._foreach_sqrt(nus)
    torch._foreach_add_(denom, f.eps_c2)
    numer = torch._foreach_add(m1s if m1s is not None else grads, m2s, alpha=f.alpha_c1)
    if f.decay != 1.0:
        torch._foreach_mul_(params, f.decay)
    torch._foreach_addcdiv_(params, numer, denom, value=-f.step_size)


def _fused_body(params: list[torch.Tensor], grads: list[torch.Tensor], m1s: list[torch.Tensor] | None,
                m2s: list[torch.Tensor], nus: list[torch.Tensor], scalars: torch.Tensor) -> None:
    """:class:`FoldedScalars`' update as out-of-place ``_foreach`` expressions written back at the end, for
    ``torch.compile``: Inductor fuses the chain into multi-tensor kernels (one loop per tensor), so each
    tensor is read and written once. ``scalars`` holds the :class:`FoldedScalars` fields in order (a tensor, so new
    values never trigger a recompile); its dtype is :func:`compute_dtype`, in which every tensor is read (upcast)
    and the arithmetic runs; the results are stored back in each tensor's own dtype.
    """
    beta1, beta2, beta3, alpha_c1, eps_c2, step_size, decay = scalars.unbind()
    mul, add = torch._foreach_mul, torch._foreach_add
    stored = (params, m1s, m2s, nus)
    params, grads, m1s, m2s, nus = (_cast(lst, scalars.dtype) for lst in (params, grads, m1s, m2s, nus))
    m2_new = add(mul(m2s, beta3), mul(grads, 1.0 - beta3))
    nu_new = add(mul(nus, beta2), mul(mul(grads, grads), 1.0 - beta2))
    m1_new = grads if m1s is None else add(mul(m1s, beta1), mul(grads, 1.0 - beta1))
    denom = add(torch._foreach_sqrt(nu_new), eps_c2)
    update = mul(torch._foreach_div(add(m1_new, mul(m2_new, alpha_c1)), denom), step_size)
    torch._foreach_copy_(stored[0], torch._foreach_sub(mul(params, decay), update))
    if m1s is not None:
        torch._foreach_copy_(stored[1], m1_new)
    torch._foreach_copy_(stored[2], m2_new)
    torch._foreach_copy_(stored[3], nu_new)


_compiled_body: Callable | None = None


def fused_update(params: list[torch.Tensor], grads: list[torch.Tensor], m1s: list[torch.Tensor] | None,
                 m2s: list[torch.Tensor], nus: list[torch.Tensor], s: StepScalars) -> None:
    """``fused=True``: on CUDA the Triton kernel of :mod:`optimizers.ademamix_triton` (one launch per bucket) when
    Triton imports and the bucket is contiguous float32/bfloat16/float16; otherwise :func:`_fused_body` through
    ``torch.compile`` (compiled once per process, lazily). Both compute in float32 (float64 for float64 tensors)."""
    if params[0].device.type == "cuda":
        from optimizers import ademamix_triton  # imports triton (guarded) only once a CUDA bucket shows up
        if ademamix_triton.supported(params, grads, m1s, m2s, nus):
            ademamix_triton.launch(params, grads, m1s, m2s, nus, FoldedScalars.of(s))
            return
    global _compiled_body
    if _compiled_body is None:
        _compiled_body = torch.compile(_fused_body, fullgraph=True)
    acc = compute_dtype(params[0].dtype, m2s[0].dtype)
    scalars = torch.tensor(astuple(FoldedScalars.of(s)), dtype=acc).to(params[0].device, non_blocking=True)
    _compiled_body(params, grads, m1s, m2s, nus, scalars)


class AdEMAMix(Optimizer):
    """AdEMAMix optimizer (see the module docstring for the update and the three implementations).

    Args:
        params: parameters or parameter groups (each group may override any argument below).
        lr: learning rate η (a learning-rate scheduler may change it every step).
        betas: (β1, β2, β3): fast EMA, second moment, slow EMA decays, each in [0, 1). β1 = 0 keeps no m1.
        alpha: weight α of the slow EMA in the numerator.
        t_alpha: steps over which α warms up linearly from 0 (``None``: constant α). Usually the run length.
        t_beta3: steps over which β3 warms up from β1 (half-life interpolation; ``None``: constant β3).
        eps: ε added to √ν̂.
        weight_decay: decoupled weight decay λ (the update subtracts η·λ·θ).
        foreach: multi-tensor path (``None``/``True``, the default) or the per-parameter loop (``False``).
        fused: ``True`` = the single-pass path (a Triton kernel on CUDA, ``torch.compile`` otherwise); excludes
            ``foreach=True`` and ``state_dtype="low_memory"``.
        state_dtype: dtype of m1, m2, ν. ``None`` (default): float32 for bfloat16/float16 parameters (a bf16 slow
            EMA stalls, see the module docstring), the parameter's dtype otherwise; ``"param"``: always the
            parameter's dtype (AdamW-like memory for bf16 models, at the cost of a stalled m2); ``"low_memory"``:
            bfloat16 m1, stochastically rounded bfloat16 ν and float32 m2, 8 bytes per parameter (module docstring,
            "Low-memory state"); or a dtype (``torch.bfloat16`` or its name). The arithmetic runs in float32 or wider
            whatever the state dtype.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
                 alpha: float = 5.0, t_alpha: int | None = None, t_beta3: int | None = None, eps: float = 1e-8,
                 weight_decay: float = 0.0, foreach: bool | None = None, fused: bool | None = None,
                 state_dtype: torch.dtype | str | None = None):
        betas = tuple(betas)
        validate_hyperparameters(lr, betas, alpha, t_alpha, t_beta3, eps, weight_decay)
        if fused and foreach:
            raise ValueError("AdEMAMix: fused=True and foreach=True are mutually exclusive")
        defaults = dict(lr=lr, betas=betas, alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3, eps=eps,
                        weight_decay=weight_decay, foreach=foreach, fused=fused,
                        state_dtype=parse_state_dtype(state_dtype))
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["betas"] = tuple(group["betas"])
        group["state_dtype"] = parse_state_dtype(group["state_dtype"])
        if group["fused"] and group["state_dtype"] == LOW_MEMORY:
            raise ValueError(f"AdEMAMix: state_dtype='{LOW_MEMORY}' needs the foreach or loop path, not fused=True "
                             "(the fused pass has no stochastic rounding of ν)")
        validate_hyperparameters(group["lr"], group["betas"], group["alpha"], group["t_alpha"], group["t_beta3"],
                                 group["eps"], group["weight_decay"])

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # state dicts saved before ``state_dtype`` existed
            group.setdefault("state_dtype", None)

    def load_state_dict(self, state_dict: dict) -> None:
        """``Optimizer.load_state_dict``, except that m1, m2, ν get the dtype of this optimizer's ``state_dtype``
        rule (:func:`state_dtype_for`) from the saved values, not the parameter's dtype (torch's default cast would
        round a float32 state of a bfloat16 parameter to bfloat16)."""
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        for group in self.param_groups:
            for p in group["params"]:
                saved = state_dict["state"].get(saved_ids.pop(0), {})
                for key in STATE_KEYS:
                    if key in saved:
                        dtype = state_dtype_for(p.dtype, group["state_dtype"], key)
                        self.state[p][key] = saved[key].to(device=p.device, dtype=dtype, copy=True)

    def _buckets(self, group: dict) -> dict[tuple, tuple[list, list, list | None, list, list]]:
        """Advance the step of every parameter with a gradient (creating its state on first use) and bucket
        (param, grad, m1, m2, ν) by (device, parameter dtype, state dtypes, step), the unit one multi-tensor call
        can update."""
        keep_m1 = group["betas"][0] != 0.0
        buckets: dict[tuple, tuple[list, list, list | None, list, list]] = defaultdict(
            lambda: ([], [], [] if keep_m1 else None, [], []))
        for index, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"AdEMAMix does not support sparse gradients (parameter {index} of its group); "
                                   "use a dense embedding or another optimizer")
            if torch.is_complex(p):
                raise RuntimeError(f"AdEMAMix does not support complex parameters (parameter {index} of its group); "
                                   "optimize torch.view_as_real(p) instead")
            state = self.state[p]
            if not state:
                state["step"] = 0
                for key in STATE_KEYS if keep_m1 else STATE_KEYS[1:]:
                    dtype = state_dtype_for(p.dtype, group["state_dtype"], key)
                    state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            state["step"] += 1
            key = (p.device, p.dtype, *(state[k].dtype for k in STATE_KEYS if k in state), state["step"])
            params, grads, m1s, m2s, nus = buckets[key]
            params.append(p)
            grads.append(p.grad)
            if keep_m1:
                m1s.append(state["exp_avg_fast"])
            m2s.append(state["exp_avg_slow"])
            nus.append(state["exp_avg_sq"])
        return buckets

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One update of every parameter that has a gradient; ``closure`` re-evaluates and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["fused"]:
                update = fused_update
            elif group["foreach"] is False:
                update = loop_update
            else:
                update = foreach_update
            low_memory = group["state_dtype"] == LOW_MEMORY
            for key, tensors in self._buckets(group).items():
                t = key[-1]
                if low_memory:  # the step seeds ν's rounding noise: a resumed run draws the same bits
                    update(*tensors, step_scalars(group, t), nu_seed=t)
                else:
                    update(*tensors, step_scalars(group, t))
        return loss
