"""The ``litpapers`` progress bar: optimizer steps out of ``max_steps``, the logged metrics, no ``v_num``."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


class StepProgressBar(RichProgressBar):
    """:class:`~lightning.pytorch.callbacks.RichProgressBar` for step-bounded runs.

    With ``trainer.max_steps > 0`` the training bar reads ``Step  k/max_steps`` (``k`` = ``trainer.global_step``,
    the optimizer steps taken, so it continues across epochs and after a resume) instead of Lightning's
    per-epoch ``Epoch 0/-2`` (``max_epochs`` is ``-1`` when only ``max_steps`` bounds the run). Epoch-bounded
    runs keep Lightning's epoch bar. The logger's version number (``v_num``) is not shown: it names the log
    directory, which the logger prints itself, and is not a metric.
    """

    def _step_bounded(self) -> bool:
        return self.trainer.max_steps is not None and self.trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._step_bounded() else super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if not self._step_bounded():
            return super()._get_train_description(current_epoch)
        return f"{'Step':{len(self.validation_description)}}"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._step_bounded() and self.train_progress_bar_id is not None:
            return  # one bar for the whole run: a new epoch does not reset the step count
        super().on_train_epoch_start(trainer, pl_module)
        if self._step_bounded():
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._step_bounded():
            self._update(self.train_progress_bar_id, trainer.global_step)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
