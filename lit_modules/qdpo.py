"""QDPO: align a quantized LLM with its full-precision self by preference optimisation (Lee et al., ACL 2024,
arXiv 2407.03051; docs/papers.md §4).

- Pairs (:class:`datamodules.QDPOPairsDataModule`): for each prompt, chosen = the full-precision model's
  answer, rejected = the quantized model's answer; identical pairs carry no signal and are dropped.
- Policy = the full-precision model with fake-quantized weights (:func:`lm.quantization.prepare_qat`) of the
  post-training quantizer ``quantizer`` (``rtn``, ``hqq``, ``gptq``, ``awq``; ``bits``/``group_size``); gradients
  reach the latent fp weights through the rounding with the straight-through estimator (quantization-aware
  training). The grid follows :mod:`lm.quantization`'s rule: ``rtn``'s scales are a function of the weights, so they
  are recomputed from the latent weights at every step and the export re-applies RTN (the paper's "re-quantized at
  the end", docs/papers.md §4), and so are ``awq``'s once its calibrated scales are folded into the model (RTN of
  the folded weights); ``hqq``/``gptq`` grids come from an optimiser or calibration data, so the grid the PTQ method
  chose stays fixed. GPTQ and AWQ calibrate on built-in training-side prompts
  (:meth:`QDPO.calibration_prompts`), never on the held-out evaluation ones.
- Reference = the initial quantized model (= the PTQ model; the paper's reference is marked *unverified*
  in docs/papers.md), by default as reference log-probs precomputed once before training (:class:`DPO`).
- Loss = :class:`DPO`'s (sigmoid DPO by default, any of ``lit_modules.PREFERENCE_LOSSES``).
- At the end (``export_dir``) or on demand (:meth:`QDPO.export`, :meth:`QDPO.quantized_model`) the latent
  weights are quantized by the same rule (RTN re-applied; the fixed grids) into real low-bit weights
  (:func:`~lm.quantization.convert_qat`) and written with ``save_pretrained``: loading needs ``torchao`` installed,
  then plain ``AutoModelForCausalLM.from_pretrained(dir)`` / ``lm.hf.load_causal_lm(dir)``.

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

from datamodules.contract import PairModels
from datamodules.freeform_prompts import load_prompt_records
from lit_modules.base import LRSchedulerCallable, OptimizerCallable
from lit_modules.builtin_checkpoints import require_built_in
from lit_modules.dpo import DPO, module_fingerprint
from lm.hf import ModelSpec
from lm.quantization import (FIXED_GRID, QuantizerConfig, convert_qat, fake_quantized_layers, prepare_qat,
                             save_quantized)
from lm.sharding import is_model_parallel
from lm.tokenizers import resolve_prompt_template

log = logging.getLogger(__name__)

#: How to produce the default full-precision model (the MiniLLM teacher: a tiny Llama SFT'd on the built-in tasks).
FP_SFT_HINT = "litpapers fit --config configs/minillm/teacher_sft.yaml"


class QDPO(DPO):
    """Quantization-aware DPO of a weight-only quantized causal LM against its full-precision self.

    Args:
        model: the full-precision model — a ``save_pretrained`` directory (e.g. the export of
            ``configs/minillm/teacher_sft.yaml``), a hub name in the local cache, or a config dict (tests).
        tokenizer: tokenizer name/path; ``None`` = the model directory's, else byte-level.
        quantizer: the post-training quantizer whose grid QDPO trains on and exports: ``"rtn"`` (round to
            nearest), ``"hqq"``, ``"gptq"`` or ``"awq"`` (:mod:`lm.quantization`).
        bits: weight bit-width, 2..8.
        group_size: input columns sharing one scale (must divide every quantized layer's input width);
            ``None`` = one scale per output row.
        include_lm_head: quantize the output projection too (default: kept in full precision).
        quantizer_options: further :class:`lm.quantization.QuantizerConfig` fields, e.g. ``{calibration: freeform,
            calibration_size: 128}`` (GPTQ/AWQ calibration prompts), ``percdamp``, ``awq_grid``.
        train_scales: hqq/gptq only: also train the per-group scales the PTQ method chose (LSQ gradient);
            default: the grid stays fixed and only the latent weights move. Either way the export holds the trained
            grid. (``rtn``'s and ``awq``'s scales are recomputed from the weights, never trained: an error.)
        train_quantized_only: train only the latent weights of the quantized layers; embeddings, norms and the
            (unquantized) ``lm_head`` stay frozen at their full-precision values, as they are in the exported
            model. Measured on the built-in setup, training them too moved the model away from FP much faster.
        export_dir: if set, the converted (real low-bit) model and tokenizer are saved there when training ends.
        loss, beta, loss_kwargs, precompute_ref_logps, ref_cache_dir, length_normalize, dtype, init_seed:
            see :class:`lit_modules.DPO` (reference log-probs are precomputed by default).
        lr, weight_decay, betas, warmup_steps, lr_decay, min_lr_ratio, optimizer, lr_scheduler: see
            :class:`lit_modules.PaperModule`.

    The networks (policy, reference, full-precision model) are declared on the meta device at construction (so
    ``group_size`` is checked against the layer widths before any weight is read) and materialised by
    ``configure_model``, as :class:`~lit_modules.DPO`'s; :meth:`pair_models` calls it, since
    ``QDPOPairsDataModule`` generates its pairs before the trainer does.
    """

    frozen_networks = ("ref_model", "full_precision")

    def __init__(self, model: ModelSpec | None = None, tokenizer: str | None = None, quantizer: str = "rtn",
                 bits: int = 4, group_size: int | None = 32, include_lm_head: bool = False,
                 quantizer_options: dict[str, Any] | None = None, train_scales: bool = False,
                 train_quantized_only: bool = True,
                 export_dir: str | None = None,
                 loss: str = "sigmoid", beta: float = 0.1, loss_kwargs: dict[str, Any] | None = None,
                 precompute_ref_logps: bool = True, ref_cache_dir: str | None = None,
                 length_normalize: bool = False, dtype: str | None = None, init_seed: int = 0, lr: float = 2e-5,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), warmup_steps: int = 0,
                 lr_decay: str = "cosine", min_lr_ratio: float = 0.1, optimizer: OptimizerCallable | None = None,
                 lr_scheduler: LRSchedulerCallable | None = None):
        self.quantizer = quantizer_config(quantizer, bits, group_size, include_lm_head, quantizer_options)
        if train_scales and self.quantizer.name not in FIXED_GRID:
            raise ValueError(f"train_scales=True needs a fixed-grid quantizer {FIXED_GRID}: quantizer "
                             f"{self.quantizer.name!r} recomputes its scales from the latent weights at every step "
                             "(lm/quantization.py)")
        self.train_quantized_only, self.train_scales = train_quantized_only, train_scales
        require_built_in(model)  # before the tokenizer is read from it
        try:
            super().__init__(model=model, ref_model=None, tokenizer=tokenizer, loss=loss, beta=beta,
                             loss_kwargs=loss_kwargs, precompute_ref_logps=precompute_ref_logps,
                             ref_cache_dir=ref_cache_dir, length_normalize=length_normalize, dtype=dtype,
                             init_seed=init_seed, export_dir=export_dir, lr=lr, weight_decay=weight_decay,
                             betas=betas, warmup_steps=warmup_steps, lr_decay=lr_decay, min_lr_ratio=min_lr_ratio,
                             optimizer=optimizer, lr_scheduler=lr_scheduler)  # declares the networks: a
        except OSError as e:  # group_size the layer widths do not take is a clear error now, before any weight is read
            raise FileNotFoundError(f"QDPO: cannot load the full-precision model {model!r} ({e}). If it is a local "
                                    f"export, train it first: `{FP_SFT_HINT}`") from e
        self._fingerprint: dict[str, str] | None = None

    # ------------------------------------------------------------------ networks
    def build_policy(self) -> nn.Module:
        """Keep the loaded model as the frozen full-precision yardstick; return a fake-quantized copy
        (:func:`lm.quantization.prepare_qat`; GPTQ/AWQ calibrated on :meth:`calibration_prompts`, on real weights:
        declared on the meta device, only the layers are swapped)."""
        full_precision = super().build_policy()
        declared = any(p.is_meta for p in full_precision.parameters())
        policy = prepare_qat(copy.deepcopy(full_precision), self.quantizer,
                             None if declared else self.calibration_ids(full_precision))
        fakes = fake_quantized_layers(policy)
        if self.train_scales:
            for m in fakes:
                m.learn_scale()
        if self.train_quantized_only:
            quantized = {id(p) for m in fakes for p in (m.weight, getattr(m, "scale", None))
                         if isinstance(p, nn.Parameter)}
            for p in policy.parameters():
                p.requires_grad_(id(p) in quantized)
        self.full_precision = self._frozen(full_precision)
        return policy

    def calibration_prompts(self) -> list[str]:
        """GPTQ/AWQ's calibration prompts: ``quantizer.calibration_size`` built-in prompts of source
        ``quantizer.calibration`` (``"tasks"`` or ``"freeform"``, its training split) in the model's prompt format;
        empty for quantizers without calibration. :class:`callbacks.QuantizationEval` never evaluates on them."""
        q = self.quantizer
        if not q.calibrated:
            return []
        template = resolve_prompt_template(self.tokenizer, None, "QDPO calibration")
        return [r["prompt"] for r in load_prompt_records(q.calibration, None, q.calibration_size, q.calibration_seed,
                                                          template, split="train", where="quantizer calibration")]

    def calibration_ids(self, model: nn.Module) -> list[torch.Tensor]:
        """:meth:`calibration_prompts` as token-id sequences on ``model``'s device."""
        device = next(model.parameters()).device
        return [torch.tensor(self.tokenizer(p, add_special_tokens=False)["input_ids"], device=device)
                for p in self.calibration_prompts()]

    def train(self, mode: bool = True):
        super().train(mode)
        self.full_precision.eval()
        return self

    def configure_model(self) -> None:
        """Materialise the networks (:class:`~lit_modules.base.DeferredNetworksModule`); under
        ``ModelParallelStrategy`` one clear error instead, raised at start-up: :meth:`pair_models` calls this hook
        before ``QDPOPairsDataModule`` generates any pair."""
        if is_model_parallel(self):
            raise ValueError("QDPO does not support ModelParallelStrategy (FSDP2 sharding): its export and "
                             "quantized_model() re-quantize a deep copy of the whole fake-quantized policy with "
                             "torchao (convert_qat), which needs unsharded weights. Use trainer.strategy: ddp")
        super().configure_model()

    def pair_models(self) -> PairModels:
        """The full-precision model, the quantized policy, the tokenizer and their fingerprint, for
        :class:`datamodules.QDPOPairsDataModule` (:class:`~datamodules.contract.PairModelSource`).

        Pairs are generated before training, when the policy is still the PTQ-quantized model; the fingerprint
        (full-precision weights + quantizer) keys the pair cache. Materialises the networks first
        (:meth:`configure_model`; a no-op once done): the datamodule asks before the trainer's own call."""
        self.configure_model()
        if self._fingerprint is None:
            self._fingerprint = {"full_precision": module_fingerprint(self.full_precision),
                                 "quantization": self.quantizer.key()}
        return PairModels(self.full_precision, self.policy, self.tokenizer, self._fingerprint)

    def quantized_model(self) -> nn.Module:
        """A copy of the policy with its latent weights quantized into real low-bit weights (RTN re-applied to the
        trained weights for ``rtn``, the fixed grids otherwise): the same forward as the fake-quantized policy."""
        return convert_qat(copy.deepcopy(self.policy))

    # ------------------------------------------------------------------ logging and export
    def on_train_start(self) -> None:
        dm = self.trainer.datamodule
        if self.logger is not None and dm is not None and getattr(dm, "pairs", None) is not None:
            self.logger.log_metrics({"data/pairs_kept": len(dm.pairs),
                                     "data/pairs_identical_dropped": dm.num_dropped_identical}, step=0)

    def export(self, path: str | Path) -> Path:
        """Convert to real low-bit weights and ``save_pretrained`` model + tokenizer into ``path``."""
        path = save_quantized(self.quantized_model().cpu(), path, self.quantizer, tokenizer=self.tokenizer)
        log.info("QDPO: saved the %s model to %s (load with torchao installed)", self.quantizer.tag, path)
        return path


def quantizer_config(quantizer: str = "rtn", bits: int = 4, group_size: int | None = 32, include_lm_head: bool = False,
                     quantizer_options: dict[str, Any] | None = None) -> QuantizerConfig:
    """QDPO's quantizer arguments as one validated :class:`lm.quantization.QuantizerConfig` (no model needed):
    one ``ValueError`` naming the option for an unknown quantizer, unsupported bits, a bad group size or an
    unknown ``quantizer_options`` key."""
    options = dict(quantizer_options or {})
    known = set(QuantizerConfig.__dataclass_fields__) - {"name", "bits", "group_size", "include_lm_head"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"quantizer_options has unknown key(s) {unknown}: choose from {sorted(known)}")
    return QuantizerConfig(quantizer, bits, group_size, include_lm_head, **options)
