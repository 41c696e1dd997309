"""Validation and fitness of a candidate preference loss (docs/papers.md §6 "Discovery loop"; issue 15).

Both run inside the sandbox worker (:mod:`discovery.sandbox`); :meth:`Fitness.prepare` runs once in
the parent (trusted: e.g. the SFT of the starting policy), :meth:`Fitness.setup` in each worker *before* the
candidate's code is loaded (building data and models may read files), :meth:`Fitness.evaluate` after it.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

log = logging.getLogger(__name__)

#: The candidate loss's parameters, in order (checked statically by the sandbox and at run time here).
SIGNATURE = "(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)"


class InfrastructureError(RuntimeError):
    """Scoring failed for a reason that is not the candidate's fault (missing model, worker could not start...):
    archived as ``failure: infrastructure`` and retried when the run is resumed."""


def validate_loss(fn, n: int = 10, beta: float = 0.05, seed: int = 0) -> None:
    """The DiscoPOP validity check (docs/papers.md §6): called on random log-probs of shape (n,) that require grad,
    the loss must return a floating tensor of shape (n,), finite, whose mean has finite gradients with respect to
    the policy log-probs, at least one of them non-zero. Raises ``ValueError`` with the reason."""
    if not callable(fn):
        raise ValueError("the candidate is not callable")
    g = torch.Generator().manual_seed(seed)
    inputs = [(-torch.rand(n, generator=g) * 20 - 0.1).requires_grad_() for _ in range(4)]
    try:
        out = fn(*inputs, beta=beta)  # as lit_modules.preference_loss calls it during training
    except TypeError as e:
        raise ValueError(f"calling the loss as fn{SIGNATURE} failed: {e}") from e
    if not isinstance(out, Tensor):
        raise ValueError(f"the loss must return a torch.Tensor of shape ({n},), got {type(out).__name__}")
    if out.shape != (n,):
        raise ValueError(f"the loss must return shape ({n},) (one loss per pair), got {tuple(out.shape)}")
    if not out.is_floating_point():
        raise ValueError(f"the loss must return a floating-point tensor, got {out.dtype}")
    if not torch.isfinite(out).all():
        raise ValueError(f"the loss returned non-finite values (NaN/inf) on random inputs: {out.tolist()}")
    if not out.requires_grad:
        raise ValueError("the loss does not depend on its inputs (no gradient)")
    out.mean().backward()
    grads = [x.grad for x in inputs[:2]]
    if all(gr is None or not gr.any() for gr in grads):
        raise ValueError("the loss has no gradient with respect to the policy log-probs")
    if any(gr is not None and not torch.isfinite(gr).all() for gr in grads):
        raise ValueError("the loss has non-finite gradients (NaN/inf) on random inputs")



class Fitness:
    """How a valid candidate loss is scored. Subclasses take JSON-friendly init arguments (they travel to the
    worker as :func:`fitness_config`) and implement :meth:`evaluate`; ``metric`` names the key of the returned
    metrics that is the fitness (higher is better)."""

    metric = "fitness"

    def __init__(self, **init_args: Any):
        self.init_args = init_args

    def prepare(self, run_dir: Path) -> None:
        """Once per run, in the parent, before any worker (trusted work such as an SFT stage)."""

    def setup(self) -> None:
        """In each worker, before the candidate's code is loaded (may read files)."""

    def evaluate(self, loss_fn, length_normalize: bool = False) -> dict[str, float]:
        raise NotImplementedError


def fitness_config(fitness: Fitness) -> dict:
    """What a worker needs to rebuild ``fitness``: its class path and init arguments, every local path made
    absolute (a worker runs in its own temporary directory, not in the caller's)."""
    cls = type(fitness)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}",
            "init_args": {k: absolute_path(v) for k, v in fitness.init_args.items()}}


def absolute_path(value: Any) -> Any:
    """``value`` resolved against the current working directory when it is a string naming a local path: an
    existing file or directory, or one spelled as a path as ``lm.model_aliases.check_model_source`` reads
    it (``./x``, ``../x``, ``~/x``, ``a/b/c``, ``a/b`` with a local folder ``a``); anything else (a hub id
    ``org/name``, a metric name) unchanged."""
    if not isinstance(value, str) or not value or value == "byte" or "\n" in value:
        return value
    parts = Path(value).parts
    if (os.path.exists(value) or value.startswith(("./", "../", "~")) or len(parts) > 2
            or (len(parts) > 1 and os.path.isdir(parts[0]))):
        return os.path.abspath(os.path.expanduser(value))
    return value


