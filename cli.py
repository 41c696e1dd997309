"""``litpapers``: one LightningCLI for every module, datamodule, callback and optimizer in this package.

    litpapers fit --config configs/ademamix/quick.yaml
    litpapers fit --config configs/ademamix/quick.yaml --optimizer AdEMAMix --optimizer.lr 1e-3
    litpapers validate --config configs/probes/probe_local_model.yaml --model.model /path/to/hf_model

Models and datamodules are chosen in subclass mode (``model.class_path: lit_modules.CausalLM`` or just
``CausalLM``). Defaults: TensorBoard logger under ``logs/``, rich progress bar, ``seed_everything: 0``.
An ``--optimizer`` replaces the module's AdamW but keeps the module's parameter groups (no weight decay
on biases/norms, frozen teachers excluded) and its warm-up/decay schedule unless ``--lr_scheduler`` is set.
"""

from __future__ import annotations

import inspect
import os

import torch
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI, LRSchedulerTypeUnion

# Imported so their classes resolve by short name (``--optimizer AdEMAMix``, ``CausalLM``, callbacks).
import callbacks  # noqa: F401
import datamodules  # noqa: F401
import lit_modules  # noqa: F401
import optimizers  # noqa: F401
from lit_modules.base import PaperModule

DEFAULT_CHECKPOINT_EVERY = 200

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def rebuild_on_module_groups(module: PaperModule, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Re-create ``optimizer`` (built by LightningCLI over *all* parameters) on the module's parameter groups,
    with the same constructor arguments; the ``--optimizer``'s weight decay applies to matrices only."""
    accepted = inspect.signature(type(optimizer).__init__).parameters
    kwargs = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    groups = module.parameter_groups(weight_decay=optimizer.defaults.get("weight_decay", 0.0))
    return type(optimizer)(groups, **kwargs)


class LitPapersCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"trainer.logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                                "init_args": {"save_dir": "logs", "name": "litpapers"}}})

    def before_instantiate_classes(self) -> None:
        """Add the default callbacks a config did not list itself (a config's own ``callbacks`` list extends
        these rather than silently dropping them): a rich progress bar, per-step LR logging, and a checkpoint
        every ``DEFAULT_CHECKPOINT_EVERY`` steps plus ``last.ckpt`` so an interrupted run resumes with
        ``--ckpt_path logs/<name>/version_N/checkpoints/last.ckpt``. Each is skipped when the matching trainer switch is off."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        listed = [str(c.get("class_path", "")) for c in (trainer.get("callbacks") or [])]
        defaults = []
        if trainer.get("enable_progress_bar") is not False and not any(c.endswith("ProgressBar") for c in listed):
            defaults.append({"class_path": "lightning.pytorch.callbacks.RichProgressBar", "init_args": {}})
        if trainer.get("logger") not in (False, None) and not any(c.endswith("LearningRateMonitor") for c in listed):
            defaults.append({"class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
                             "init_args": {"logging_interval": "step"}})
        if trainer.get("enable_checkpointing") is not False and not any(c.endswith("ModelCheckpoint") for c in listed):
            defaults.append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                             "init_args": {"save_last": True, "every_n_train_steps": DEFAULT_CHECKPOINT_EVERY}})
        if defaults:
            trainer.callbacks = list(trainer.get("callbacks") or []) + [Namespace(class_path=d["class_path"], init_args=Namespace(**d["init_args"]))
                                                                 for d in defaults]

    @staticmethod
    def configure_optimizers(lightning_module, optimizer, lr_scheduler: LRSchedulerTypeUnion | None = None):
        if not isinstance(lightning_module, PaperModule):
            return LightningCLI.configure_optimizers(lightning_module, optimizer, lr_scheduler)
        if lr_scheduler is not None:
            # The scheduler was built on the CLI's optimizer: keep both, stepping the scheduler per step.
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "interval": "step"}}
        optimizer = rebuild_on_module_groups(lightning_module, optimizer)
        return {"optimizer": optimizer, "lr_scheduler": lightning_module.lr_scheduler_config(optimizer)}


def build_cli(args: list[str] | None = None, run: bool = True) -> LitPapersCLI:
    """Parse ``args`` (default: the command line) and, with ``run``, execute the subcommand; tests call this
    in-process and inspect ``.trainer``/``.model``/``.datamodule``."""
    return LitPapersCLI(model_class=None, datamodule_class=None, subclass_mode_model=True,
                        subclass_mode_data=True, args=args, run=run)


def main() -> None:
    """Console entry point: ``litpapers fit|validate|test|predict --config FILE``."""
    build_cli()


if __name__ == "__main__":
    main()
