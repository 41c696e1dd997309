"""RADT: Return-Aligned Decision Transformer (Tanaka et al., TMLR 2025, arXiv 2402.03923; docs/papers.md §3).

Reference: CyberAgentAILab/radt ``gym/models/radt.py`` (``RADT``, ``DecoderBlock``, ``PreNormDecoderBlock``,
``Attention``) with ``gym/conf/default.yaml`` (``radt: {use_learnable_pos_emb: False, stepra: True,
alpha_scale: True, seqra: True, action_tanh: True}``). Returns-to-go leave the token stream: the transformer
sees only interleaved (s_t, a_t) tokens ``Linear(x) + E_time[t]`` — no input LayerNorm and no embedding dropout
(those are DT's) — with E_time[t] = Linear(PE[t]) on a fixed sinusoid table PE (``timestep_embedding=
"sinusoid"``; ``"learned"`` is a learned table, the reference's ``use_learnable_pos_emb: True``). The returns
are a separate sequence c_t = Linear(R̂_t / scale) that steers every block in two ways:

* **SeqRA** (sequence-level return alignment, §4.1): cross-attention from each token to the returns,
  query = W_q h, key = W_k LN_k(c + E_time), value = W_v LN_v(c) (Q/K/V without bias, like the self-attention:
  the reference's ``qkv_bias=False``), *timestep-causal* (a token of step i sees c_j, j ≤ i), gated:
  h ← (1 + α) ⊙ o + r with o the attention output, r the block's residual stream and
  α = Linear_{2d→d}([o; r]) initialised to zero.
* **StepRA** (step-level return alignment, §4.2): adaptive LayerNorm, Linear_{d→nd}(SiLU(c_t)) per timestep
  (shared by s_t and a_t) gives [γ_sa, β_sa, γ_ca, β_ca, γ_mlp, β_mlp] (n = 6) or, without SeqRA,
  [γ_sa, β_sa, γ_mlp, β_mlp] (n = 4); LN(h)·(1 + γ) + β with affine-free LNs (eps 1e-6) and the modulation
  Linear zero-initialised (adaLN-Zero).

The two block forms (``DecoderBlock`` with StepRA, ``PreNormDecoderBlock`` without):

* with StepRA (post-norm):  h = M_sa(LN(x + SA(x)));  h = M_ca(LN((1 + α(o, h)) ⊙ o + h)), o = CA(h);
  y = M_mlp(LN(h + MLP(h)))  with M_·(z) = z·(1 + γ_·) + β_·;
* without StepRA (pre-norm, standard affine LNs):  x ← x + SA(LN₁ x);  x ← (1 + α(o, x)) ⊙ o + x,
  o = CA(LN₂ x) — the gate sees the *un-normalised* residual x;  y = x + MLP(LN₃ x).

There is no final LayerNorm after the last block in either form. The action comes from the s_t token
(Linear + tanh), trained with MSE on unpadded positions (``return_conditioned``).

**Padding (deviation, a bug fix).** The reference adds −1e4 · ``padding_mask`` to the attention logits, but its
trainer's mask is 1 on *real* steps (``gym/experiment.py::get_batch``: zeros on the left padding, ones on the
episode), so it pushes attention *away from the real steps* of a left-padded window, and evaluation
(``get_action``) passes no mask at all. Here padding keys are masked out (boolean masks, see
:func:`~lit_modules.return_conditioned.token_attention_mask` and :func:`seqra_mask`); on unpadded windows the
two agree (docs/radt.md).
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from lit_modules.return_conditioned import (
    MLP,
    Attention,
    ReturnConditionedPolicy,
    SelfAttention,
    interleave,
    token_attention_mask,
)


def seqra_mask(valid: torch.Tensor, tokens_per_step: int = 2) -> torch.Tensor:
    """Boolean cross-attention mask (B, 1, n·K, K): token q (of step ⌊q/n⌋) may see return j iff
    j ≤ ⌊q/n⌋ and (step j is real or j = ⌊q/n⌋); ``valid`` (B, K) marks real steps."""
    K = valid.shape[1]
    step = torch.arange(K * tokens_per_step, device=valid.device) // tokens_per_step
    j = torch.arange(K, device=valid.device)
    causal = j[None, :] <= step[:, None]
    own = j[None, :] == step[:, None]
    return (causal & (valid[:, None, :].bool() | own))[:, None]


def modulate(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Adaptive LayerNorm output x·(1 + γ) + β (x already normalised)."""
    return x * (1 + gamma) + beta