def build_fitness(config: dict) -> Fitness:
    module, _, name = config["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**config["init_args"])


class DPOFitness(Fitness):
    """Held-out reward accuracy after a short DPO run with the candidate loss on the built-in preference pairs
    (``datamodules.PreferenceDataModule``) at the paper's β = 0.05: the fraction of held-out pairs with
    β·(log π(y_w) − log π_ref(y_w)) > β·(log π(y_l) − log π_ref(y_l)). Runs offline on CPU.

    Args:
        model: starting policy (and reference): a ``save_pretrained`` directory or a config dict (tiny model).
        sft_steps: if > 0 and ``model`` is a config dict, first train it for this many steps on the built-in
            instruction task (``lit_modules.CausalLM``) once per run (``<run_dir>/sft``) and start from that.
        sft_lr: learning rate of that SFT stage.
        steps: preference-optimisation steps per candidate.
        beta: β of every candidate (the paper's 0.05).
        lr, warmup_steps: optimiser settings of the DPO run.
        batch_size: pairs per step.
        num_pairs: built-in pairs (``val_fraction`` of them held out).
        val_fraction: held-out fraction.
        data_seed: seed of the built-in pairs and their split.
        train_seed: seed of batch order and dropout (the same for every candidate).
        metric: ``val_reward_accuracy`` (default), ``val_reward_margin`` or ``neg_val_loss``... any key of the
            returned metrics.
    """

    def __init__(self, model: str | dict | None = None, sft_steps: int = 0, sft_lr: float = 3e-3, steps: int = 100,
                 beta: float = 0.05, lr: float = 1e-4, warmup_steps: int = 10, batch_size: int = 16,
                 num_pairs: int = 2000, val_fraction: float = 0.1, data_seed: int = 1, train_seed: int = 1,
                 metric: str = "val_reward_accuracy"):
        model = {"hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 4} if model is None else model
        super().__init__(model=model, sft_steps=sft_steps, sft_lr=sft_lr, steps=steps, beta=beta, lr=lr,
                         warmup_steps=warmup_steps, batch_size=batch_size, num_pairs=num_pairs,
                         val_fraction=val_fraction, data_seed=data_seed, train_seed=train_seed, metric=metric)
        if steps < 1 or beta <= 0 or not 0 < val_fraction < 1:
            raise ValueError(f"fitness: need steps >= 1, beta > 0, 0 < val_fraction < 1; got {steps}, {beta}, "
                             f"{val_fraction}")
        self.metric = metric
        self.datamodule = None

    def prepare(self, run_dir: Path) -> None:
        args = self.init_args
        if args["sft_steps"] <= 0 or not isinstance(args["model"], dict):
            return
        sft_dir = Path(run_dir).absolute() / "sft"  # workers run elsewhere: never a relative path
        if not (sft_dir / "config.json").exists():
            import lightning as L

            from datamodules import InstructionDataModule
            from lit_modules import CausalLM

            log.info("discovery: SFT of the starting policy for %d steps -> %s", args["sft_steps"], sft_dir)
            L.seed_everything(0, verbose=False)
            module = CausalLM(model=args["model"], init_seed=0, lr=args["sft_lr"], warmup_steps=20, weight_decay=0.0)
            dm = InstructionDataModule(num_examples=4000, batch_size=32, seed=0, val_fraction=0.05)
            _trainer(args["sft_steps"], limit_val_batches=0).fit(module, datamodule=dm)
            module.export(sft_dir)
        self.init_args = args | {"model": str(sft_dir), "sft_steps": 0}

    def setup(self) -> None:
        from datamodules import PreferenceDataModule

        args = self.init_args
        if isinstance(args["model"], str):  # here, before the candidate runs: a missing model is not its fault
            from lm.model_aliases import resolve_model_alias

            try:
                resolve_model_alias(args["model"])  # raises FileNotFoundError naming a missing model
            except FileNotFoundError as e:
                raise InfrastructureError(f"fitness: {e}") from None
        self.datamodule = PreferenceDataModule(num_examples=args["num_pairs"], seed=args["data_seed"],
                                               batch_size=args["batch_size"], val_fraction=args["val_fraction"])
        self.datamodule.setup("fit")

    def evaluate(self, loss_fn, length_normalize: bool = False) -> dict[str, float]:
        import lightning as L

        from lit_modules.dpo import DPO

        if self.datamodule is None:
            self.setup()
        L.seed_everything(self.init_args["train_seed"], verbose=False)
        args = self.init_args
        module = DPO(model=args["model"], loss=loss_fn, beta=args["beta"], lr=args["lr"],
                     warmup_steps=args["warmup_steps"], length_normalize=length_normalize, init_seed=0)
        _trainer(self.init_args["steps"], limit_val_batches=0, callbacks=[FiniteTrainingLoss()]).fit(
            module, datamodule=self.datamodule)
        if not all(torch.isfinite(p).all() for p in module.policy.parameters()):
            raise ValueError("training diverged: the policy has non-finite parameters after the DPO run")
        val = _trainer(1).validate(module, datamodule=self.datamodule, verbose=False)[0]
        metrics = {f"val_{k.removeprefix('val/')}": float(v) for k, v in val.items() if k.startswith("val/")}
        metrics["neg_val_loss"] = -metrics["val_loss"]
        if self.metric not in metrics or not math.isfinite(metrics[self.metric]):
            raise ValueError(f"fitness metric {self.metric!r} is missing or not finite: {metrics}")
        return metrics


class FiniteTrainingLoss(L.Callback):
    """Stops the fitness run with ``ValueError`` at the first non-finite training loss (a loss that is inf/NaN
    only during training would otherwise be scored: its gradient can stay finite; issue 24.4)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss).all():
            raise ValueError(f"the training loss is not finite ({float(loss)}) at step {trainer.global_step}: "
                             "a loss must be finite on every training batch")


def _trainer(steps: int, **kwargs):
    import lightning as L

    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                     num_sanity_val_steps=0, **kwargs)
