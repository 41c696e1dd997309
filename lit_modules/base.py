"""The one pattern every LightningModule here follows: an injected optimizer on the module's parameter groups.

Subclasses call ``super().__init__(optimizer=..., lr_scheduler=..., lr=..., ...)`` with their optimisation
arguments, implement their own ``training_step``/``validation_step``, and list the parameters to train in
:meth:`trainable_parameters` (frozen teachers/references are excluded there).

Choosing the optimizer follows LightningCLI's dependency-injection pattern: the module takes an
``optimizer: OptimizerCallable`` (and optionally an ``lr_scheduler: LRSchedulerCallable``) and applies it, once,
in :meth:`configure_optimizers`, to :meth:`parameter_groups` (weight decay on matrices only)::

    litpapers fit --config configs/ademamix/quick.yaml                       # as configured
    litpapers fit ... --model.optimizer AdEMAMix --model.optimizer.alpha 8   # any torch.optim.Optimizer
    litpapers fit ... --optimizer AdEMAMix --optimizer.lr 1e-3               # same: the CLI moves it to the model

Where the learning rate lives — one place, whichever optimizer is used:

- ``optimizer`` unset (``None``, the default): AdamW with the module's ``lr``, ``betas`` and ``weight_decay``
  (each module's defaults are its paper's). Existing Python code (``CausalLM(..., lr=1e-3)``) is unchanged.
- ``optimizer`` set: the optimizer's own arguments (``--model.optimizer.lr``) hold lr, betas and weight decay;
  the module's ``lr``/``betas``/``weight_decay`` are then the default AdamW's settings and must stay at their
  defaults or agree with the optimizer's: a different value is a ``ValueError`` naming both, never silently
  ignored. The weight decay of the injected optimizer applies to matrices; biases and norm scales get none.
- ``lr_scheduler`` unset: linear warm-up + cosine/constant decay (``warmup_steps``, ``lr_decay``,
  ``min_lr_ratio``) on whichever optimizer. Set: that scheduler instead, stepped every optimizer step (the
  module's schedule arguments must then stay at their defaults, as above).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterable

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from optimizers.schedules import warmup_cosine_factor

#: Module arguments that set the default AdamW / the default schedule, checked against an injected one.
OPTIMIZER_ARGUMENTS = ("lr", "betas", "weight_decay")
SCHEDULE_ARGUMENTS = ("warmup_steps", "lr_decay", "min_lr_ratio")


class PaperModule(L.LightningModule):
    """Base class: an injected optimizer (default AdamW) on two parameter groups + a per-step LR schedule.

    Args:
        optimizer: builds the optimizer from parameter groups (``torch.optim.AdamW``-like callable;
            LightningCLI: ``--model.optimizer AdEMAMix``). ``None``: AdamW(``lr``, ``betas``, ``weight_decay``).
        lr_scheduler: builds a scheduler from the optimizer, stepped per optimizer step. ``None``: warm-up +
            ``lr_decay`` below.
        lr: peak learning rate of the default AdamW.
        weight_decay: decoupled weight decay of the default AdamW, applied to matrices (≥ 2-D weights) only.
        betas: betas of the default AdamW.
        warmup_steps: linear warm-up steps of the default schedule.
        lr_decay: ``"cosine"`` (to ``min_lr_ratio``·lr at the last step) or ``"constant"`` after warm-up.
        min_lr_ratio: final learning rate as a fraction of the peak for the cosine decay.
    """

    def __init__(self, optimizer: OptimizerCallable | None = None, lr_scheduler: LRSchedulerCallable | None = None,
                 lr: float = 3e-4, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 warmup_steps: int = 0, lr_decay: str = "cosine", min_lr_ratio: float = 0.1):
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if lr_decay not in ("cosine", "constant"):
            raise ValueError(f"lr_decay must be 'cosine' or 'constant', got {lr_decay!r}")
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.warmup_steps, self.lr_decay, self.min_lr_ratio = warmup_steps, lr_decay, min_lr_ratio

    def trainable_parameters(self) -> Iterable[tuple[str, torch.nn.Parameter]]:
        """Named parameters the optimizer updates; override to exclude frozen sub-models."""
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad)

    def parameter_groups(self, weight_decay: float | None = None) -> list[dict]:
        """Two groups: weight-decayed matrices and undecayed vectors (biases, norm scales).

        ``weight_decay`` defaults to the module's own. :meth:`configure_optimizers` gives an injected optimizer
        the matrices' group without a ``weight_decay`` key, so that optimizer's own weight decay applies there.
        """
        decay, no_decay = [], []
        for _, p in self.trainable_parameters():
            (decay if p.ndim >= 2 else no_decay).append(p)
        wd = self.weight_decay if weight_decay is None else weight_decay
        return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]

    def lr_scheduler_config(self, optimizer: torch.optim.Optimizer) -> dict:
        """The injected ``lr_scheduler``, or a per-step ``LambdaLR`` with :func:`warmup_cosine_factor` over the
        trainer's estimated step count; either is stepped every optimizer step."""
        if self.lr_scheduler is not None:
            self._check_not_set_twice(SCHEDULE_ARGUMENTS, {}, "lr_scheduler")
            return {"scheduler": self.lr_scheduler(optimizer), "interval": "step"}
        total = None
        if self._trainer is not None:
            total = int(self.trainer.estimated_stepping_batches)
        factor = functools.partial(warmup_cosine_factor, warmup_steps=self.warmup_steps, total_steps=total,
                                   min_ratio=self.min_lr_ratio, decay=self.lr_decay)
        return {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, factor), "interval": "step"}

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer over :meth:`parameter_groups`: the injected one, or AdamW(``lr``, ``betas``,
        ``weight_decay``)."""
        if self.optimizer is None:
            return torch.optim.AdamW(self.parameter_groups(), lr=self.lr, betas=self.betas)
        decayed, plain = self.parameter_groups()
        del decayed["weight_decay"]  # the injected optimizer's own weight decay applies to the matrices
        optimizer = self.optimizer([decayed, plain])
        self._check_not_set_twice(OPTIMIZER_ARGUMENTS, optimizer.defaults, "optimizer")
        return optimizer

    def _check_not_set_twice(self, names: tuple[str, ...], injected: dict, injected_name: str) -> None:
        """Raise if a module argument in ``names`` was changed from its default while ``injected_name`` (which
        has its own setting, ``injected``) is used: one of the two would be silently ignored."""
        defaults = inspect.signature(type(self).__init__).parameters
        for name in names:
            value = getattr(self, name)
            default = defaults[name].default if name in defaults else inspect.Parameter.empty
            if default is inspect.Parameter.empty or _same(value, default):
                continue
            if name in injected and _same(value, injected[name]):
                continue
            if name in injected:
                raise ValueError(f"{type(self).__name__}: {name}={value!r} is set on the model and "
                                 f"{injected_name}'s {name}={injected[name]!r} is used instead; set it once, in the "
                                 f"{injected_name}'s arguments (--model.{injected_name}.{name}), and leave the "
                                 f"model's {name} at its default ({default!r})")
            raise ValueError(f"{type(self).__name__}: {name}={value!r} is set on the model for its own "
                             f"learning-rate schedule, which the {injected_name} replaces; leave {name} at its "
                             f"default ({default!r}) or drop the {injected_name}")

    def configure_optimizers(self):
        optimizer = self.build_optimizer()
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler_config(optimizer)}


def _same(a, b) -> bool:
    """Equal, comparing sequences (betas) on the module's entries: AdamW's 2 betas vs AdEMAMix's first 2 of 3."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return tuple(a) == tuple(b)[:len(a)]
    return a == b


