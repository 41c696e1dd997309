"""Batching token ids: variable-length id lists stacked into one padded tensor (the datamodules' collate
functions and the sampler's left-padded prompts)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
