"""Probes and evaluation callbacks."""

from callbacks.figures import MetricFigures
from callbacks.generation_eval import GenerationEval, excess_accumulated_error, measure_exposure_bias
from callbacks.lifecycle import ExactResume, LastCheckpoint, NonFiniteLossError, NonFiniteLossGuard
from callbacks.loggers import VersionedCSVLogger, VersionedTensorBoardLogger
from callbacks.oversquashing import (
    OverSquashingProbe,
    RepresentationalCollapseProbe,
    SequenceTaskProbe,
    representational_collapse,
    token_sensitivity,
)
from callbacks.quantization_eval import QuantizationEval, evaluate_against_full_precision, token_flip_stats
from callbacks.return_alignment import ReturnAlignmentEval

__all__: list[str] = ["GenerationEval", "excess_accumulated_error", "measure_exposure_bias",
                      "ReturnAlignmentEval", "OverSquashingProbe", "RepresentationalCollapseProbe", "SequenceTaskProbe",
                      "representational_collapse", "token_sensitivity", "QuantizationEval",
                      "evaluate_against_full_precision", "token_flip_stats", "LastCheckpoint",
                      "NonFiniteLossError", "NonFiniteLossGuard", "ExactResume", "MetricFigures",
                      "VersionedTensorBoardLogger", "VersionedCSVLogger"]
