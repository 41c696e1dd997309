"""Direct preference optimisation of any Hugging Face causal LM with a pluggable pairwise loss (DPO, DiscoPOP
and the rest of :mod:`lit_modules.preference_losses`; docs/papers.md §6).

Per batch of B pairs (2B rows, chosen first — see :mod:`datamodules.preference`):
1. one policy forward gives log π(y|x) = Σ_{t ∈ response} log π(x_t | x_<t) per sequence (prompt tokens and
   padding never count): by default over B rows, each pair's chosen and rejected response packed behind one copy
   of their prompt (:mod:`lm.packing`, log-probs from the response positions' logits only, :mod:`lm.logprobs`);
   with ``packed=False`` over the 2B padded sequences (:func:`sequence_logps`);
2. the reference log-probs come from precomputed ones (``precompute_ref_logps``), from the batch
   (``ref_chosen_logps``/``ref_rejected_logps`` keys), or from a no-grad reference forward;
3. loss = mean_i ℓ(π_w,i, π_l,i, ref_w,i, ref_l,i; β), rewards r = β·(log π − log π_ref).

Subclasses (e.g. QDPO) override :meth:`DPO.build_policy` / :meth:`DPO.build_reference` and reuse the rest.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torchmetrics
from torch import Tensor, nn

from lit_modules.base import DeferredNetworksModule, LRSchedulerCallable, OptimizerCallable
from lit_modules.preference_losses import PREFERENCE_LOSSES, preference_loss, resolve_preference_loss
from lm.hf import ModelSpec, load_causal_lm
from lm.packing import packed_pair_logps, supports_packed_pairs
from lm.sharding import build_causal_lm, export_pretrained, is_model_parallel
from lm.tokenizers import load_tokenizer

log = logging.getLogger(__name__)

METRICS = ("loss", "reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected", "logps_chosen",
           "logps_rejected")


def sequence_logps(logits: Tensor, input_ids: Tensor, response_mask: Tensor, length_normalize: bool = False) -> Tensor:
    """Per-sequence log-probability of the response tokens, shape (N,).

    log π(y|x) = Σ_t m_t · log softmax(logits_{t−1})[x_t], where m_t = ``response_mask[:, t]`` (1 on response
    tokens, 0 on prompt and padding); with ``length_normalize`` divided by Σ_t m_t (per-token mean).
    ``logits`` may cover only the last K positions (``logits_to_keep=K``): then the response must lie in the
    last K−1 positions. Half-precision logits are upcast to float32 first.
    """
    offset = input_ids.shape[1] - logits.shape[1]
    if offset < 0 or bool(response_mask[:, : offset + 1].any()):
        raise ValueError(f"logits cover the last {logits.shape[1]} positions, but response tokens start earlier")
    logits = logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    targets, mask = input_ids[:, offset + 1:], response_mask[:, offset + 1:].to(logits.dtype)
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    total = (token_logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1.0) if length_normalize else total


def response_logits_to_keep(response_mask: Tensor) -> int:
    """K such that the last K logits predict every response token: T − (first response position) + 1."""
    columns = response_mask.any(0).nonzero()
    if len(columns) == 0:
        raise ValueError("batch has no response tokens (response_mask is all zero)")
    return response_mask.shape[1] - int(columns[0]) + 1


def is_right_padded(attention_mask: Tensor) -> bool:
    """True when every row is real tokens followed only by padding (mask non-increasing along the row)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def module_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the names, dtypes and bytes of a module's parameters and buffers."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class DPO(DeferredNetworksModule):
    """Preference optimisation (DPO / DiscoPOP / any :data:`~lit_modules.PREFERENCE_LOSSES` or your own loss).

    Args:
        model: the policy — hub name, local ``save_pretrained`` directory (e.g. an SFT export), or a config
            dict for a tiny random model.
        ref_model: the reference; ``None`` = a frozen copy of the initial policy, else a name/path/config dict.
        tokenizer: tokenizer name/path; ``None`` = the model directory's, else byte-level.
        loss: a registered loss name, ``"module.path:function"``, or a callable with the same signature.
        beta: β (scales the log-ratio margin in every loss).
        loss_kwargs: extra keyword arguments of the loss (``label_smoothing``, ``tau``, ...).
        precompute_ref_logps: compute the reference log-probs of every pair once at fit start (cached to
            ``ref_cache_dir`` keyed by reference weights + data), then drop the reference model.
        ref_cache_dir: cache directory (default ``$LITPAPERS_CACHE/dpo_ref_logps``).
        length_normalize: use per-token mean log-probs instead of sums. ``None`` (default) = per-token means
            for ``ipo`` (as TRL's ``DPOTrainer`` does for IPO, both the version DiscoPOP subclassed and today's;
            docs/papers.md §6) and sums for every other loss; ``False`` gives IPO with summed log-probs.
        packed: compute a pair's log-probs in one row, chosen and rejected responses behind one copy of the shared
            prompt (:mod:`lm.packing`; same values and gradients, about half the tokens). Models it does not
            support (no ``position_ids``/``logits_to_keep``, or an attention implementation other than ``sdpa``/
            ``eager``) use the padded 2B-row forward, as ``packed=False`` does.
        dtype: parameter dtype of policy and reference (``"bf16"``...); ``None`` = checkpoint's/fp32.
        init_seed: seed of a config-dict model's random initialisation.
        export_dir: if set, ``save_pretrained`` the policy and tokenizer there when training ends.
        lr, weight_decay, betas, warmup_steps, lr_decay, min_lr_ratio, optimizer, lr_scheduler: see
            :class:`PaperModule`.

    Policy and reference (:meth:`build_policy`, :meth:`build_reference`) are declared on the meta device at
    construction and materialised by ``configure_model`` (:class:`~lit_modules.base.DeferredNetworksModule`;
    sharded under ``ModelParallelStrategy``; outside a trainer call ``module.configure_model()`` first).
    """

    trainable_networks = ("policy",)
    frozen_networks = ("ref_model",)

    #: The validation curves :class:`callbacks.MetricFigures` draws (tag -> panel -> logged metrics).
    metric_figures = {"val/rewards": {"val rewards β·(log π − log π_ref)": ["val/reward_chosen", "val/reward_rejected",
                                                                          "val/reward_margin"],
                                      "val reward accuracy": ["val/reward_accuracy"]}}

    def __init__(self, model: ModelSpec | None = None, ref_model: ModelSpec | None = None,
                 tokenizer: str | None = None, loss: str = "sigmoid", beta: float = 0.1,
                 loss_kwargs: dict[str, Any] | None = None, precompute_ref_logps: bool = False,
                 ref_cache_dir: str | None = None, length_normalize: bool | None = None, packed: bool = True,
                 dtype: str | None = None,
                 init_seed: int = 0, export_dir: str | None = None, lr: float = 5e-4, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), warmup_steps: int = 0, lr_decay: str = "cosine",
                 min_lr_ratio: float = 0.1, optimizer: OptimizerCallable | None = None,
                 lr_scheduler: LRSchedulerCallable | None = None):
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, lr=lr, weight_decay=weight_decay,
                         betas=betas, warmup_steps=warmup_steps, lr_decay=lr_decay, min_lr_ratio=min_lr_ratio)
        self.save_hyperparameters()
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.loss_fn = resolve_preference_loss(loss)
        self.loss_name = loss.rsplit(":", 1)[-1] if isinstance(loss, str) else getattr(loss, "__name__", "custom")
        if length_normalize is None:
            length_normalize = self.loss_fn is PREFERENCE_LOSSES["ipo"]
        self.beta, self.loss_kwargs = beta, dict(loss_kwargs or {})
        probe = torch.zeros(2)  # fail at construction, not at the first step, on a wrong loss or loss_kwargs
        preference_loss(self.loss_fn, probe, probe, probe, probe, beta=beta, **self.loss_kwargs)
        self.precompute_ref_logps, self.ref_cache_dir = precompute_ref_logps, ref_cache_dir
        self.length_normalize, self.export_dir, self.packed = length_normalize, export_dir, packed
        self.model_spec, self.ref_model_spec = ({} if model is None else model), ref_model
        self.param_dtype, self.init_seed = dtype, init_seed
        self.tokenizer = load_tokenizer(tokenizer, self.model_spec)
        #: (N, 2) precomputed reference log-probs [chosen, rejected] by pair index (NaN = not computed).
        self.ref_logps_table: Tensor | None = None
        self.val_metrics = torchmetrics.MetricCollection({k: torchmetrics.MeanMetric() for k in METRICS})
        self.declare_networks()

    # ------------------------------------------------------------------ networks (override points)
    def build_networks(self) -> None:
        self.policy: nn.Module = build_causal_lm(self, self.build_policy)
        self.ref_model: nn.Module | None = (None if self.precompute_ref_logps else
                                            build_causal_lm(self, self.build_reference, frozen=True))

    def build_policy(self) -> nn.Module:
        """The trainable policy (an HF causal LM). Override to wrap it (e.g. fake quantisation)."""
        return load_causal_lm(self.model_spec, vocab_size=len(self.tokenizer), dtype=self.param_dtype,
                              seed=self.init_seed)

    def build_reference(self) -> nn.Module:
        """The reference: ``ref_model`` if given, else a copy of the policy as :meth:`build_policy` left it
        (whole: :func:`~lm.sharding.build_causal_lm` shards it)."""
        if self.ref_model_spec is None:  # a sharded (FSDP2) policy cannot be deep-copied: build it again
            return self.build_policy() if is_model_parallel(self) else copy.deepcopy(self.policy)
        return load_causal_lm(self.ref_model_spec, vocab_size=len(self.tokenizer), dtype=self.param_dtype,
                              seed=self.init_seed)

    @staticmethod
    def _frozen(model: nn.Module) -> nn.Module:
        return model.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.ref_model is not None:
            self.ref_model.eval()
        return self

    # ------------------------------------------------------------------ log-probs
    def forward_logits(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """Logits of ``model`` over the batch, only for the positions that predict response tokens when the
        model supports ``logits_to_keep`` (HF causal LMs do). For right-padded rows the attention mask is
        dropped: under causal attention a real token never sees the padding after it, so plain causal
        attention gives the same outputs at every real position, on the kernels' fast path."""
        mask = batch["attention_mask"]
        kwargs: dict[str, Any] = {"input_ids": batch["input_ids"],
                                  "attention_mask": None if is_right_padded(mask) else mask}
        if _accepts(model, "logits_to_keep"):
            kwargs["logits_to_keep"] = response_logits_to_keep(batch["response_mask"])
        if _accepts(model, "use_cache"):
            kwargs["use_cache"] = False
        return model(**kwargs).logits

    def concatenated_logps(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(chosen, rejected) log-probs, each (B,), from one forward: over B packed rows (``packed``, when the model
        supports it) or over the 2B padded rows."""
        if self.packed and supports_packed_pairs(model):
            logps = packed_pair_logps(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"],
                                      self.length_normalize)
        else:
            logps = sequence_logps(self.forward_logits(model, batch), batch["input_ids"], batch["response_mask"],
                                   self.length_normalize)
        return logps.chunk(2)

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Reference (chosen, rejected) log-probs: from the batch, the precomputed table, or the reference."""
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        if self.ref_logps_table is not None:
            if "index" not in batch:
                raise KeyError("precomputed reference log-probs need batch['index'] (pair ids)")
            rows = self.ref_logps_table[batch["index"]]
            if torch.isnan(rows).any():
                missing = batch["index"][torch.isnan(rows).any(1)].tolist()
                raise KeyError(f"no precomputed reference log-probs for pair index {missing[:5]}")
            return rows[:, 0], rows[:, 1]
        if self.ref_model is None:
            raise RuntimeError("no reference: precomputed log-probs were not computed (fit did not start?) "
                               "and there is no reference model")
        return self.concatenated_logps(self.ref_model, batch)

    # ------------------------------------------------------------------ precomputed reference
    def _ref_loaders(self) -> list:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None:
            raise RuntimeError("precompute_ref_logps needs a datamodule (trainer.fit(model, datamodule=...))")
        if hasattr(dm, "all_dataloader"):
            return [dm.all_dataloader()]
        return [loader for loader in (dm.train_dataloader(), dm.val_dataloader()) if loader]

    def _data_fingerprint(self, loaders: list) -> str:
        per_pair = {}
        for loader in loaders:
            for batch in loader:
                b = len(batch["index"])
                for i, idx in enumerate(batch["index"].tolist()):
                    h = hashlib.sha256()
                    for row in (i, i + b):
                        keep = batch["attention_mask"][row].bool()
                        h.update(batch["input_ids"][row][keep].numpy().tobytes())
                        h.update(batch["response_mask"][row][keep].numpy().tobytes())
                    per_pair[idx] = h.hexdigest()
        return hashlib.sha256("".join(f"{k}:{v};" for k, v in sorted(per_pair.items())).encode()).hexdigest()

    @torch.no_grad()
    def compute_ref_logps_table(self, reference: nn.Module, loaders: list) -> Tensor:
        """(N, 2) reference log-probs [chosen, rejected] for every pair of ``loaders``, by ``batch["index"]``."""
        results: dict[int, Tensor] = {}
        reference.eval()
        for loader in loaders:
            for batch in loader:
                batch = {k: v.to(self.device) for k, v in batch.items()}
                chosen, rejected = self.concatenated_logps(reference, batch)
                for idx, c, r in zip(batch["index"].tolist(), chosen.float().cpu(), rejected.float().cpu()):
                    results[idx] = torch.stack([c, r])
        table = torch.full((max(results) + 1, 2), float("nan"))
        for idx, v in results.items():
            table[idx] = v
        return table

    def on_fit_start(self) -> None:
        with torch.random.fork_rng(devices=[]):  # cached or computed, the table must not move the training RNG
            self.prepare_reference_logps()

    def on_validation_start(self) -> None:  # `trainer.validate` without a preceding fit
        self.prepare_reference_logps()

    def prepare_reference_logps(self) -> None:
        """With ``precompute_ref_logps``: fill :attr:`ref_logps_table` once (from the disk cache when the same
        reference and data were seen before), using a temporary reference that is freed afterwards."""
        if not self.precompute_ref_logps or self.ref_logps_table is not None:
            return
        loaders = self._ref_loaders()
        reference = self._frozen(self.build_reference()).to(self.device)
        # packed and eager log-probs agree to ~1e-6, not bit for bit: one table per path, so the numbers of a run do
        # not depend on which path filled the cache first
        key = hashlib.sha256(f"{module_fingerprint(reference)}|{self._data_fingerprint(loaders)}|"
                             f"{self.length_normalize}|packed={self.packed}".encode()).hexdigest()[:20]
        from datamodules.common import cache_dir  # here, not at the top: datamodules imports lit_modules

        path = Path(self.ref_cache_dir) if self.ref_cache_dir else cache_dir("dpo_ref_logps")
        path.mkdir(parents=True, exist_ok=True)
        file = path / f"{key}.pt"
        if file.exists():
            table = torch.load(file)
            log.info("DPO: loaded precomputed reference log-probs from %s", file)
        else:
            table = self.compute_ref_logps_table(reference, loaders)
            if self.trainer.is_global_zero:  # write-then-rename: other ranks never read a partial file
                torch.save(table, file.with_suffix(".tmp"))
                os.replace(file.with_suffix(".tmp"), file)
            log.info("DPO: precomputed reference log-probs of %d pairs -> %s", len(table), file)
        del reference
        self.ref_logps_table = table.to(self.device)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.ref_logps_table is not None:
            checkpoint["dpo_ref_logps_table"] = self.ref_logps_table.cpu()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "dpo_ref_logps_table" in checkpoint:
            self.ref_logps_table = checkpoint["dpo_ref_logps_table"]

    # ------------------------------------------------------------------ loss and steps
    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean preference loss of the batch and its detached metrics (``METRICS`` + the loss's extras).

        The loss gets copies of the log-probs (the policy's still carry their gradient) and the metrics are
        computed from the originals, so a loss that edits its inputs in place (``x.data.add_(...)``, ``x[i] = ...``)
        changes neither the rewards nor a precomputed reference table (issue 24.1: DiscoPOP's fitness is a metric).
        """
        policy_chosen, policy_rejected = self.concatenated_logps(self.policy, batch)
        ref_chosen, ref_rejected = self.reference_logps(batch)
        ref_chosen, ref_rejected = ref_chosen.to(policy_chosen), ref_rejected.to(policy_rejected)
        rewards = self.reward_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected)  # before the loss runs
        extras: dict[str, Tensor] = {}
        losses = preference_loss(self.loss_fn, policy_chosen.clone(), policy_rejected.clone(),
                                 ref_chosen.detach().clone(), ref_rejected.detach().clone(), beta=self.beta,
                                 stats=extras, **self.loss_kwargs)
        loss = losses.mean()
        metrics = {"loss": loss.detach().clone(), **rewards}
        metrics.update({f"{self.loss_name}_{k}": v.detach().clone() for k, v in extras.items()})
        return loss, metrics

    def reward_metrics(self, policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
                       ref_rejected: Tensor) -> dict[str, Tensor]:
        """Rewards r = β·(log π − log π_ref) and their summaries (``METRICS`` but the loss), as new tensors that
        share no memory with the inputs."""
        reward_chosen = self.beta * (policy_chosen.detach() - ref_chosen.detach())
        reward_rejected = self.beta * (policy_rejected.detach() - ref_rejected.detach())
        return {"reward_accuracy": (reward_chosen > reward_rejected).float().mean(),
                "reward_margin": (reward_chosen - reward_rejected).mean(), "reward_chosen": reward_chosen.mean(),
                "reward_rejected": reward_rejected.mean(), "logps_chosen": policy_chosen.detach().mean(),
                "logps_rejected": policy_rejected.detach().mean()}

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, metrics = self.compute_loss(batch)
        n = batch["input_ids"].shape[0] // 2
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in metrics.items() if k != "loss"}, batch_size=n)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        _, metrics = self.compute_loss(batch)
        n = batch["input_ids"].shape[0] // 2
        for k in METRICS:
            self.val_metrics[k].update(metrics[k], weight=n)
        self.log_dict({f"val/{k}": v for k, v in metrics.items() if k not in METRICS}, batch_size=n, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        values = {f"val/{k}": v for k, v in self.val_metrics.compute().items()}
        self.val_metrics.reset()
        # already reduced over ranks by torchmetrics; sync_dist only tells Lightning so (a mean of equal values)
        self.log("val/loss", values.pop("val/loss"), prog_bar=True, sync_dist=True)
        self.log_dict(values, sync_dist=True)

    # ------------------------------------------------------------------ export
    def export(self, path: str | Path) -> Path:
        """``save_pretrained`` the policy and tokenizer into ``path`` (sharded: collective, rank 0 writes)."""
        return export_pretrained(self, self.policy, self.tokenizer, path)

    def on_train_end(self) -> None:
        if self.export_dir and (self.trainer.is_global_zero or is_model_parallel(self)):  # sharded: collective
            self.export(self.export_dir)


def _accepts(model: nn.Module, name: str) -> bool:
    params = inspect.signature(model.forward).parameters
    return name in params
