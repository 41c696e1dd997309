"""The datamodule ↔ module contract, in one place.

A few pieces of this package talk to each other through attributes of the object on the other side of the
``Trainer`` (``trainer.lightning_module`` / ``trainer.datamodule``) rather than through constructor
arguments. Each such hand-off is written down here as a :class:`typing.Protocol`, so that a user who brings
their own module or datamodule knows what to provide, and code can say what it needs in a type hint.

- :class:`TokenizerSource` (a module): ``TextDataModule``, ``InstructionDataModule``, ``PreferenceDataModule``
  and ``SequenceTasksDataModule`` read the attached module's ``tokenizer`` when they were given none
  (``datamodules.common.resolve_tokenizer``).
- :class:`PairModelSource` (a module): ``QDPOPairsDataModule`` calls ``pair_models()`` for the two models and
  answers with the module's ``generate_answers`` (the package's one sampler, which lives upstairs in
  ``lm/sampling.py``: handed down through the module, not imported).
- :class:`OfflineRLSource` (a datamodule): ``RADT``/``DecisionTransformer`` read ``state_dim``, ``act_dim``,
  ``discrete``, ``state_mean``, ``state_std`` at ``setup``; ``ReturnAlignmentEval`` reads ``episode_returns``
  and calls ``make_env()``.
- :class:`PairsSource` (a datamodule): ``QDPO`` reads ``pairs`` and ``num_dropped_identical``;
  ``QuantizationEval`` calls ``records()``.

The protocols are ``runtime_checkable``: ``isinstance(dm, OfflineRLSource)`` checks that the attributes
exist (not their types). This module imports nothing from ``lit_modules`` or ``callbacks``: it sits on the
data floor, and the upper floors import it.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import nn


@runtime_checkable
class TokenizerSource(Protocol):
    """A module that owns the tokenizer its datamodule should use (a config then names it once).

    ``tokenizer`` is a Hugging Face tokenizer, or ``None`` to let the datamodule fall back to its own
    (byte-level by default). Every ``lit_modules`` language-model module provides it. Its ``chat_template``
    is the model's prompt format: read with ``lm.tokenizers.resolve_prompt_template`` by every prompt
    consumer, written with ``set_prompt_template`` by ``InstructionDataModule`` for the model it trains."""

    tokenizer: Any


@runtime_checkable
class PairModelSource(Protocol):
    """A module that can generate QDPO preference pairs (``datamodules.QDPOPairsDataModule`` calls it in
    ``prepare_data``/``setup``, before training starts)."""

    def pair_models(self) -> tuple[nn.Module, nn.Module, Any, dict[str, str]]:
        """``(full_precision, quantized, tokenizer, fingerprint)``: the model whose answers are *chosen*, the
        model whose answers are *rejected* (the round-to-nearest quantized policy before training), the
        tokenizer both share, and a JSON-able fingerprint of the two (weights, quantizer) that keys the
        on-disk pair cache, so changing either regenerates the pairs."""
        ...

    def generate_answers(self, model: nn.Module, prompts: list[str], *, max_new_tokens: int, batch_size: int,
                         max_prompt_length: int, do_sample: bool, temperature: float, seed: int) -> list[str]:
        """``model``'s answer to each prompt string (decoded up to EOS, the module's tokenizer): greedy unless
        ``do_sample``; batch ``i`` of ``batch_size`` prompts draws from a generator seeded ``seed + i`` (two models
        given the same prompts and seed share their random numbers). ``lit_modules.QDPO`` answers with
        ``lm.sampling.generate_answers``."""
        ...


@runtime_checkable
class OfflineRLSource(Protocol):
    """An offline-RL datamodule as ``lit_modules.RADT``/``DecisionTransformer`` (at ``setup``, to size their
    networks and set their state-normalisation buffers) and ``callbacks.ReturnAlignmentEval`` (to pick
    targets and roll the policy out) read it. All attributes exist after the datamodule's ``setup``."""

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
