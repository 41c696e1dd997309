"""AdEMAMix's ``fused=True`` update on CUDA as one hand-written Triton multi-tensor kernel launch per bucket.

The kernel does :class:`optimizers.ademamix.FoldedScalars`' update (the same expressions as
``optimizers.ademamix._fused_body``) for every tensor of a (device, dtype, step) bucket in ONE launch: each program
handles ``BLOCK`` elements of one tensor, found through per-block tables (tensor index, element offset) built on the
host and cached per tuple of numels; the tensors themselves are reached through one int64 table of data pointers
(params, grads, m1, m2, ν), cached per tuple of pointers (grads are often new tensors each step, so a new table is
uploaded then: one small host→device copy). p, g, m1, m2, ν are read once and p, m1, m2, ν written once; every load
is upcast to fp32, the math runs in fp32, and each store rounds to its tensor's dtype: the parameters' (p, g) and the
state's (m1, m2, ν; float32 for bfloat16/float16 parameters by default, see ``AdEMAMix(state_dtype=...)``). The folded scalars are plain kernel float arguments, so changing
lr/α/β3 never recompiles.

Only contiguous buckets of float32/bfloat16/float16 parameters and float32/bfloat16/float16 states take this path (:func:`supported`); ``import triton`` is guarded
(:data:`AVAILABLE`), so CPU-only installs never touch this module's kernel. Tests may run :func:`launch` on CPU
tensors under Triton's interpreter (``TRITON_INTERPRET=1`` set before this module is imported).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the compiled/foreach paths are used instead
    triton = None
    tl = None

AVAILABLE = triton is not None
BLOCK = 4096  # elements per program
NUM_WARPS = 8
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CACHE_SIZE = 16
_block_tables: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()
_pointer_tables: OrderedDict[tuple, torch.Tensor] = OrderedDict()


if AVAILABLE:
    @triton.jit
    def _ld(ptr, offs, mask, MASKED: tl.constexpr):
        if MASKED:
            return tl.load(ptr + offs, mask=mask).to(tl.float32)
        return tl.load(ptr + offs).to(tl.float32)

    @triton.jit
    def _st(ptr, offs, value, mask, MASKED: tl.constexpr):
        if MASKED:
            tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(ptr + offs, value.to(ptr.dtype.element_ty))

    @triton.jit
    def _update_block(p_ptr, g_ptr, m1_ptr, m2_ptr, nu_ptr, offs, mask,
                      beta1, beta2, beta3, alpha_c1, eps_c2, step_size, decay,
                      HAS_M1: tl.constexpr, MASKED: tl.constexpr):
        """``_fused_body``'s expressions on one block, in fp32 (``MASKED``: the tensor's last, partial block)."""
        p = _ld(p_ptr, offs, mask, MASKED)
        g = _ld(g_ptr, offs, mask, MASKED)
        m2 = _ld(m2_ptr, offs, mask, MASKED)
        nu = _ld(nu_ptr, offs, mask, MASKED)
        m2 = m2 * beta3 + g * (1.0 - beta3)
        nu = nu * beta2 + (g * g) * (1.0 - beta2)
        if HAS_M1:
            m1 = _ld(m1_ptr, offs, mask, MASKED)
            m1 = m1 * beta1 + g * (1.0 - beta1)
            _st(m1_ptr, offs, m1, mask, MASKED)
        else:
            m1 = g
        denom = tl.sqrt_rn(nu) + eps_c2
        update = tl.div_rn(m1 + m2 * alpha_c1, denom) * step_size
        p = p * decay - update
        _st(p_ptr, offs, p, mask, MASKED)
        _st(m2_ptr, offs, m2, mask, MASKED)
        _st(nu_ptr, offs, nu, mask, MASKED)

    @triton.jit
    def _ademamix_kernel(ref, state_ref, ptrs, blk_tensor, blk_start, numels, n_tensors,
                         beta1, beta2, beta3, alpha_c1, eps_c2, step_size, decay,
                         HAS_M1: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
        """``ptrs`` = [params | grads | m1s | m2s | nus] data pointers (``n_tensors`` each; the m1 slots hold the
        m2s' pointers, unused, when not HAS_M1); ``ref`` (the first parameter) and ``state_ref`` (its m2) are passed
        only for their pointer types (element dtypes of p, g and of m1, m2, ν). ``ALIGNED``: every pointer is a multiple of 16 bytes, which (with unmasked full blocks)
        lets the compiler use 128-bit loads and stores."""
        pid = tl.program_id(0)
        t = tl.load(blk_tensor + pid)
        start = tl.multiple_of(tl.load(blk_start + pid), BLOCK)
        n = tl.load(numels + t)
        offs = start + tl.arange(0, BLOCK)
        ptr_ty = ref.dtype
        state_ty = state_ref.dtype
        p_ptr = tl.load(ptrs + t).to(ptr_ty, bitcast=True)
        g_ptr = tl.load(ptrs + n_tensors + t).to(ptr_ty, bitcast=True)
        m1_ptr = tl.load(ptrs + 2 * n_tensors + t).to(state_ty, bitcast=True)
        m2_ptr = tl.load(ptrs + 3 * n_tensors + t).to(state_ty, bitcast=True)
        nu_ptr = tl.load(ptrs + 4 * n_tensors + t).to(state_ty, bitcast=True)
        if ALIGNED:
            p_ptr = tl.multiple_of(p_ptr, 16)
            g_ptr = tl.multiple_of(g_ptr, 16)
            m1_ptr = tl.multiple_of(m1_ptr, 16)
            m2_ptr = tl.multiple_of(m2_ptr, 16)
            nu_ptr = tl.multiple_of(nu_ptr, 16)
        if start + BLOCK <= n:
            _update_block(p_ptr, g_ptr, m1_ptr, m2_ptr, nu_ptr, offs, offs < n,
                          beta1, beta2, beta3, alpha_c1, eps_c2, step_size, decay, HAS_M1, False)
        else:
            _update_block(p_ptr, g_ptr, m1_ptr, m2_ptr, nu_ptr, offs, offs < n,
                          beta1, beta2, beta3, alpha_c1, eps_c2, step_size, decay, HAS_M1, True)


def supported(params: list[torch.Tensor], grads: list[torch.Tensor], m1s: list[torch.Tensor] | None,
              m2s: list[torch.Tensor], nus: list[torch.Tensor]) -> bool:
    """True when Triton imports and the bucket is CUDA, every tensor contiguous, params and grads of one
    float32/bfloat16/float16 dtype and m1, m2, ν of one such dtype (anything else goes to the compiled path)."""
    if not AVAILABLE or not params or params[0].device.type != "cuda":
        return False
    dtype, state_dtype = params[0].dtype, m2s[0].dtype
    if dtype not in DTYPES or state_dtype not in DTYPES:
        return False
    return (all(t.dtype == dtype and t.is_contiguous() for lst in (params, grads) for t in lst)
            and all(t.dtype == state_dtype and t.is_contiguous()
                    for lst in (m1s, m2s, nus) if lst is not None for t in lst))


def _cached(cache: OrderedDict, key: tuple, build):
    value = cache.get(key)
    if value is None:
        value = cache[key] = build()
        if len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return value


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _build_block_tables(numels: tuple[int, ...], device: torch.device):
    counts = torch.tensor([-(-n // BLOCK) for n in numels], dtype=torch.int64)
    blk_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    first = torch.cumsum(counts, 0) - counts
    blk_start = (torch.arange(int(counts.sum()), dtype=torch.int64) - first[blk_tensor]) * BLOCK
    numels_t = torch.tensor(numels, dtype=torch.int64)
    if device.type != "cpu":
        blk_tensor, blk_start, numels_t = (x.to(device) for x in (blk_tensor, blk_start, numels_t))
    return blk_tensor, blk_start, numels_t


def launch(params: list[torch.Tensor], grads: list[torch.Tensor], m1s: list[torch.Tensor] | None,
           m2s: list[torch.Tensor], nus: list[torch.Tensor], f) -> None:
    """One kernel launch updating every tensor of the bucket in place; ``f`` is a
    :class:`optimizers.ademamix.FoldedScalars` (or anything with its fields)."""
    device = params[0].device
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            return launch(params, grads, m1s, m2s, nus, f)
    numels = tuple(p.numel() for p in params)
    blk_tensor, blk_start, numels_t = _cached(_block_tables, (device, numels, BLOCK),
                                              lambda: _build_block_tables(numels, device))
    lists = (params, grads, m1s if m1s is not None else m2s, m2s, nus)  # m2s stand in for absent m1s
    pointers = tuple(t.data_ptr() for lst in lists for t in lst)
    ptrs = _cached(_pointer_tables, (device, pointers), lambda: _to_device(list(pointers), device))
    grid = (blk_tensor.numel(),)
    _ademamix_kernel[grid](params[0], m2s[0], ptrs, blk_tensor, blk_start, numels_t, len(params),
                           float(f.beta1), float(f.beta2), float(f.beta3), float(f.alpha_c1), float(f.eps_c2),
                           float(f.step_size), float(f.decay),
                           HAS_M1=m1s is not None, ALIGNED=all(ptr % 16 == 0 for ptr in pointers), BLOCK=BLOCK,
                           num_warps=NUM_WARPS)
