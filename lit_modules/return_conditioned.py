"""What Decision Transformer and RADT share: input handling, the action loss, the training loop, acting.

Both read windows of K steps (states s, actions a, returns-to-go R̂, timesteps t, padding mask m) from
``datamodules.OfflineRLDataModule`` and predict a_t from the state token of step t (docs/papers.md §3):

* states are normalised with the dataset's mean/std (buffers, so a checkpoint is self-contained);
  returns-to-go are divided by ``rtg_scale`` (1000 for MuJoCo in both papers);
* continuous actions: ``â = tanh(Linear(h_s))`` and loss = Σ m_t ‖â_t − a_t‖² / (A Σ m_t) (MSE on unpadded
  positions); discrete actions (``Discrete(n)``): logits ``Linear(h_s)``, cross-entropy on unpadded positions;
* :meth:`act` returns the action for the newest position of each window (the evaluation rollouts in
  ``callbacks.ReturnAlignmentEval`` call it once per environment step for all episodes together).

Networks are built as every module here builds them (:class:`~lit_modules.base.DeferredNetworksModule`): declared on
the meta device, materialised by ``configure_model``. Subclasses set their own options, call
``save_hyperparameters()`` and :meth:`declare_if_sized` in ``__init__``, and implement :meth:`build_layers`
(``self.state_dim``/``self.act_dim`` are known) and
``forward(states, actions, returns, timesteps, mask, newest_only=False) -> hidden state of each state token
(B, K, d)`` on normalised states, scaled returns and embedded-ready actions (``newest_only``: only the newest
step's state token, (B, d), computed without the newest action token — what :meth:`act` needs), and
``cache=None`` (per-step values a rollout may keep between calls, see :meth:`act`). The state/action sizes may be left
``None``: the networks are then declared at ``setup`` from the datamodule's ``spec`` (and the sizes stored in the
hyperparameters for ``load_from_checkpoint``), before the trainer's ``configure_model``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from datamodules.contract import OfflineRLSpec
from lit_modules.base import DeferredNetworksModule


def token_attention_mask(valid: torch.Tensor) -> torch.Tensor:
    """Boolean self-attention mask (B, 1, L, L): query i may see key j iff j ≤ i and (key j is real or j = i).

    ``valid`` (B, L) marks real tokens. Letting each padding token see itself keeps every softmax row finite;
    padding never feeds a real token because real tokens cannot see padding keys.
    """
    L = valid.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(L, dtype=torch.bool, device=valid.device)
    return (causal & (valid[:, None, :].bool() | eye))[:, None]


def interleave(*streams: torch.Tensor) -> torch.Tensor:
    """Tokens of step t in order: (B, K, d) × n → (B, n·K, d) as [x¹_0, …, xⁿ_0, x¹_1, …]."""
    B, K, d = streams[0].shape
    return torch.stack(streams, dim=2).reshape(B, len(streams) * K, d)


def sinusoid_table(n_positions: int, dim: int) -> torch.Tensor:
    """(n_positions, dim) fixed encoding PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(p / 10000^(2i/dim))
    (Vaswani et al. 2017 §3.5; RADT reference ``gym/models/layer.py::get_sinusoid_encoding_table``)."""
    position = torch.arange(n_positions, dtype=torch.float64)[:, None]
    pair = torch.arange(dim) // 2
    angle = position / torch.pow(10000.0, 2 * pair / dim).to(torch.float64)
    return torch.where(torch.arange(dim) % 2 == 0, torch.sin(angle), torch.cos(angle)).float()


class SinusoidTimestepEmbedding(nn.Module):
    """E_time[t] = Linear_{d→d}(PE[t]) with the fixed :func:`sinusoid_table` PE (not a parameter, rebuilt from
    the sizes): RADT's reference default ``use_learnable_pos_emb: False`` (``gym/conf/default.yaml``,
    ``gym/models/radt.py``)."""

    def __init__(self, n_positions: int, dim: int):
        super().__init__()
        self.register_buffer("table", sinusoid_table(n_positions, dim), persistent=False)
        self.linear = nn.Linear(dim, dim)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.linear(self.table[timesteps])


class Attention(nn.Module):
    """Multi-head attention core: softmax(QKᵀ/√d_h + mask) V per head, output projection, dropout."""

    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by n_heads {n_heads}")
        self.n_heads, self.dropout = n_heads, dropout
        self.proj = nn.Linear(dim, dim)
        self.resid_drop = nn.Dropout(dropout)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q (B, Lq, d), k/v (B, Lk, d), boolean ``mask`` broadcastable to (B, heads, Lq, Lk) → (B, Lq, d)."""
        B, Lq, d = q.shape
        heads = lambda x: x.reshape(B, x.shape[1], self.n_heads, d // self.n_heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(out.transpose(1, 2).reshape(B, Lq, d)))


class SelfAttention(Attention):
    """Masked multi-head self-attention (fused QKV projection; ``qkv_bias=False``: no bias on Q, K, V, as in
    RADT's reference ``Attention(qkv_bias=False)``)."""

    def __init__(self, dim: int, n_heads: int, dropout: float, qkv_bias: bool = True):
        super().__init__(dim, n_heads, dropout)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, newest_only: bool = False) -> torch.Tensor:
        """(B, L, d) → (B, L, d); ``newest_only``: queries from the last token only → (B, 1, d) (keys/values from
        all tokens, so the result equals the last row of the full output)."""
        if not newest_only:
            return self.attend(*self.qkv(x).chunk(3, dim=-1), mask)
        d, bias = x.shape[-1], self.qkv.bias
        q = F.linear(x[:, -1:], self.qkv.weight[:d], None if bias is None else bias[:d])
        k, v = F.linear(x, self.qkv.weight[d:], None if bias is None else bias[d:]).chunk(2, dim=-1)
        return self.attend(q, k, v, mask[..., -1:, :])


