"""Per-token log-probabilities gathered from logits chunk by chunk (a chunked cross-entropy), never as a full
log-softmax.

For N rows of logits z_n ∈ R^V and target ids y_n:

    log p(y_n) = z_n[y_n] − logsumexp_v z_{n,v}
    ∂ log p(y_n) / ∂ z_{n,v} = 1[v = y_n] − exp(z_{n,v} − logsumexp_v z_{n,v})      (one-hot minus softmax)

:func:`token_logps` evaluates both in float32 (float64 logits stay float64), ``chunk_size`` rows at a time:
autograd keeps only the logits (in their own dtype), the targets and the N log-sum-exps, and the softmax of the
backward pass is recomputed one chunk at a time, so neither pass holds more than ``chunk_size × V`` float32 values
beyond the logits themselves.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _ChunkedTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, chunk_size: int) -> Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        out = torch.empty(logits.shape[0], dtype=dtype, device=logits.device)
        lse = torch.empty_like(out)
        for start in range(0, logits.shape[0], chunk_size):
            z = logits[start:start + chunk_size].to(dtype)
            lse[start:start + chunk_size] = z.logsumexp(-1)
            out[start:start + chunk_size] = z.gather(-1, targets[start:start + chunk_size, None]).squeeze(-1)
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk_size = chunk_size
        return out - lse

    @staticmethod
    def backward(ctx, grad: Tensor):
        logits, targets, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            g = -(logits[rows].to(lse.dtype) - lse[rows, None]).exp()  # −softmax
            g.scatter_add_(-1, targets[rows, None], torch.ones_like(g[:, :1]))  # + one-hot
            grad_logits[rows] = g * grad[rows, None]
        return grad_logits, None, None


def token_logps(logits: Tensor, targets: Tensor, chunk_size: int = 4096) -> Tensor:
    """log p(y_n) = z_n[y_n] − logsumexp_v z_{n,v} for logits ``(N, V)`` and ``targets`` ``(N,)``, shape ``(N,)``.

    Computed ``chunk_size`` rows at a time in float32 or wider (half-precision logits are upcast per chunk); the
    gradient with respect to the logits is (one-hot(y_n) − softmax(z_n)) · ∂L/∂log p(y_n), recomputed per chunk in
    backward (see the module docstring)."""
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"token_logps wants logits (N, V) and targets (N,), got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedTokenLogps.apply(logits, targets.long(), chunk_size)
