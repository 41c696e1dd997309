"""QDPO: align a quantized LLM with its full-precision self by preference optimisation (Lee et al., ACL 2024,
arXiv 2407.03051; docs/papers.md §4).

- Pairs (:class:`datamodules.QDPOPairsDataModule`): for each prompt, chosen = the full-precision model's
  answer, rejected = the quantized model's answer; identical pairs carry no signal and are dropped.
- Policy = the full-precision model with fake-quantized weights (:func:`lm.quantization.prepare_qat`:
  weight-only symmetric round-to-nearest, ``bits``/``group_size``); gradients reach the latent fp weights
  through the rounding with the straight-through estimator (quantization-aware training).
- Reference = the initial quantized model (= the RTN model; the paper's reference is marked *unverified*
  in docs/papers.md), by default as reference log-probs precomputed once before training (:class:`DPO`).
- Loss = :class:`DPO`'s (sigmoid DPO by default, any of ``lit_modules.PREFERENCE_LOSSES``).
- At the end (``export_dir``) or on demand (:meth:`QDPO.export`, :meth:`QDPO.quantized_model`) the latent
  weights are re-quantized into real low-bit weights (:func:`~lm.quantization.convert_qat`) and
  written with ``save_pretrained``: loading needs ``torchao`` installed, then plain
  ``AutoModelForCausalLM.from_pretrained(dir)`` / ``lm.hf.load_causal_lm(dir)``.

The frozen full-precision model stays in the module (``self.full_precision``): it generates the chosen
answers and is the yardstick of :class:`callbacks.QuantizationEval`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_modules.base import LRSchedulerCallable, OptimizerCallable
from lit_modules.builtin_checkpoints import require_built_in
from lit_modules.dpo import DPO, module_fingerprint
from lm.extras import require
from lm.hf import ModelSpec
from lm.quantization import convert_qat, prepare_qat, quantizable_linears, quantization_tag, save_quantized
from lm.sampling import generate_answers
from lm.sharding import is_model_parallel

log = logging.getLogger(__name__)

#: How to produce the default full-precision model (the MiniLLM teacher: a tiny Llama SFT'd on the built-in tasks).
FP_SFT_HINT = "litpapers fit --config configs/minillm/teacher_sft.yaml"


class QDPO(DPO):
    """Quantization-aware DPO of a weight-only quantized causal LM against its full-precision self.

    Args:
        model: the full-precision model — a ``save_pretrained`` directory (e.g. the export of
            ``configs/minillm/teacher_sft.yaml``), a hub name in the local cache, or a config dict (tests).
        tokenizer: tokenizer name/path; ``None`` = the model directory's, else byte-level.
        bits: weight bit-width, 2..8.
        group_size: input columns sharing one scale (must divide every quantized layer's input width);
            ``None`` = one scale per output row.
        include_lm_head: quantize the output projection too (default: kept in full precision).
        train_quantized_only: train only the latent weights of the quantized layers; embeddings, norms and the
            (unquantized) ``lm_head`` stay frozen at their full-precision values, as they are in the exported
            model. Measured on the built-in setup, training them too moved the model away from FP much faster.
        export_dir: if set, the converted (real low-bit) model and tokenizer are saved there when training ends.
        loss, beta, loss_kwargs, precompute_ref_logps, ref_cache_dir, length_normalize, dtype, init_seed:
            see :class:`lit_modules.DPO` (reference log-probs are precomputed by default).
        lr, weight_decay, betas, warmup_steps, lr_decay, min_lr_ratio, optimizer, lr_scheduler: see
            :class:`lit_modules.PaperModule`.

    The networks (policy, reference, full-precision model) are built in ``configure_model``, as
    :class:`~lit_modules.DPO`'s, or when first read (``QDPOPairsDataModule`` reads them before it); the
    constructor checks ``group_size`` against the layer widths on a meta-device copy (no weights).
    """

    frozen_networks = ("ref_model", "full_precision")

    def __init__(self, model: ModelSpec | None = None, tokenizer: str | None = None, bits: int = 4,
                 group_size: int | None = 32, include_lm_head: bool = False, train_quantized_only: bool = True,
                 export_dir: str | None = None,
                 loss: str = "sigmoid", beta: float = 0.1, loss_kwargs: dict[str, Any] | None = None,
                 precompute_ref_logps: bool = True, ref_cache_dir: str | None = None,
                 length_normalize: bool = False, dtype: str | None = None, init_seed: int = 0, lr: float = 2e-5,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), warmup_steps: int = 0,
                 lr_decay: str = "cosine", min_lr_ratio: float = 0.1, optimizer: OptimizerCallable | None = None,
                 lr_scheduler: LRSchedulerCallable | None = None):
        self.quant_tag = quantization_tag(bits, group_size, include_lm_head)  # validates bits/group_size
        self.bits, self.group_size, self.include_lm_head = bits, group_size, include_lm_head
        self.train_quantized_only = train_quantized_only
        require_built_in(model)  # before the tokenizer is read from it
        try:
            super().__init__(model=model, ref_model=None, tokenizer=tokenizer, loss=loss, beta=beta,
                             loss_kwargs=loss_kwargs, precompute_ref_logps=precompute_ref_logps,
                             ref_cache_dir=ref_cache_dir, length_normalize=length_normalize, dtype=dtype,
                             init_seed=init_seed, export_dir=export_dir, lr=lr, weight_decay=weight_decay,
                             betas=betas, warmup_steps=warmup_steps, lr_decay=lr_decay, min_lr_ratio=min_lr_ratio,
                             optimizer=optimizer, lr_scheduler=lr_scheduler)
            with torch.device("meta"):  # a clear error now on a group_size the layer widths do not take
                quantizable_linears(DPO.build_policy(self), group_size, include_lm_head)
        except OSError as e:
            raise FileNotFoundError(f"QDPO: cannot load the full-precision model {model!r} ({e}). If it is a local "
                                    f"export, train it first: `{FP_SFT_HINT}`") from e
        self._fingerprint: dict[str, str] | None = None

    # ------------------------------------------------------------------ networks
    def build_policy(self) -> nn.Module:
        """Keep the loaded model as the frozen full-precision yardstick; return a fake-quantized copy."""
        FakeQuantizedLinear = require("torchao.quantization.qat", "quant").FakeQuantizedLinear
        full_precision = super().build_policy()
        policy = prepare_qat(copy.deepcopy(full_precision), self.bits, self.group_size, self.include_lm_head)
        if self.train_quantized_only:
            quantized = {id(m.weight) for m in policy.modules() if isinstance(m, FakeQuantizedLinear)}
            for p in policy.parameters():
                p.requires_grad_(id(p) in quantized)
        self.full_precision = self._frozen(full_precision)
        return policy

    def train(self, mode: bool = True):
        super().train(mode)
        self.full_precision.eval()
        return self

    def configure_model(self) -> None:
        """Build the networks (:class:`~lit_modules.base.DeferredNetworksModule`); under
        ``ModelParallelStrategy`` one clear error instead, raised at start-up: this hook runs when the networks are
        first read, i.e. before ``QDPOPairsDataModule`` generates any pair (:meth:`pair_models`)."""
        if is_model_parallel(self):
            raise ValueError("QDPO does not support ModelParallelStrategy (FSDP2 sharding): its export and "
                             "quantized_model() re-quantize a deep copy of the whole fake-quantized policy with "
                             "torchao (convert_qat), which needs unsharded weights. Use trainer.strategy: ddp")
        super().configure_model()

    def pair_models(self) -> tuple[nn.Module, nn.Module, Any, dict[str, str]]:
        """(full precision, quantized policy, tokenizer, fingerprint) for :class:`datamodules.QDPOPairsDataModule`.

        Pairs are generated before training, when the policy is still the RTN-quantized model; the
        fingerprint (full-precision weights + quantizer) keys the pair cache."""
        if self._fingerprint is None:
            self._fingerprint = {"full_precision": module_fingerprint(self.full_precision),
                                 "quantization": self.quant_tag}
        return self.full_precision, self.policy, self.tokenizer, self._fingerprint

    def generate_answers(self, model: nn.Module, prompts: list[str], **decoding: Any) -> list[str]:
        """``model``'s answers to ``prompts`` with this module's tokenizer through the package's one sampler
        (:func:`lm.sampling.generate_answers`; ``decoding`` as there): how the pair generator decodes."""
        return generate_answers(model, self.tokenizer, prompts, **decoding)

    def quantized_model(self) -> nn.Module:
        """A copy of the policy with its latent weights re-quantized into real low-bit weights."""
        return convert_qat(copy.deepcopy(self.policy), self.bits, self.group_size)

    # ------------------------------------------------------------------ logging and export
    def on_train_start(self) -> None:
        dm = self.trainer.datamodule
        if self.logger is not None and dm is not None and getattr(dm, "pairs", None) is not None:
            self.logger.log_metrics({"data/pairs_kept": len(dm.pairs),
                                     "data/pairs_identical_dropped": dm.num_dropped_identical}, step=0)

    def export(self, path: str | Path) -> Path:
        """Convert to real low-bit weights and ``save_pretrained`` model + tokenizer into ``path``."""
        path = save_quantized(self.quantized_model().cpu(), path, self.bits, self.group_size,
                              self.include_lm_head, tokenizer=self.tokenizer)
        log.info("QDPO: saved the %s model to %s (load with torchao installed)", self.quant_tag, path)
        return path