class MLP(nn.Sequential):
    """Linear(d, 4d) → GELU → Linear(4d, d) → dropout."""

    def __init__(self, dim: int, dropout: float):
        super().__init__(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))


class ReturnConditionedPolicy(DeferredNetworksModule):
    """Base of :class:`~lit_modules.DecisionTransformer` and :class:`~lit_modules.RADT` (see module docstring).

    Args:
        state_dim, act_dim: observation size and action size (number of actions if ``discrete``); ``None``
            takes them from the datamodule at ``setup``.
        discrete: categorical action head (``None``: from the datamodule, else continuous).
        embed_dim, n_layers, n_heads, dropout: transformer size (paper: 128, 3, 1, 0.1).
        context_len: K (paper: 20); longer windows are cut to the last K steps.
        max_timestep: size of the timestep embedding table; the data's episodes must fit (checked at ``setup``),
            longer evaluation episodes use the last row.
        rtg_scale: returns-to-go are divided by it (paper: 1000 on MuJoCo).
        lr, weight_decay, betas, warmup_steps, lr_decay, min_lr_ratio, optimizer, lr_scheduler: see
            :class:`PaperModule` (paper: AdamW 1e-4, wd 1e-4, 10k linear warm-up, then constant).
    """

    def __init__(self, state_dim: int | None = None, act_dim: int | None = None, discrete: bool | None = None,
                 embed_dim: int = 128, n_layers: int = 3, n_heads: int = 1, dropout: float = 0.1,
                 context_len: int = 20, max_timestep: int = 1000, rtg_scale: float = 1000.0, lr: float = 1e-4,
                 weight_decay: float = 1e-4, betas: tuple[float, float] = (0.9, 0.999), warmup_steps: int = 10_000,
                 lr_decay: str = "constant", min_lr_ratio: float = 0.1, optimizer: OptimizerCallable | None = None,
                 lr_scheduler: LRSchedulerCallable | None = None):
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, lr=lr, weight_decay=weight_decay,
                         betas=betas, warmup_steps=warmup_steps, lr_decay=lr_decay, min_lr_ratio=min_lr_ratio)
        for name, value in (("context_len", context_len), ("max_timestep", max_timestep)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if rtg_scale <= 0:
            raise ValueError(f"rtg_scale must be > 0, got {rtg_scale}")
        self.embed_dim, self.n_layers, self.n_heads, self.dropout = embed_dim, n_layers, n_heads, dropout
        self.context_len, self.max_timestep, self.rtg_scale = context_len, max_timestep, rtg_scale
        self.state_dim, self.act_dim, self.discrete = state_dim, act_dim, bool(discrete)
        self.val_loss = torchmetrics.MeanMetric()
        self._state_stats: tuple | None = None  # (mean, std) from the data spec, set at setup("fit")

    @property
    def sized(self) -> bool:
        return self.state_dim is not None and self.act_dim is not None

    def declare_if_sized(self) -> None:
        """Declare the networks now if the sizes are known (subclasses call this at the end of ``__init__``);
        else :meth:`setup` does, from the datamodule's spec."""
        if self.sized:
            self.declare_networks()

    def build_networks(self) -> None:
        """State statistics buffers (the data's, once :meth:`setup` has seen them), the subclass's layers, the
        action head; GPT-2 initialisation, then the subclass's special ones."""
        mean, std = self._state_stats or (torch.zeros(self.state_dim), torch.ones(self.state_dim))
        self.register_buffer("state_mean", torch.as_tensor(mean, dtype=torch.float32).clone())
        self.register_buffer("state_std", torch.as_tensor(std, dtype=torch.float32).clone())
        self.build_layers()
        self.action_head = nn.Linear(self.embed_dim, self.act_dim)
        self.apply(self._init_weights)
        self.reset_special_parameters()

    def configure_model(self) -> None:
        if not self.sized:
            raise ValueError(f"{type(self).__name__}: state_dim/act_dim not given and no OfflineRLDataModule "
                             "attached to read them from")
        super().configure_model()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """GPT-2 initialisation: N(0, 0.02) Linear/Embedding weights, zero biases (LayerNorms stay at 1, 0)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def build_token_embeddings(self, timestep_embedding: str = "learned") -> None:
        """The embeddings DT and RADT share: Linear(R̂/scale), Linear(s), Linear(a) and the timestep embedding
        ``embed_timestep`` — a learned table (``"learned"``, DT) or :class:`SinusoidTimestepEmbedding`
        (``"sinusoid"``, RADT's reference default)."""
        d = self.embed_dim
        if timestep_embedding == "learned":
            self.embed_timestep = nn.Embedding(self.max_timestep, d)
        elif timestep_embedding == "sinusoid":
            self.embed_timestep = SinusoidTimestepEmbedding(self.max_timestep, d)
        else:
            raise ValueError(f"timestep_embedding must be 'sinusoid' or 'learned', got {timestep_embedding!r}")
        self.embed_return = nn.Linear(1, d)
        self.embed_state = nn.Linear(self.state_dim, d)
        self.embed_action = nn.Linear(self.act_dim, d)

    def build_layers(self) -> None:  # pragma: no cover - abstract
        """The subclass's embeddings and transformer blocks (on the current default device)."""
        raise NotImplementedError

    def reset_special_parameters(self) -> None:
        """Hook for initialisations that must survive the generic one (RADT's zero-init gate and adaLN)."""

    def setup(self, stage: str) -> None:
        """Take sizes and state statistics from an attached ``OfflineRLDataModule``: its ``spec`` alone
        (:class:`~datamodules.contract.OfflineRLSpec`, the one hand-off of :class:`~datamodules.contract.OfflineRLSource`)."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        spec: OfflineRLSpec | None = getattr(dm, "spec", None)
        if spec is None:
            if not self.sized:
                raise ValueError(f"{type(self).__name__}: state_dim/act_dim not given and no OfflineRLDataModule "
                                 "attached to read them from")
            return
        if not self.sized:
            self.state_dim, self.act_dim, self.discrete = spec.state_dim, spec.act_dim, spec.discrete
            self.hparams.update(state_dim=spec.state_dim, act_dim=spec.act_dim, discrete=spec.discrete)
            self.declare_networks()
        elif (self.state_dim, self.act_dim, self.discrete) != (spec.state_dim, spec.act_dim, spec.discrete):
            raise ValueError(f"{type(self).__name__} was built for state_dim={self.state_dim}, act_dim="
                             f"{self.act_dim}, discrete={self.discrete} but the data has {spec.state_dim}, "
                             f"{spec.act_dim}, {spec.discrete}")
        if spec.max_episode_len > self.max_timestep:
            raise ValueError(f"episodes of {spec.dataset} reach {spec.max_episode_len} steps > max_timestep="
                             f"{self.max_timestep}; raise --model.max_timestep")
        if stage == "fit":  # into the buffers now if they hold weights, else when configure_model builds them
            self._state_stats = (spec.state_mean, spec.state_std)
            if self.networks_materialized:
                self.state_mean.copy_(torch.as_tensor(spec.state_mean))
                self.state_std.copy_(torch.as_tensor(spec.state_std))

    # -- inputs and outputs ----------------------------------------------------------------------------------
    def prepare_inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(normalised states, action vectors (one-hot if discrete), R̂/scale, clamped timesteps, mask), last K."""
        K = self.context_len
        states = (batch["states"][:, -K:] - self.state_mean) / self.state_std
        actions = batch["actions"][:, -K:]
        actions = F.one_hot(actions.long(), self.act_dim).float() if self.discrete else actions.float()
        returns = batch["returns_to_go"][:, -K:].float() / self.rtg_scale
        timesteps = batch["timesteps"][:, -K:].clamp(0, self.max_timestep - 1)
        return states, actions, returns, timesteps, batch["mask"][:, -K:].float()

    def predict_actions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, K, A): tanh actions (continuous) or logits (discrete) from each step's state token."""
        out = self.action_head(self(*self.prepare_inputs(batch)))
        return out if self.discrete else torch.tanh(out)

    def action_loss(self, pred: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE Σ m‖â − a‖²/(A Σ m) or cross-entropy Σ m CE / Σ m over the unpadded positions."""
        actions, mask = actions[:, -pred.shape[1]:], mask[:, -pred.shape[1]:].float()
        if self.discrete:
            per_step = F.cross_entropy(pred.flatten(0, 1), actions.long().flatten(), reduction="none")
            per_step = per_step.view_as(mask)
        else:
            per_step = ((pred - actions.float()) ** 2).mean(-1)
        return (per_step * mask).sum() / mask.sum().clamp_min(1.0)

    @torch.no_grad()
    def act(self, states: torch.Tensor, actions: torch.Tensor, returns_to_go: torch.Tensor,
            timesteps: torch.Tensor, mask: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        """Action for the newest step of each window (B, A) (or (B,) ints when discrete); raw states/returns.

        Equals ``predict_actions(batch)[:, -1]`` but runs ``forward(..., newest_only=True)``: the newest action
        (not known yet, a placeholder no state token attends to) is left out and the last block computes only
        the newest state token, about a third less work for the paper's 3 layers.

        ``cache``: a dict owned by the caller, empty at the start of a rollout and passed again at every step
        (``rollout_returns`` does). The model keeps there what depends on one step alone (RADT: the returns'
        keys, values and modulations) and, when a call's windows are the previous call's slid by one step
        (checked), computes it only for the newest step; other windows are computed in full.
        """
        batch = {"states": states, "actions": actions, "returns_to_go": returns_to_go, "timesteps": timesteps,
                 "mask": mask}
        pred = self.action_head(self(*self.prepare_inputs(batch), newest_only=True, cache=cache))
        return pred.argmax(-1) if self.discrete else torch.tanh(pred)

    # -- training loop ---------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.action_loss(self.predict_actions(batch), batch["actions"], batch["mask"])
        self.log("train/action_loss", loss, prog_bar=True, batch_size=batch["states"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        n = batch["mask"][:, -self.context_len:].sum()
        loss = self.action_loss(self.predict_actions(batch), batch["actions"], batch["mask"])
        self.val_loss.update(loss, weight=n)
        self.log("val/action_loss", self.val_loss, prog_bar=True, on_epoch=True, batch_size=int(n))

