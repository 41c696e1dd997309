"""Figures out of modules: ``callbacks.MetricFigures`` draws logged metrics vs step to TensorBoard (DPO's reward
curves by default, from the module's ``metric_figures``), and no file under ``lit_modules/`` imports matplotlib."""

import ast
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks.figures import MetricFigures, draw_metric_figure
from datamodules import PreferenceDataModule
from lit_modules import DPO
from tiny_models import TINY



def _imported_modules(path: Path) -> set[str]:
    """Every module an ``import``/``from … import`` anywhere in the file names (function bodies included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_lightning_modules_import_no_plotting_library(root):
    files = sorted((root / "lit_modules").glob("*.py"))
    assert len(files) > 10
    plotting = {f.name: sorted(m for m in _imported_modules(f) if m.split(".")[0] == "matplotlib") for f in files}
    assert {name: mods for name, mods in plotting.items() if mods} == {}


def test_import_scanner_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from matplotlib.figure import Figure\n    import matplotlib.pyplot\n")
    assert _imported_modules(source) == {"os", "matplotlib.figure", "matplotlib.pyplot"}


def test_dpo_fit_with_validations_writes_the_reward_figure(tmp_path):
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    figures = MetricFigures()
    trainer = L.Trainer(max_steps=3, val_check_interval=1, limit_val_batches=1, logger=logger, callbacks=[figures],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(DPO(model=TINY), datamodule=PreferenceDataModule(num_examples=40, batch_size=4, val_fraction=0.2))
    assert [h["step"] for h in figures.history] == [1, 2, 3]  # one point per validation, sanity check excluded
    assert set(figures.history[0]) == {"step", "val/reward_chosen", "val/reward_rejected", "val/reward_margin",
                                       "val/reward_accuracy"}
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert "val/rewards" in events.Tags()["images"]
    assert [e.step for e in events.Images("val/rewards")] == [2, 3]  # drawn from the second point on
    logged = [e.value for e in events.Scalars("val/reward_margin")]  # the points are the logged values
    assert logged == pytest.approx([h["val/reward_margin"] for h in figures.history], rel=1e-6)


def test_a_module_without_metric_figures_gets_none_and_explicit_figures_work(tmp_path):
    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def training_step(self, batch, batch_idx):
            return (self.w * batch[0]).sum()

        def validation_step(self, batch, batch_idx):
            self.log("val/w", self.w.detach().sum())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.ones(4, 1)), batch_size=1)
    runs = {}
    for name, callback in (("default", MetricFigures()), ("explicit", MetricFigures({"val/w": {"w": ["val/w"]}}))):
        logger = TensorBoardLogger(str(tmp_path), name=name)
        L.Trainer(max_steps=2, val_check_interval=1, limit_val_batches=1, logger=logger, callbacks=[callback],
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  num_sanity_val_steps=0).fit(Plain(), loader, loader)
        events = EventAccumulator(logger.log_dir)
        events.Reload()
        runs[name] = (events.Tags()["images"], [h["step"] for h in callback.history])
    assert runs["default"] == ([], [])
    assert runs["explicit"] == (["val/w"], [1, 2])


def test_figure_draws_each_panels_recorded_metrics_and_bad_specs_are_named():
    history = [{"step": 1, "a": 1.0, "b": 2.0}, {"step": 2, "a": 0.5}]
    fig = draw_metric_figure({"first": ["a", "b"], "never logged": ["c"]}, history)
    (ax,) = fig.axes  # the panel without a recorded metric is left out
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert lines == {"a": ([1, 2], [1.0, 0.5]), "b": ([1], [2.0])}
    assert draw_metric_figure({"p": ["c"]}, history) is None
    with pytest.raises(ValueError, match="MetricFigures.figures must map a figure tag"):
        MetricFigures({"val/x": ["a"]})


def test_history_survives_a_checkpoint():
    figures = MetricFigures()
    figures.history = [{"step": 1, "val/loss": 0.5}]
    again = MetricFigures()
    again.load_state_dict(figures.state_dict())
    assert again.history == [{"step": 1, "val/loss": 0.5}]


def test_the_cli_adds_metric_figures_by_default_so_the_dpo_config_draws_its_rewards(root):
    from cli import build_cli

    cli = build_cli(["fit", "--config", str(root / "configs/dpo/dpo.yaml"), "--trainer.max_steps", "2",
                     "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1",
                     "--data.num_examples", "40", "--trainer.enable_progress_bar", "false",
                     "--trainer.enable_checkpointing", "false", "--model.export_dir", "null"])
    assert sum(isinstance(c, MetricFigures) for c in cli.trainer.callbacks) == 1
    events = EventAccumulator(cli.trainer.logger.log_dir)
    events.Reload()
    assert "val/rewards" in events.Tags()["images"]
