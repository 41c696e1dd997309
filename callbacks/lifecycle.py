"""Nothing lost: checkpoints at the end, on Ctrl-C and on errors; random state in the checkpoint; NaN stops a run.

``litpapers fit`` adds these by default (see ``training/cli.py``); in your own Lightning code add them to ``callbacks``:

- :class:`LastCheckpoint` — a ``ModelCheckpoint`` whose ``last.ckpt`` is always the final state of the run
  (Lightning 2.6 leaves an earlier ``last.ckpt`` untouched at the end of training when it was written by
  ``every_n_train_steps``), that turns the first Ctrl-C (SIGINT) into "finish this step, save ``last.ckpt``,
  stop" (a second Ctrl-C aborts at once) and that saves ``last.ckpt`` when an exception ends a single-process
  run while the weights are consistent (not inside an optimizer step). Each such save prints one line saying
  where the checkpoint went. Every checkpoint is written atomically (:mod:`callbacks.checkpoint_io`): a full disk
  leaves the previous ``last.ckpt`` intact and ends the run with one error naming the path and the free space.
- :class:`ExactResume` — saves the torch/numpy/python random states in every checkpoint and, when training
  resumes, restores them and the training loader's position within the epoch, so data order, dropout and
  sampling continue as in an uninterrupted run.
- :class:`NonFiniteLossGuard` — stops training with :class:`NonFiniteLossError` (naming the step and the last
  good checkpoint) before a non-finite loss is back-propagated, so no NaN reaches the weights or a checkpoint.
"""

from __future__ import annotations

import random
import signal
import sys
import threading
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.checkpoint_io import CheckpointWriteError, use_atomic_checkpoints


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or ±inf."""


def _say(trainer: L.Trainer, message: str) -> None:
    """One line on stderr from rank 0 (the place a user looks when a run ends)."""
    if trainer.is_global_zero:
        print(message, file=sys.stderr, flush=True)


class LastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps ``last.ckpt`` current: at the end of training, on Ctrl-C and on errors.

    Args:
        save_on_interrupt: install a SIGINT handler during ``fit`` (main thread only): the first Ctrl-C
            finishes the current training step, saves ``last.ckpt`` and stops the run (``interrupted_at`` is
            then the step); a second Ctrl-C raises ``KeyboardInterrupt`` at once.
        save_on_error: when an exception (other than :class:`NonFiniteLossError`) ends a single-process fit
            outside an optimizer step, save ``last.ckpt`` first. Inside an optimizer step the parameters may be
            half-updated, and in a multi-process run the other ranks are not at a save point, so nothing is
            saved then.
        **kwargs: ``ModelCheckpoint`` arguments; ``save_last`` defaults to ``True``.
    """

    def __init__(self, save_on_interrupt: bool = True, save_on_error: bool = True, **kwargs: Any):
        kwargs.setdefault("save_last", True)
        super().__init__(**kwargs)
        self.save_on_interrupt, self.save_on_error = save_on_interrupt, save_on_error
        self.interrupted_at: int | None = None
        self._interrupt_requested = False
        self._in_optimizer_step = False
        self._last_step_saved_as_last: int | None = None
        self._previous_handler: Any = None

    # -- saving ---------------------------------------------------------------------------------------------
    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_step_saved_as_last = trainer.global_step

    def _save_last_now(self, trainer: L.Trainer) -> str:
        """Write ``last.ckpt`` for the current step (whatever ``save_last`` says) and return its path."""
        if self._last_step_saved_as_last != trainer.global_step or not self.last_model_path:
            candidates = self._monitor_candidates(trainer)
            path = self.format_checkpoint_name(candidates, self.CHECKPOINT_NAME_LAST)
            self._save_checkpoint(trainer, path)
            self.last_model_path, self._last_step_saved_as_last = path, trainer.global_step
        return self.last_model_path

    def _can_save(self, trainer: L.Trainer) -> bool:
        from lightning.pytorch.trainer.states import TrainerFn

        return (not trainer.fast_dev_run and not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING
                and trainer.global_step > 0)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._can_save(trainer) and self._last_step_saved_as_last != trainer.global_step:
            self._save_last_now(trainer)

    # -- Ctrl-C ---------------------------------------------------------------------------------------------
    def _on_sigint(self, signum: int, frame: Any) -> None:
        self._interrupt_requested = True
        signal.signal(signal.SIGINT, self._previous_handler)  # a second Ctrl-C interrupts at once
        print("\nCtrl-C: saving a checkpoint after the current training step, then stopping "
              "(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        use_atomic_checkpoints(trainer.strategy)  # a failed write never leaves a truncated last.ckpt
        if stage == "fit" and self.save_on_interrupt and threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, self._on_sigint)
            self._previous_handler = signal.default_int_handler if previous is None else previous  # None: set in C

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_handler is not None:
            if signal.getsignal(signal.SIGINT) == self._on_sigint:
                signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        self._in_optimizer_step = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        self._in_optimizer_step = False
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        stop = self._interrupt_requested
        if trainer.world_size > 1:  # every rank must stop (and save) at the same step
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            self.interrupted_at, trainer.should_stop = trainer.global_step, True
            if not self._can_save(trainer):
                _say(trainer, f"Interrupted at step {trainer.global_step}: nothing to save yet")
                return
            path = self._save_last_now(trainer)
            _say(trainer, f"Interrupted at step {trainer.global_step}: checkpoint saved to {path} "
                          f"(resume with --ckpt_path {path})")

    # -- errors ---------------------------------------------------------------------------------------------
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if (not self.save_on_error or isinstance(exception, (NonFiniteLossError, CheckpointWriteError))
                or self._in_optimizer_step
                or trainer.world_size > 1 or not self._can_save(trainer)):
            return
        try:
            path = self._save_last_now(trainer)
        except Exception as e:  # never hide the original error behind a failed save
            _say(trainer, f"could not save a checkpoint after {type(exception).__name__}: {e}")
            return
        _say(trainer, f"{type(exception).__name__} at step {trainer.global_step}: checkpoint saved to {path}")


