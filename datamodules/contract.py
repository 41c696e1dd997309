"""The datamodule ↔ module contract, in one place.

A few pieces of this package talk to each other through attributes of the object on the other side of the
``Trainer`` (``trainer.lightning_module`` / ``trainer.datamodule``) rather than through constructor
arguments. Each such hand-off is written down here as a :class:`typing.Protocol`, so that a user who brings
their own module or datamodule knows what to provide, and code can say what it needs in a type hint.

- :class:`TokenizerSource` (a module): ``TextDataModule``, ``InstructionDataModule``, ``PreferenceDataModule``
  and ``SequenceTasksDataModule`` read the attached module's ``tokenizer`` when they were given none
  (``datamodules.common.resolve_tokenizer``).
- :class:`PairModelSource` (a module): ``QDPOPairsDataModule`` calls ``pair_models()`` once for the two models,
  their tokenizer and fingerprint (:class:`PairModels`) and decodes with ``lm.sampling.generate_answers``.
- :class:`OfflineRLSource` (a datamodule): ``RADT``/``DecisionTransformer`` read its ``spec`` (:class:`OfflineRLSpec`:
  sizes and state statistics) at ``setup``, nothing else; ``ReturnAlignmentEval`` reads ``episode_returns``
  and calls ``make_env()``.
- :class:`PairsSource` (a datamodule): ``QDPO`` reads ``pairs`` and ``num_dropped_identical``;
  ``QuantizationEval`` calls ``records()``.

The protocols are ``runtime_checkable``: ``isinstance(dm, OfflineRLSource)`` checks that the attributes
exist (not their types). This module imports nothing from ``lit_modules`` or ``callbacks``: it sits on the
data floor, and the upper floors import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

from torch import nn


@runtime_checkable
class TokenizerSource(Protocol):
    """A module that owns the tokenizer its datamodule should use (a config then names it once).

    ``tokenizer`` is a Hugging Face tokenizer, or ``None`` to let the datamodule fall back to its own
    (byte-level by default). Every ``lit_modules`` language-model module provides it. Its ``chat_template``
    is the model's prompt format: read with ``lm.tokenizers.resolve_prompt_template`` by every prompt
    consumer, written with ``set_prompt_template`` by ``InstructionDataModule`` for the model it trains."""

    tokenizer: Any


class PairModels(NamedTuple):
    """What QDPO's pair generator needs from the module, in one object (:meth:`PairModelSource.pair_models`)."""

    full_precision: nn.Module
    """The model whose answers are *chosen*."""
    quantized: nn.Module
    """The model whose answers are *rejected*: the quantized policy before training."""
    tokenizer: Any
    """The tokenizer both share (prompt format and decoding)."""
    fingerprint: dict[str, str]
    """A JSON-able identity of the two models (weights, quantizer) that keys the on-disk pair cache, so that
    changing either regenerates the pairs."""


@runtime_checkable
class PairModelSource(Protocol):
    """A module that can hand its models to QDPO's pair generator (``datamodules.QDPOPairsDataModule`` calls it
    once, in ``prepare_data``/``setup``, before training starts, and decodes with ``lm.sampling.generate_answers``
    itself)."""

    def pair_models(self) -> PairModels:
        """The two models, their tokenizer and their fingerprint (:class:`PairModels`), with weights
        (materialised first if they were only declared)."""
        ...


@dataclass(frozen=True)
class OfflineRLSpec:
    """What a return-conditioned policy needs from its offline-RL data, in one object: the sizes to build its
    networks and the training states' statistics to normalise them (``OfflineRLSource.spec``)."""

    dataset: str
    """The dataset's name (error messages)."""
    state_dim: int
    """Observation size (flat)."""
    act_dim: int
    """Action size; the number of actions when ``discrete``."""
    discrete: bool
    """``True`` for a ``Discrete(n)`` action space (categorical head), ``False`` for a continuous one."""
    state_mean: Any
    """(state_dim,) float array: the training states' mean; the model stores it as a buffer."""
    state_std: Any
    """(state_dim,) float array: the training states' standard deviation (strictly positive)."""
    max_episode_len: int
    """The longest episode's length (the model's timestep table must cover it)."""


@runtime_checkable
class OfflineRLSource(Protocol):
    """An offline-RL datamodule as ``lit_modules.RADT``/``DecisionTransformer`` (at ``setup``: ``spec`` only, to
    size their networks and set their state-normalisation buffers) and ``callbacks.ReturnAlignmentEval`` (to pick
    targets and roll the policy out) read it. All attributes exist after the datamodule's ``setup``."""

    spec: OfflineRLSpec
    """Sizes and state statistics (:class:`OfflineRLSpec`)."""
    episode_returns: Any
    """1-D array of the dataset's episode returns (the evaluation targets are percentiles of it)."""

    def make_env(self, **kwargs: Any) -> Any:
        """A fresh ``gymnasium`` environment of the dataset's task, for rollouts."""
        ...


@runtime_checkable
class PairsSource(Protocol):
    """A preference datamodule as ``lit_modules.QDPO`` and ``callbacks.QuantizationEval`` read it
    (``datamodules.PreferenceDataModule`` and its subclasses). ``pairs`` is ``None`` before ``setup``.

    Optional: ``all_dataloader()`` (every pair once, in index order); ``DPO(precompute_ref_logps=True)`` scores
    the reference on it when present, else on the train and val loaders."""

    pairs: list[dict] | None
    """Every kept pair, ``pairs[i]["index"] == i``, with ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` and
    the original ``row``."""
    num_dropped_identical: int
    """Pairs dropped because chosen == rejected (logged by QDPO as ``data/pairs_identical_dropped``)."""

    def records(self) -> list[dict]:
        """The raw rows the pairs were built from (``QuantizationEval`` excludes their prompts from its
        held-out evaluation set)."""
        ...
