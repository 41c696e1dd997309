"""Preference pairs packed behind one copy of their shared prompt: one row per pair, one forward for chosen and
rejected.

A pair (x, y_w), (x, y_l) becomes the row  ``[pad… | x | y_w | pad… | y_l | pad…]``  with position ids
``[0 | 0 … |x|−1 | |x| … |x|+|y_w|−1 | 0… | |x| … |x|+|y_l|−1 | 0…]`` and the attention rule

    token q may attend to token k  ⇔  k ≤ q (column order), k is not padding, and k is in x or in q's own branch

(each padding token attends only to itself, so no attention row is empty). So y_l sees x and itself, never y_w,
and every real token has exactly the context and position it has in its own unpadded sequence: the hidden states,
hence log π(y|x), equal the per-sequence ones, while x goes through the network once instead of twice. ``x`` is the
longest common prefix of the pair's two token sequences that holds no response token (the datamodules give both
rows the same prompt, so it is the prompt). Prompts are left-padded to a common end column and the chosen responses
padded to a common width, so row width = max |x| + max |y_w| + max |y_l| ≤ half the 2B-row batch's tokens.

The log-prob of response token t at column c is read from the logits at the column of its predecessor: c − 1,
except for the first token of y_l, which is predicted by the last prompt column (shared with y_w's first token).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lm.logprobs import token_logps

PAD_BRANCH, PROMPT, CHOSEN, REJECTED = -1, 0, 1, 2


@dataclass
class PackedPairs:
    """B packed rows of width W and the N response tokens of the 2B original sequences.

    ``logits_rows[n]`` indexes the logits of the model run with ``logits_to_keep=predictor_mask`` (a boolean
    ``(B, W)`` mask, so the model returns the logits of the ``True`` positions flattened row-major, ``(P, V)``)."""

    input_ids: Tensor       # (B, W)
    position_ids: Tensor    # (B, W)
    attention: Tensor       # (B, 1, W, W) bool, True = query (dim 2) may attend key (dim 3)
    predictor_mask: Tensor  # (B, W) bool: columns whose logits predict a response token
    logits_rows: Tensor     # (N,) row of the flattened kept logits predicting response token n
    targets: Tensor         # (N,) the response token ids
    sequence: Tensor        # (N,) which of the 2B sequences (chosen rows first) token n belongs to


def _left_aligned(attention_mask: Tensor, *tensors: Tensor) -> list[Tensor]:
    """``tensors`` with each row's real tokens (mask 1) moved to the front, in order."""
    order = torch.sort((attention_mask == 0).to(torch.int8), dim=1, stable=True).indices
    return [t.gather(1, order) for t in tensors]


