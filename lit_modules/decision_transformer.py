"""Decision Transformer (Chen et al., 2021), the baseline RADT is compared with (docs/papers.md §3).

Reference: kzl/decision-transformer (``gym/decision_transformer/models/decision_transformer.py``): one causal
GPT over 3K interleaved tokens (R̂_t, s_t, a_t), each ``Linear(x) + E_time[t]``, then LayerNorm on the token
embeddings; pre-norm GPT-2 blocks; the action is predicted from the hidden state of the s_t token (which
sees R̂_≤t, s_≤t, a_<t). Same sizes as RADT (embed 128, 3 layers, 1 head, K 20), same data, loss, optimiser
and evaluation (``lit_modules.return_conditioned``). Deviation: the MLP uses GELU like RADT's (the reference
GPT-2 config uses ReLU) so the two differ only in how returns enter.
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from lit_modules.return_conditioned import MLP, ReturnConditionedPolicy, SelfAttention, interleave, token_attention_mask


class PreNormBlock(nn.Module):
    """GPT-2 block: x ← x + SelfAttn(LN(x)); x ← x + MLP(LN(x))."""

    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.ln_attn, self.attn = nn.LayerNorm(dim), SelfAttention(dim, n_heads, dropout)
        self.ln_mlp, self.mlp = nn.LayerNorm(dim), MLP(dim, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, newest_only: bool = False) -> torch.Tensor:
        """(B, L, d) → (B, L, d), or only the last token (B, 1, d) with ``newest_only``."""
        x = (x[:, -1:] if newest_only else x) + self.attn(self.ln_attn(x), mask, newest_only)
        return x + self.mlp(self.ln_mlp(x))


class DecisionTransformer(ReturnConditionedPolicy):
    """Return-conditioned behaviour cloning with (R̂, s, a) tokens; arguments as in
    :class:`~lit_modules.return_conditioned.ReturnConditionedPolicy`."""

    def __init__(self, state_dim: int | None = None, act_dim: int | None = None, discrete: bool | None = None,
                 embed_dim: int = 128, n_layers: int = 3, n_heads: int = 1, dropout: float = 0.1,
                 context_len: int = 20, max_timestep: int = 1000, rtg_scale: float = 1000.0, lr: float = 1e-4,
                 weight_decay: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999), warmup_steps: int = 10_000,
                 lr_decay: str = "constant", min_lr_ratio: float = 0.1, optimizer: OptimizerCallable | None = None,
                 lr_scheduler: LRSchedulerCallable | None = None):
        super().__init__(state_dim, act_dim, discrete, embed_dim, n_layers, n_heads, dropout, context_len,
                         max_timestep, rtg_scale, lr, weight_decay, betas, warmup_steps, lr_decay, min_lr_ratio,
                         optimizer, lr_scheduler)
        self.save_hyperparameters()
        self.declare_if_sized()

    def build_layers(self) -> None:
        d = self.embed_dim
        self.build_token_embeddings("learned")
        self.embed_ln, self.embed_drop = nn.LayerNorm(d), nn.Dropout(self.dropout)
        self.blocks = nn.ModuleList(PreNormBlock(d, self.n_heads, self.dropout) for _ in range(self.n_layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, states: torch.Tensor, actions: torch.Tensor, returns: torch.Tensor, timesteps: torch.Tensor,
                mask: torch.Tensor, newest_only: bool = False, cache: dict | None = None) -> torch.Tensor:
        """Hidden state of each s_t token (B, K, d) from normalised states, action vectors, R̂/scale, t, mask;
        ``newest_only``: of the newest s_t only (B, d). ``cache`` is not used: DT's returns are tokens in the
        stream, so nothing in it depends on one step alone."""
        time = self.embed_timestep(timesteps)
        x = interleave(self.embed_return(returns[..., None]) + time, self.embed_state(states) + time,
                       self.embed_action(actions) + time)
        x = self.embed_drop(self.embed_ln(x))
        attn_mask = token_attention_mask(mask.repeat_interleave(3, dim=1))
        if newest_only:  # the newest action token is last and unseen by every state token: leave it out
            x, attn_mask = x[:, :-1], attn_mask[..., :-1, :-1]
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask, newest_only and i == len(self.blocks) - 1)
        if newest_only:
            return self.ln_f(x)[:, -1]
        B, K = states.shape[:2]
        return self.ln_f(x).view(B, K, 3, -1)[:, :, 1]
