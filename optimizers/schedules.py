"""Learning-rate schedules shared by every module (step-based, for ``LambdaLR``)."""

from __future__ import annotations

import math


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int | None, min_ratio: float = 0.1,
                         decay: str = "cosine") -> float:
    """Multiplier of the peak learning rate at optimizer step ``step``.

    Linear warm-up ``(step + 1) / warmup_steps`` for ``step < warmup_steps``; then either constant 1
    (``decay="constant"``, the Decision Transformer / RADT recipe) or a half-cosine from 1 to ``min_ratio``
    reached at ``total_steps`` (``decay="cosine"``): ``min_ratio + (1 - min_ratio)·½(1 + cos(π·p))`` with
    ``p = (step − warmup) / (total − warmup)`` clipped to [0, 1].
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant" or not total_steps or total_steps <= warmup_steps:
        return 1.0
    if decay != "cosine":
        raise ValueError(f"lr decay must be 'cosine' or 'constant', got {decay!r}")
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def alpha_schedule(t: float, alpha: float, t_alpha: int | None) -> float:
    """AdEMAMix mixing coefficient at step ``t`` (docs/papers.md §5; arXiv 2409.03137 §3, Algorithm 1):

    ``α(t) = min(t·α / T_α, α)``, a linear warm-up from 0 reaching ``α`` at ``t = T_α``; ``T_α = None`` → ``α``.
    """
    if t_alpha is None:
        return alpha
    return min(t * alpha / t_alpha, alpha)


def beta3_schedule(t: float, beta_start: float, beta3: float, t_beta3: int | None) -> float:
    """AdEMAMix slow-EMA decay at step ``t`` (docs/papers.md §5; arXiv 2409.03137 §3, Algorithm 1):

    ``β3(t) = min(exp(ln β_start · ln β3 / ((1 − t/T)·ln β3 + (t/T)·ln β_start)), β3)`` with ``T = T_β3``,
    i.e. the half-life ``ln 0.5 / ln β`` interpolated linearly from β_start's (t = 0) to β3's (t = T).
    Written as ``exp(1 / ((1 − t/T)/ln β_start + (t/T)/ln β3))`` so that a zero β (``1/ln 0 = 0``, the
    limit) is well defined: β_start = 0 gives ``β3^(T/t)``. ``T_β3 = None`` → ``β3``.
    """
    if t_beta3 is None or t >= t_beta3:
        return beta3
    frac = t / t_beta3

    def inv_log(beta: float) -> float:
        return 0.0 if beta == 0.0 else 1.0 / math.log(beta)

    inv = (1.0 - frac) * inv_log(beta_start) + frac * inv_log(beta3)
    return 0.0 if inv == 0.0 else min(math.exp(1.0 / inv), beta3)
