"""Next-token language modelling of any Hugging Face causal LM (the paired module for AdEMAMix runs,
the SFT teacher of MiniLLM, and the model the over-squashing probes watch).

loss = −(1/N) Σ_t log p_θ(x_t | x_<t) over the N non-padding target tokens; perplexity = exp(loss).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torchmetrics
from transformers import PreTrainedModel

from lit_modules.base import DeferredNetworksModule, LRSchedulerCallable, OptimizerCallable
from lm.hf import ModelSpec, load_causal_lm
from lm.sharding import build_causal_lm, export_pretrained
from lm.tokenizers import load_tokenizer


class CausalLM(DeferredNetworksModule):
    """Train a causal LM with next-token cross-entropy.

    Args:
        model: hub name, local ``save_pretrained`` directory, or a config dict for a tiny random model
            (missing fields from ``lm.hf.TINY_LLAMA``; ``vocab_size`` from the tokenizer).
        tokenizer: tokenizer name/path; ``None`` uses the model directory's, else byte-level.
        dtype: parameter dtype (``"float32"``, ``"bf16"``...); ``None`` keeps the checkpoint's/fp32.
        export_dir: if set, ``save_pretrained`` model and tokenizer there when training ends.
        init_seed: seed for the random initialisation of a config-dict model.
        lr, weight_decay, betas, warmup_steps, lr_decay, min_lr_ratio, optimizer, lr_scheduler: see
            :class:`PaperModule`.

    Batches are dicts with ``input_ids``, optional ``attention_mask`` and ``labels`` (−100 = ignored);
    without ``labels`` every non-padding token is a target. The network (``self.model``) is declared on the meta
    device at construction and materialised by ``configure_model`` (:class:`~lit_modules.base.DeferredNetworksModule`;
    sharded under ``ModelParallelStrategy``; outside a trainer call ``module.configure_model()`` first).
    """

    trainable_networks = ("model",)

    def __init__(self, model: ModelSpec | None = None, tokenizer: str | None = None, dtype: str | None = None,
                 export_dir: str | None = None, init_seed: int = 0, lr: float = 3e-4, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.95), warmup_steps: int = 0, lr_decay: str = "cosine",
                 min_lr_ratio: float = 0.1, optimizer: OptimizerCallable | None = None,
                 lr_scheduler: LRSchedulerCallable | None = None):
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, lr=lr, weight_decay=weight_decay,
                         betas=betas, warmup_steps=warmup_steps, lr_decay=lr_decay, min_lr_ratio=min_lr_ratio)
        self.save_hyperparameters()
        self.model_spec, self.param_dtype, self.init_seed = ({} if model is None else model), dtype, init_seed
        self.tokenizer = load_tokenizer(tokenizer, self.model_spec)
        self.export_dir = export_dir
        self.val_loss = torchmetrics.MeanMetric()
        self.val_ppl = torchmetrics.text.Perplexity(ignore_index=-100)
        self.declare_networks()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @staticmethod
    def targets(batch: dict[str, torch.Tensor], pad_token_id: int | None) -> torch.Tensor:
        """Labels for next-token loss: ``batch["labels"]`` if given, else the inputs with padding → −100."""
        if "labels" in batch:
            return batch["labels"]
        labels = batch["input_ids"].clone()
        if "attention_mask" in batch:
            labels[batch["attention_mask"] == 0] = -100
        elif pad_token_id is not None:
            labels[labels == pad_token_id] = -100
        return labels

    def _loss_and_logits(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        labels = self.targets(batch, self.tokenizer.pad_token_id)
        out = self(batch["input_ids"], batch.get("attention_mask"), labels=labels)
        return out.loss, out.logits, labels

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _, labels = self._loss_and_logits(batch)
        n_tokens = int((labels[:, 1:] != -100).sum())
        self.log("train/loss", loss, prog_bar=True, batch_size=n_tokens)
        self.log("train/ppl", loss.detach().exp(), batch_size=n_tokens)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, logits, labels = self._loss_and_logits(batch)
        n_tokens = int((labels[:, 1:] != -100).sum())
        self.val_loss.update(loss, weight=n_tokens)
        self.val_ppl.update(logits[:, :-1].float(), labels[:, 1:])
        self.log("val/loss", self.val_loss, prog_bar=True, on_epoch=True, batch_size=n_tokens)
        self.log("val/ppl", self.val_ppl, on_epoch=True, batch_size=n_tokens)

    def export(self, path: str | Path) -> Path:
        """``save_pretrained`` the model and tokenizer into ``path`` (loadable by ``load_causal_lm(path)``).
        Sharded: collective (weights gathered once), rank 0 writes and the others return ``None``."""
        return export_pretrained(self, self.model, self.tokenizer, path)

    def build_networks(self) -> None:
        self.model: PreTrainedModel = build_causal_lm(self, lambda: load_causal_lm(
            self.model_spec, vocab_size=len(self.tokenizer), dtype=self.param_dtype, seed=self.init_seed))

    def on_train_end(self) -> None:
        if self.export_dir:  # every rank: sharded weights are gathered collectively, rank 0 writes
            self.export(self.export_dir)
