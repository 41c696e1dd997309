"""Nothing lost: last.ckpt is the final state, Ctrl-C and errors save a checkpoint and say where, a NaN loss stops
the run before it reaches the weights (callbacks/lifecycle.py, wired in by training/cli.py)."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

import cli
import training.cli
from callbacks import LastCheckpoint, NonFiniteLossError, NonFiniteLossGuard

ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "configs" / "ademamix" / "quick_adamw.yaml")
FAST = ["--data.init_args.max_documents", "40", "--data.init_args.block_size", "32",
        "--data.init_args.batch_size", "4", "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar",
        "false"]


def _step(path) -> int:
    return torch.load(path, weights_only=False)["global_step"]


def test_last_ckpt_is_the_final_step_when_the_period_does_not_divide_max_steps(monkeypatch):
    # Lightning 2.6 alone leaves last.ckpt at step 3 here (written by every_n_train_steps, not rewritten at the end).
    monkeypatch.setattr(training.cli, "DEFAULT_CHECKPOINT_EVERY", 3)
    run = cli.build_cli(["fit", "--config", QUICK, "--trainer.max_steps", "5", "--trainer.val_check_interval", "5",
                         *FAST])
    (last,) = Path("logs").rglob("last.ckpt")
    saved = torch.load(last, weights_only=False)
    assert saved["global_step"] == 5 == run.trainer.global_step
    for name, value in run.model.state_dict().items():
        assert torch.equal(saved["state_dict"][name], value), name


class _RaiseAt(L.Callback):
    def __init__(self, step: int, hook: str):
        self.step, self.hook = step, hook

    def _maybe_raise(self, trainer, hook):
        if hook == self.hook and trainer.global_step == self.step:
            raise ValueError(f"boom at {self.step}")

    def on_train_batch_start(self, trainer, *args):
        self._maybe_raise(trainer, "batch_start")


def _trainer(tmp_path, *callbacks, max_steps=10):
    return L.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, default_root_dir=tmp_path,
                     callbacks=[LastCheckpoint(dirpath=tmp_path, every_n_train_steps=100), *callbacks])


def test_an_error_between_steps_saves_last_ckpt_and_says_where(tmp_path, capsys):
    model = BoringModel()
    with pytest.raises(ValueError, match="boom at 3"):
        _trainer(tmp_path, _RaiseAt(3, "batch_start")).fit(model)
    assert _step(tmp_path / "last.ckpt") == 3
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        f"ValueError at step 3: checkpoint saved to {tmp_path / 'last.ckpt'}"


class _HalfUpdatingSGD(torch.optim.SGD):
    """Fails at its 4th update after changing only the first parameter: the weights match no step."""

    def step(self, closure=None):
        closure()
        self.calls = getattr(self, "calls", 0) + 1
        params = [p for g in self.param_groups for p in g["params"]]
        for p in params if self.calls < 4 else params[:1]:
            p.data.add_(p.grad, alpha=-0.1)
        if self.calls == 4:
            raise RuntimeError("failed half-way through the update")


class _HalfStepModel(BoringModel):
    def configure_optimizers(self):
        return _HalfUpdatingSGD(self.parameters(), lr=0.1)


def test_an_error_inside_an_optimizer_update_saves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="half-way"):
        _trainer(tmp_path).fit(_HalfStepModel())
    assert not (tmp_path / "last.ckpt").exists()


class _NaNFromStep(BoringModel):
    def __init__(self, step: int):
        super().__init__()
        self.nan_step = step

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        if self.global_step >= self.nan_step:
            out["loss"] = out["loss"] * float("nan")
        return out


def test_non_finite_loss_stops_before_the_update_and_keeps_the_last_good_checkpoint(tmp_path):
    model = _NaNFromStep(5)
    checkpoint = LastCheckpoint(dirpath=tmp_path, every_n_train_steps=2)
    trainer = L.Trainer(max_steps=10, logger=False, enable_progress_bar=False, limit_val_batches=0,
                        callbacks=[checkpoint, NonFiniteLossGuard()])
    with pytest.raises(NonFiniteLossError, match=r"training loss is nan at step 5 .*last good checkpoint: "
                                                 + str(tmp_path / "last.ckpt")):
        trainer.fit(model)
    assert trainer.global_step == 5
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN never reached the weights
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 4 and all(torch.isfinite(v).all() for v in saved["state_dict"].values())


def test_cli_stops_a_diverging_run_by_default_and_the_switch_turns_it_off(monkeypatch):
    # lr 1e30 makes the loss non-finite within a few steps; before, the run trained on NaN to the end.
    diverge = ["fit", "--config", QUICK, "--trainer.max_steps", "6", "--trainer.val_check_interval", "6",
               "--model.init_args.optimizer.init_args.lr", "1e30", "--model.init_args.warmup_steps", "0", *FAST]
    with pytest.raises(NonFiniteLossError, match="training loss is (nan|inf|-inf) at step [1-5] "):
        cli.build_cli(diverge)
    run = cli.build_cli([*diverge, "--stop_on_nonfinite_loss", "false"])
    assert run.trainer.global_step == 6 and not math.isfinite(float(run.trainer.callback_metrics["train/loss"]))


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def test_ctrl_c_finishes_the_step_saves_last_ckpt_and_says_where(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "cli", "fit", "--config", QUICK, "--trainer.max_steps",
                             "100000", "--trainer.val_check_interval", "100000", "--trainer.log_every_n_steps", "1",
                             *FAST], cwd=tmp_path, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # wait until training steps are being logged: the event file exists and then grows (TensorBoard flushes
        # its queue every few logged scalars), rather than sleeping a fixed time
        deadline = time.time() + 120
        while not (events := list(tmp_path.rglob("events.out.tfevents.*"))) and time.time() < deadline:
            time.sleep(0.1)
        assert events, "the run never created its TensorBoard event file"
        first_size = events[0].stat().st_size
        while events[0].stat().st_size == first_size and time.time() < deadline:
            time.sleep(0.1)
        assert events[0].stat().st_size > first_size, "no training step was logged"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == cli.EXIT_INTERRUPTED, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("Interrupted at step ") and "checkpoint saved to " in last, err[-2000:]
    step = int(last.split("Interrupted at step ")[1].split(":")[0])
    path = Path(last.split("checkpoint saved to ")[1].split(" (resume")[0])
    assert step >= 1 and _step(tmp_path / path if not path.is_absolute() else path) == step
