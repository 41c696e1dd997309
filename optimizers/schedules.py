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
