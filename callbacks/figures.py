"""Curves of logged metrics over training, drawn as TensorBoard figures by one callback, so that modules log numbers
and need no plotting library.

:class:`MetricFigures` reads the metrics a module logged (``trainer.callback_metrics``) after every validation and
redraws each figure it was asked for: one panel per group of metrics, value vs global step. What to draw comes from
its ``figures`` argument or, by default, from the module's ``metric_figures`` attribute (``lit_modules.DPO``
declares its reward curves there); a module without one gets no figure. ``litpapers`` adds the callback by default
whenever a logger is on.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure

#: tag -> panel title -> names of logged metrics drawn in that panel.
FigureSpec = dict[str, dict[str, list[str]]]


def check_figure_spec(figures: Any, where: str) -> FigureSpec:
    """``figures`` if it maps tags to panels to lists of metric names, else a ``ValueError`` naming ``where``."""
    ok = isinstance(figures, dict) and all(
        isinstance(tag, str) and isinstance(panels, dict) and panels and all(
            isinstance(title, str) and isinstance(names, list) and names and all(isinstance(n, str) for n in names)
            for title, names in panels.items())
        for tag, panels in figures.items())
    if not ok:
        raise ValueError(f"{where} must map a figure tag to {{panel title: [metric names]}} (non-empty), e.g. "
                         f"{{'val/rewards': {{'rewards': ['val/reward_chosen', 'val/reward_rejected']}}}}, "
                         f"got {figures!r}")
    return figures


def draw_metric_figure(panels: dict[str, list[str]], history: list[dict[str, float]]) -> Figure | None:
    """One row of panels; in each, every metric of that panel that ``history`` recorded, value vs ``step``
    (``history``: one ``{"step": s, metric: value, ...}`` per validation). ``None`` when no metric was recorded."""
    drawn = {title: [n for n in names if any(n in h for h in history)] for title, names in panels.items()}
    drawn = {title: names for title, names in drawn.items() if names}
    if not drawn:
        return None
    fig = Figure(figsize=(4 * len(drawn), 3))
    axes = fig.subplots(1, len(drawn), squeeze=False)[0]
    for ax, (title, names) in zip(axes, drawn.items()):
        for name in names:
            points = [(h["step"], h[name]) for h in history if name in h]
            ax.plot(*zip(*points), marker="o", label=name)
        ax.set(xlabel="step", title=title)
        if len(names) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


class MetricFigures(L.Callback):
    """Redraw figures of logged metrics vs step after every validation (sanity checks excluded), to the first
    :class:`~lightning.pytorch.loggers.TensorBoardLogger` (rank 0). A figure appears once two validations recorded
    one of its metrics. The recorded values travel in checkpoints, so a resumed run keeps its earlier points.

    Args:
        figures: ``{tag: {panel title: [metric names]}}``; ``None`` (default) = the module's ``metric_figures``
            attribute (no figure when it has none).
    """

    def __init__(self, figures: FigureSpec | None = None):
        self.figures = None if figures is None else check_figure_spec(figures, "MetricFigures.figures")
        self.history: list[dict[str, float]] = []

    def _spec(self, pl_module: L.LightningModule) -> FigureSpec:
        if self.figures is not None:
            return self.figures
        spec = getattr(pl_module, "metric_figures", None)
        return {} if spec is None else check_figure_spec(spec, f"{type(pl_module).__name__}.metric_figures")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_validation_end, not on_validation_epoch_end: the callbacks' epoch-end hook runs before the module's, whose
        # epoch-level logs reach ``callback_metrics`` only after both
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        spec = self._spec(pl_module)
        names = {n for panels in spec.values() for group in panels.values() for n in group}
        values = {n: float(v) for n, v in trainer.callback_metrics.items() if n in names and v.numel() == 1}
        values = {n: v for n, v in values.items() if math.isfinite(v)}
        if not values:
            return
        self.history.append({"step": trainer.global_step, **values})
        logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is None or not trainer.is_global_zero:
            return
        for tag, panels in spec.items():
            if sum(any(n in h for group in panels.values() for n in group) for h in self.history) < 2:
                continue
            fig = draw_metric_figure(panels, self.history)
            if fig is not None:
                logger.experiment.add_figure(tag, fig, global_step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict["history"])