class DeferredNetworksModule(PaperModule):
    """A :class:`PaperModule` whose networks are declared at construction and materialised in Lightning's
    ``configure_model`` hook (docs/sharding.md), the pattern Lightning documents for large models: one
    construction path for a single device, DDP and ``ModelParallelStrategy``.

    - **Construction** ends with :meth:`declare_networks`: :meth:`build_networks` runs on the meta device, so
      every network attribute exists with its architecture (shapes, dtypes, the checks that come with building it:
      vocabulary, layer lists, group sizes) but no memory and no weights.
    - **``configure_model``** (Lightning calls it at every ``fit``/``validate``/``test`` and in
      ``load_from_checkpoint``) runs :meth:`build_networks` again for real: weights loaded or initialised on the
      CPU in float32, or, under ``ModelParallelStrategy``, sharded from the meta device
      (:func:`lm.sharding.build_causal_lm`) so that no rank but 0 ever holds a whole model. Later calls leave them
      as they are.
    - **Outside a trainer**, ``module.configure_model()`` is the one call that materialises them (before a forward,
      ``state_dict()``, ``.to()``...); until then they are meta tensors and :attr:`networks_materialized` is False.

    Subclasses name their network attributes in ``trainable_networks``/``frozen_networks``, set all of them in
    :meth:`build_networks`, and call :meth:`declare_networks` as the last step of their ``__init__``.
    """

    trainable_networks: tuple[str, ...] = ()
    frozen_networks: tuple[str, ...] = ()

    def build_networks(self) -> None:
        """Set every attribute of ``trainable_networks`` and ``frozen_networks`` (a network may be ``None``),
        allocating on the current default device (the meta device when declaring)."""
        raise NotImplementedError

    @property
    def networks_materialized(self) -> bool:
        """Whether :meth:`configure_model` has built the networks with real weights."""
        return self.__dict__.get("_networks_materialized", False)

    def declare_networks(self) -> None:
        """Build the networks' architecture on the meta device (no memory); the end of every ``__init__``."""
        with torch.device("meta"), _default_dtype(torch.float32):
            self.build_networks()
        self.__dict__["_networks_materialized"] = False
        for name in self.trainable_networks + self.frozen_networks:
            if getattr(self, name) is not None:  # materialising replaces the network, and this hook with it
                getattr(self, name).register_forward_pre_hook(functools.partial(_not_materialized, self, name))
        if "_declared_hook" not in self.__dict__:  # the module's own forward, until materialised
            self.__dict__["_declared_hook"] = self.register_forward_pre_hook(
                functools.partial(_not_materialized, self, "forward"))

    def configure_model(self) -> None:
        """Materialise the networks the first time; later calls leave them as they are, except that networks
        materialised whole before a ``ModelParallelStrategy`` trainer attached are then sharded in place."""
        from lm.sharding import shard_module

        if self.networks_materialized:
            shard_module(self, [getattr(self, n) for n in self.trainable_networks],
                         [getattr(self, n) for n in self.frozen_networks])
            return
        # on the CPU in float32 whatever the trainer's device/precision contexts (the same random initialisation
        # everywhere); Lightning moves and casts the module afterwards
        with torch.device("cpu"), _default_dtype(torch.float32):
            self.build_networks()
        self.__dict__["_networks_materialized"] = True
        if "_declared_hook" in self.__dict__:
            self.__dict__.pop("_declared_hook").remove()


def _not_materialized(module: DeferredNetworksModule, name: str, *_) -> None:
    """Forward pre-hook of a declared (meta-device) network: one clear error instead of a meta-tensor one."""
    raise RuntimeError(f"{type(module).__name__}.{name} is declared but has no weights yet: call "
                       f"module.configure_model() first (a Trainer calls it at fit/validate/test)")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
