"""Small pieces shared by the datamodules: the tokenizer hand-off, the batch-size check and a training loader
that resumes mid-epoch (:class:`ResumableDataLoader`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from datamodules.contract import TokenizerSource
from lm.tokenizers import load_tokenizer


def resolve_tokenizer(datamodule: L.LightningDataModule, tokenizer: str | None):
    """The datamodule's tokenizer: the one it was given, else the attached module's ``tokenizer`` (the model
    owns it, so a config names it once: :class:`~datamodules.contract.TokenizerSource`), else byte-level."""
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    trainer = getattr(datamodule, "trainer", None)
    module: TokenizerSource | None = trainer.lightning_module if trainer is not None else None
    if module is not None and getattr(module, "tokenizer", None) is not None:
        return module.tokenizer
    return load_tokenizer(None)


def check_batch_size(batch_size: int, owner: str) -> None:
    """Raise a ``ValueError`` naming ``owner`` (the datamodule) unless ``batch_size`` is a positive integer: a
    zero or negative size would otherwise fail deep inside ``torch.utils.data``, after the model is loaded."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{owner}: batch_size must be >= 1, got {batch_size}")


def cache_dir(*parts: str) -> Path:
    """Where generated data and caches live: ``$LITPAPERS_CACHE`` or ``~/.cache/litpapers``, plus ``parts``."""
    base = Path(os.environ.get("LITPAPERS_CACHE", Path.home() / ".cache" / "litpapers"))
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


class ResumableRandomSampler(Sampler[int]):
    """A random permutation per epoch that a checkpoint can resume in the middle of.

    The order of epoch ``e`` is ``torch.randperm(n)`` drawn from a generator seeded with ``seed + e``: a pure
    function of (seed, epoch), unlike ``shuffle=True``, whose order comes from the global random state at the
    moment the epoch starts. ``seed=None`` draws the seed from the global torch generator once, so
    ``seed_everything`` still decides the order. Lightning calls :meth:`set_epoch` before each epoch; without
    it every new pass takes the next epoch. :attr:`start` skips the first indices of the next pass (resume).
    """

    def __init__(self, num_samples: int, seed: int | None = None):
        self.num_samples = num_samples
        self.seed = int(torch.empty((), dtype=torch.int64).random_().item()) if seed is None else seed
        self.epoch, self.current_epoch, self.start = 0, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        self.current_epoch, self.epoch = self.epoch, self.epoch + 1
        start, self.start = self.start, 0
        generator = torch.Generator().manual_seed(self.seed + self.current_epoch)
        yield from torch.randperm(self.num_samples, generator=generator)[start:].tolist()


class ResumableDataLoader(DataLoader):
    """``DataLoader`` whose position within an epoch is saved in Lightning checkpoints and restored on resume.

    Takes ``DataLoader``'s arguments; ``shuffle=True`` uses a :class:`ResumableRandomSampler`, and the iterators
    draw nothing from the global random generator (a ``generator`` of its own). Lightning saves
    :meth:`state_dict` (sampler seed, epoch, batches served in it) with the fit loop and calls
    :meth:`load_state_dict` when resuming, so the resumed run continues with the next batch of the same epoch
    order instead of a new random order (which repeats some examples and skips others).
    """

    def __init__(self, dataset, batch_size: int | None = 1, shuffle: bool | None = None, sampler=None,
                 **kwargs: Any):
        if shuffle and sampler is None:
            sampler, shuffle = ResumableRandomSampler(len(dataset)), None
        # Each new iterator draws a base seed (for worker seeding) from `generator`, by default the global one: a
        # generator of its own keeps the training random stream (dropout, sampling) independent of the loader.
        seed = sampler.seed if isinstance(sampler, ResumableRandomSampler) else 0
        kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
        super().__init__(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, **kwargs)
        self._served = 0
        self._resume: dict | None = None

    def __iter__(self) -> Iterator:
        resume, self._resume = self._resume, None
        sampler = self.sampler if isinstance(self.sampler, ResumableRandomSampler) else None
        self._served = 0
        if resume is not None and sampler is not None and resume["epoch"] == sampler.epoch:
            sampler.start, self._served = resume["batches"] * (self.batch_size or 1), resume["batches"]
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler = self.sampler if isinstance(self.sampler, ResumableRandomSampler) else None
        return {"seed": sampler.seed if sampler else 0, "epoch": sampler.current_epoch if sampler else 0,
                "batches": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if isinstance(self.sampler, ResumableRandomSampler):
            self.sampler.seed = state["seed"]
        self._resume = dict(state)