def pack_pairs(input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor) -> PackedPairs:
    """Pack a 2B-row preference batch (rows i and B + i: chosen and rejected of pair i; left or right padded) into
    B rows as described in the module docstring."""
    rows2, t = input_ids.shape
    if rows2 % 2:
        raise ValueError(f"a preference batch has 2B rows (chosen, then rejected), got {rows2}")
    b, device = rows2 // 2, input_ids.device
    ids, resp = _left_aligned(attention_mask, input_ids, response_mask)
    lengths = attention_mask.sum(1)
    col = torch.arange(t, device=device)
    real = col < lengths[:, None]
    resp = resp.bool() & real
    if bool(resp[:, 0].any()):
        raise ValueError("a response token is the first token of its sequence: nothing predicts it")
    if not bool(resp.any()):
        raise ValueError("batch has no response tokens (response_mask is all zero)")
    same = (ids[:b] == ids[b:]) & real[:b] & real[b:] & ~resp[:b] & ~resp[b:]
    shared = same.int().cumprod(1).sum(1)  # (B,) prompt length |x| per pair
    shared2 = torch.cat([shared, shared])
    suffix = lengths - shared2
    prompt_w, chosen_w, rejected_w = int(shared.max()), int(suffix[:b].max()), int(suffix[b:].max())
    width = prompt_w + chosen_w + rejected_w

    # destination column of every real token of the 2B sequences (prompt tokens of the rejected rows are dropped)
    in_prompt = col < shared2[:, None]
    start = torch.full((rows2, 1), prompt_w, device=device)
    start[b:] += chosen_w
    dest = torch.where(in_prompt, prompt_w - shared2[:, None] + col, start + col - shared2[:, None])
    keep = real & ~(in_prompt & (torch.arange(rows2, device=device) >= b)[:, None])
    seq, pos = keep.nonzero(as_tuple=True)
    row, cols = seq % b, dest[seq, pos]
    branch_of = torch.where(in_prompt[seq, pos], PROMPT, torch.where(seq < b, CHOSEN, REJECTED))

    packed = torch.zeros((b, width), dtype=input_ids.dtype, device=device)
    positions = torch.zeros((b, width), dtype=torch.long, device=device)
    branch = torch.full((b, width), PAD_BRANCH, dtype=torch.long, device=device)
    packed[row, cols], positions[row, cols], branch[row, cols] = ids[seq, pos], pos, branch_of

    q, k = branch[:, :, None], branch[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    allowed = causal & (q != PAD_BRANCH) & ((k == PROMPT) | (k == q))  # padding is in no branch
    allowed |= torch.eye(width, dtype=torch.bool, device=device)

    # response tokens: predicted by the previous column, or (first token of y_l) by the last prompt column
    is_resp = resp[seq, pos]
    seq, pos, row, cols = seq[is_resp], pos[is_resp], row[is_resp], cols[is_resp]
    predictor = torch.where((seq >= b) & (pos == shared2[seq]), prompt_w - 1, cols - 1)
    predictor_mask = torch.zeros((b, width), dtype=torch.bool, device=device)
    predictor_mask[row, predictor] = True
    flat_rank = predictor_mask.flatten().cumsum(0) - 1
    return PackedPairs(input_ids=packed, position_ids=positions, attention=allowed[:, None],
                       predictor_mask=predictor_mask, logits_rows=flat_rank[row * width + predictor],
                       targets=ids[seq, pos], sequence=seq)


def attention_bias(allowed: Tensor, attn_implementation: str, dtype: torch.dtype) -> Tensor:
    """The 4D mask in the form a Hugging Face attention implementation takes it as is: boolean for ``sdpa``
    (True = attend), additive for ``eager`` (0 where allowed, the dtype's minimum elsewhere)."""
    if attn_implementation == "sdpa":
        return allowed
    if attn_implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed,
                                                                                          torch.finfo(dtype).min)
    raise ValueError(f"packed pairs need the 'sdpa' or 'eager' attention implementation, got {attn_implementation!r}")


def supports_packed_pairs(model: nn.Module) -> bool:
    """True for a Hugging Face causal LM whose forward takes ``position_ids`` and ``logits_to_keep`` and whose
    attention implementation takes a custom 4D mask (``sdpa``, ``eager``)."""
    params = inspect.signature(model.forward).parameters
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return "position_ids" in params and "logits_to_keep" in params and implementation in ("sdpa", "eager")


def packed_pair_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor,
                      length_normalize: bool = False, chunk_size: int = 4096) -> Tensor:
    """log π(y|x) = Σ_{t ∈ response} log π(y_t | x, y_<t) of the 2B sequences of a preference batch (chosen rows
    first), shape (2B,), from one forward over the B rows of :func:`pack_pairs`; logits are computed only at the
    columns that predict a response token and turned into log-probs by :func:`lm.logprobs.token_logps`. With
    ``length_normalize`` each sum is divided by its number of response tokens."""
    packed = pack_pairs(input_ids, attention_mask, response_mask)
    embedding = model.get_input_embeddings().weight
    mask = attention_bias(packed.attention, model.config._attn_implementation, embedding.dtype)
    logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=mask,
                   logits_to_keep=packed.predictor_mask, use_cache=False).logits
    if logits.ndim != 2:  # transformers before boolean logits_to_keep: (B, W, ...) instead of the kept rows
        raise RuntimeError(f"{type(model).__name__} ignored a boolean logits_to_keep (logits {tuple(logits.shape)})")
    per_token = token_logps(logits[packed.logits_rows], packed.targets, chunk_size)
    n = input_ids.shape[0]
    total = torch.zeros(n, dtype=per_token.dtype, device=per_token.device).index_add(0, packed.sequence, per_token)
    if not length_normalize:
        return total
    return total / torch.bincount(packed.sequence, minlength=n).clamp(min=1).to(total.dtype)
