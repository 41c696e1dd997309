"""Small pieces shared by the datamodules: the tokenizer hand-off and padding collation."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

from datamodules.tokenizers import load_tokenizer


def resolve_tokenizer(datamodule: L.LightningDataModule, tokenizer: str | None):
    """The datamodule's tokenizer: the one it was given, else the attached module's ``tokenizer`` (the model
    owns it, so a config names it once), else byte-level."""
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    trainer = getattr(datamodule, "trainer", None)
    module = trainer.lightning_module if trainer is not None else None
    if module is not None and getattr(module, "tokenizer", None) is not None:
        return module.tokenizer
    return load_tokenizer(None)


def pad_sequences(seqs: Sequence[Sequence[int]], pad_value: int, left: bool = False) -> torch.Tensor:
    """Stack variable-length id lists into a (B, max_len) LongTensor, padding on the right (or left)."""
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            if left:
                out[i, width - len(s):] = torch.as_tensor(s, dtype=torch.long)
            else:
                out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def cache_dir(*parts: str) -> Path:
    """Where generated data and caches live: ``$LITPAPERS_CACHE`` or ``~/.cache/litpapers``, plus ``parts``."""
    base = Path(os.environ.get("LITPAPERS_CACHE", Path.home() / ".cache" / "litpapers"))
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