class ExactResume(L.Callback):
    """Save the torch (CPU and CUDA), numpy and python random states in each checkpoint; restore them when
    training resumes from one, at the start of training (after the dataloaders are built and the sanity check
    has run, exactly where the uninterrupted run continues).

    Also hands the saved position of a stateful training loader (``state_dict``/``load_state_dict``, e.g.
    :class:`datamodules.common.ResumableDataLoader`) to it when Lightning 2.6 has not: when ``max_epochs`` is set,
    ``estimated_stepping_batches`` (read by LR schedules in ``configure_optimizers``) builds the training loader
    before the checkpoint's loop state is read, and Lightning then never applies the saved loader state.
    """

    def __init__(self) -> None:
        self._to_restore: dict | None = None

    def state_dict(self) -> dict[str, Any]:
        # numpy's state as tensors and numbers: checkpoints must load with torch.load(weights_only=True)
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state = {"torch": torch.get_rng_state(), "python": random.getstate(),
                 "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                           "has_gauss": int(has_gauss), "gauss": float(gauss)}}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loop = trainer.fit_loop
        if loop.restarting and loop._combined_loader is not None and loop._combined_loader_states_to_load:
            loop._load_combined_loader_states()
        state, self._to_restore = self._to_restore, None
        if not state:
            return
        torch.set_rng_state(state["torch"])
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class NonFiniteLossGuard(L.Callback):
    """Raise :class:`NonFiniteLossError` when a training loss is NaN/inf, before its backward pass (so the
    weights and optimizer state stay those of the last finite step and no checkpoint with NaNs is written).
    The message names the step and the last checkpoint saved before it. In a multi-process run the decision is
    shared, so every rank stops at the same step."""

    def __init__(self) -> None:
        self._batch_idx = -1

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        saved = [c.last_model_path or c.best_model_path for c in trainer.checkpoint_callbacks
                 if isinstance(c, ModelCheckpoint)]
        saved = [p for p in saved if p]
        where = f"last good checkpoint: {saved[0]}" if saved else "no checkpoint was saved before it"
        raise NonFiniteLossError(
            f"training loss is {loss.detach().float().sum().item()} at step {trainer.global_step} "
            f"(epoch {trainer.current_epoch}, batch {self._batch_idx}); stopped before updating the weights; "
            f"{where}. Check the data and the learning rate (turn this check off with "
            f"--stop_on_nonfinite_loss false)")
