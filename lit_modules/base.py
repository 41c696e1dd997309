"""The one pattern every LightningModule here follows: optimizer and schedule from plain arguments.

Subclasses call ``super().__init__(lr=..., ...)`` with their optimisation arguments, implement their own
``training_step``/``validation_step``, and list the parameters to train in :meth:`trainable_parameters`
(frozen teachers/references are excluded there). ``litpapers fit --optimizer AdEMAMix`` swaps the optimizer
and keeps this schedule (see ``cli.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import lightning as L
import torch

from optimizers.schedules import warmup_cosine_factor


class PaperModule(L.LightningModule):
    """Base class: AdamW (decoupled weight decay, no decay on biases/norms) + linear warm-up + cosine/constant.

    Args:
        lr: peak learning rate.
        weight_decay: decoupled weight decay applied to matrices (≥ 2-D weights) only.
        betas: AdamW betas.
        warmup_steps: linear warm-up steps.
        lr_decay: ``"cosine"`` (to ``min_lr_ratio``·lr at the last step) or ``"constant"`` after warm-up.
        min_lr_ratio: final learning rate as a fraction of ``lr`` for the cosine decay.
    """

    def __init__(self, lr: float = 3e-4, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 warmup_steps: int = 0, lr_decay: str = "cosine", min_lr_ratio: float = 0.1):
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if lr_decay not in ("cosine", "constant"):
            raise ValueError(f"lr_decay must be 'cosine' or 'constant', got {lr_decay!r}")
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.lr_decay, self.min_lr_ratio = warmup_steps, lr_decay, min_lr_ratio

    def trainable_parameters(self) -> Iterable[tuple[str, torch.nn.Parameter]]:
        """Named parameters the optimizer updates; override to exclude frozen sub-models."""
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def parameter_groups(self, weight_decay: float | None = None) -> list[dict]:
        """Two groups: weight-decayed matrices and undecayed vectors (biases, norm scales).

        ``weight_decay`` defaults to the module's own; the CLI passes the ``--optimizer``'s value instead.
        """
        decay, no_decay = [], []
        for _, p in self.trainable_parameters():
            (decay if p.ndim >= 2 else no_decay).append(p)
        wd = self.weight_decay if weight_decay is None else weight_decay
        return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]

    def lr_scheduler_config(self, optimizer: torch.optim.Optimizer) -> dict:
        """Per-step ``LambdaLR`` with :func:`warmup_cosine_factor`, over the trainer's estimated step count."""
        total = None
        if self._trainer is not None:
            total = int(self.trainer.estimated_stepping_batches)
        factor = functools.partial(warmup_cosine_factor, warmup_steps=self.warmup_steps, total_steps=total,
                                   min_ratio=self.min_lr_ratio, decay=self.lr_decay)
        return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "step"}

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=self.lr, betas=self.betas)
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_config(optimizer)}