class SeqRA(Attention):
    """Timestep-causal cross-attention to the return sequence with a zero-initialised gate. Returns the gated
    update (1 + α) ⊙ o, o = CrossAttn(query), α = Linear_{2d→d}([o; residual]); the block adds the residual."""

    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__(dim, n_heads, dropout)
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.ln_k, self.ln_v = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.gate = nn.Linear(2 * dim, dim)

    def reset_gate(self) -> None:
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

    def keys_values(self, returns: torch.Tensor, time: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-step keys W_k LN_k(c + E_time) and values W_v LN_v(c), (B, K, d) each."""
        return self.k(self.ln_k(returns + time)), self.v(self.ln_v(returns))

    def forward(self, query: torch.Tensor, residual: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        out = self.attend(self.q(query), keys, values, mask)
        alpha = self.gate(torch.cat([out, residual], dim=-1))
        return (1 + alpha) * out


class StepRA(nn.Module):
    """adaLN-Zero modulation: ``n_mods`` (B, K, d) tensors per step from SiLU(c_t) (shared by the step's tokens),
    [γ_sa, β_sa, γ_ca, β_ca, γ_mlp, β_mlp] (6) or without SeqRA [γ_sa, β_sa, γ_mlp, β_mlp] (4); zero at
    initialisation."""

    def __init__(self, dim: int, n_mods: int):
        super().__init__()
        self.n_mods = n_mods
        self.net = nn.Sequential(nn.SiLU(), nn.Linear(dim, n_mods * dim))

    def reset_zero(self) -> None:
        nn.init.zeros_(self.net[1].weight)
        nn.init.zeros_(self.net[1].bias)

    def forward(self, returns: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.net(returns).chunk(self.n_mods, dim=-1)


class RADTBlock(nn.Module):
    """One RADT layer: post-norm adaLN block with StepRA, pre-norm block without (see module docstring).

    The returns enter through :meth:`step_inputs`, a function of each step's (c_t, t) alone. Tokens come two
    per step, (s_t, a_t); the stream may lack the newest a_t (``RADT.forward(newest_only=True)``), and
    ``newest_only`` computes only the last token (keys and values still come from all of them).
    """

    def __init__(self, dim: int, n_heads: int, dropout: float, seqra: bool, stepra: bool):
        super().__init__()
        self.attn, self.mlp = SelfAttention(dim, n_heads, dropout, qkv_bias=False), MLP(dim, dropout)
        self.cross = SeqRA(dim, n_heads, dropout) if seqra else None
        self.stepra = StepRA(dim, 6 if seqra else 4) if stepra else None
        norm = (lambda: nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)) if stepra else (lambda: nn.LayerNorm(dim))
        self.norm_attn, self.norm_mlp = norm(), norm()
        self.norm_cross = norm() if seqra else None

    def step_inputs(self, returns: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        """(B, K, n·d): SeqRA's keys and values (n += 2) then StepRA's modulations (n += 6 or 4) of each step."""
        parts = (self.cross.keys_values(returns, time) if self.cross is not None else ()) + (
            self.stepra(returns) if self.stepra is not None else ())
        return torch.cat(parts, dim=-1)

    def forward(self, x: torch.Tensor, per_step: torch.Tensor, attn_mask: torch.Tensor, cross_mask: torch.Tensor,
                newest_only: bool = False) -> torch.Tensor:
        rows = slice(-1, None) if newest_only else slice(None)
        parts = per_step.chunk(per_step.shape[-1] // x.shape[-1], dim=-1)
        keys_values, mods = (parts[:2], parts[2:]) if self.cross is not None else ((), parts)
        cross_mask = cross_mask[..., rows, :] if self.cross is not None else None
        if self.stepra is None:  # pre-norm; the gate sees the un-normalised residual x
            x = x[:, rows] + self.attn(self.norm_attn(x), attn_mask, newest_only)
            if self.cross is not None:
                x = x + self.cross(self.norm_cross(x), x, *keys_values, cross_mask)
            return x + self.mlp(self.norm_mlp(x))
        # per-token modulation: each step's for its two tokens; the newest token belongs to the newest step
        mods = [m[:, -1:] if newest_only else m.repeat_interleave(2, dim=1)[:, :x.shape[1]] for m in mods]
        g_sa, b_sa, *g_b_ca, g_mlp, b_mlp = mods
        h = modulate(self.norm_attn(x[:, rows] + self.attn(x, attn_mask, newest_only)), g_sa, b_sa)
        if self.cross is not None:
            h = modulate(self.norm_cross(h + self.cross(h, h, *keys_values, cross_mask)), *g_b_ca)
        return modulate(self.norm_mlp(h + self.mlp(h)), g_mlp, b_mlp)


class RADT(ReturnConditionedPolicy):
    """Return-Aligned Decision Transformer.

    Args:
        seqra: use SeqRA cross-attention to the returns (ablation: ``False``).
        stepra: use StepRA adaptive LayerNorm (ablation: ``False``; the block becomes pre-norm).
        timestep_embedding: ``"sinusoid"`` (reference default: Linear of a fixed sinusoid table) or
            ``"learned"`` (an ``nn.Embedding`` table, the reference's ``use_learnable_pos_emb: True``).
        Others: see :class:`~lit_modules.return_conditioned.ReturnConditionedPolicy` (paper defaults).
    """

    def __init__(self, state_dim: int | None = None, act_dim: int | None = None, discrete: bool | None = None,
                 seqra: bool = True, stepra: bool = True, embed_dim: int = 128, n_layers: int = 3, n_heads: int = 1,
                 dropout: float = 0.1, context_len: int = 20, max_timestep: int = 1000, rtg_scale: float = 1000.0,
                 lr: float = 1e-4, weight_decay: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999),
                 warmup_steps: int = 10_000, lr_decay: str = "constant", min_lr_ratio: float = 0.1,
                 timestep_embedding: str = "sinusoid", optimizer: OptimizerCallable | None = None,
                 lr_scheduler: LRSchedulerCallable | None = None):
        super().__init__(state_dim, act_dim, discrete, embed_dim, n_layers, n_heads, dropout, context_len,
                         max_timestep, rtg_scale, lr, weight_decay, betas, warmup_steps, lr_decay, min_lr_ratio,
                         optimizer, lr_scheduler)
        if not (seqra or stepra):
            raise ValueError("RADT needs seqra=True or stepra=True: with both off the returns never reach the model")
        if timestep_embedding not in ("sinusoid", "learned"):
            raise ValueError(f"timestep_embedding must be 'sinusoid' or 'learned', got {timestep_embedding!r}")
        self.seqra, self.stepra, self.timestep_embedding = seqra, stepra, timestep_embedding
        self.save_hyperparameters()
        self.declare_if_sized()

    def build_layers(self) -> None:
        d = self.embed_dim
        self.build_token_embeddings(self.timestep_embedding)
        self.blocks = nn.ModuleList(RADTBlock(d, self.n_heads, self.dropout, self.seqra, self.stepra)
                                    for _ in range(self.n_layers))

    def reset_special_parameters(self) -> None:
        for block in self.blocks:
            if block.cross is not None:
                block.cross.reset_gate()
            if block.stepra is not None:
                block.stepra.reset_zero()

    def forward(self, states: torch.Tensor, actions: torch.Tensor, returns: torch.Tensor, timesteps: torch.Tensor,
                mask: torch.Tensor, newest_only: bool = False, cache: dict | None = None) -> torch.Tensor:
        """Hidden state of each s_t token (B, K, d) from normalised states, action vectors, R̂/scale, t, mask;
        ``newest_only``: of the newest s_t only (B, d). ``cache`` (see :meth:`act`): each block's
        :meth:`RADTBlock.step_inputs` of the window, so only the newest step's are computed."""
        time = self.embed_timestep(timesteps)
        x = interleave(self.embed_state(states) + time, self.embed_action(actions) + time)
        per_step = self.step_inputs(self.embed_return(returns[..., None]), time, cache)
        attn_mask, cross_mask = token_attention_mask(mask.repeat_interleave(2, dim=1)), seqra_mask(mask)
        if newest_only:  # the newest action token is last and unseen by every state token: leave it out
            x, attn_mask, cross_mask = x[:, :-1], attn_mask[..., :-1, :-1], cross_mask[..., :-1, :]
        for i, block in enumerate(self.blocks):
            x = block(x, per_step[i], attn_mask, cross_mask, newest_only and i == len(self.blocks) - 1)
        if newest_only:
            return x[:, -1]
        B, K = states.shape[:2]
        return x.view(B, K, 2, -1)[:, :, 0]

    def step_inputs(self, returns: torch.Tensor, time: torch.Tensor, cache: dict | None) -> list[torch.Tensor]:
        """Each block's per-step inputs (B, K, ·) for return embeddings c and timestep embeddings ``time``.

        With a ``cache`` from the previous call whose window this one continues (its last K − 1 steps' c and t
        equal this window's first K − 1, checked), only the newest step's inputs are computed (they depend on its
        (c_t, t) alone); any other window is computed in full and restarts the cache. The cache holds the inputs
        in buffers of 2K steps and hands out K-step views: a step costs one row write, plus a move of K − 1 rows
        every K steps.
        """
        B, K = returns.shape[:2]
        buffers = None if cache is None else cache.get("step_inputs")
        slid = buffers is not None and buffers[0].shape[:2] == (B, 2 * K) and all(
            torch.equal(before[:, 1:], now[:, :-1]) for before, now in zip(cache["window"], (returns, time)))
        if cache is not None:
            cache["window"] = (returns, time)
        if not slid:
            per_step = [block.step_inputs(returns, time) for block in self.blocks]
            if cache is not None:
                cache["step_inputs"] = [torch.cat([p, torch.empty_like(p)], dim=1) for p in per_step]
                cache["start"] = 0
            return per_step
        start = cache["start"] + 1
        if start + K > 2 * K:  # no room for the newest step: move the K − 1 kept ones to the front
            for buffer in buffers:
                buffer[:, :K - 1] = buffer[:, start:start + K - 1]
            start = 0
        for buffer, block in zip(buffers, self.blocks):
            buffer[:, start + K - 1] = block.step_inputs(returns[:, -1], time[:, -1])
        cache["start"] = start
        return [buffer[:, start:start + K] for buffer in buffers]
