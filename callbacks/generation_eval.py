"""Evaluations of a generating LM against its task and its teacher, as a callback: the valid-answer rate and the
exposure bias of a distilled student (MiniLLM paper §3.3, App. B.5; LMOps ``minillm/evaluate_exposure_bias.py``).

- **valid-answer rate**: the fraction of sampled answers the built-in task's checker accepts
  (:func:`datamodules.instruction_tasks.check_answer`; records without ``task``/``params`` are skipped);
- **ExAccErr(l)** (:func:`excess_accumulated_error`): how much more per-step error KL(p ‖ q)
  (:func:`per_step_forward_kl`) the student q accumulates over l steps on its own samples than on the teacher p's
  (:func:`measure_exposure_bias`).

:class:`GenerationEval` reads what the module's ``validation_step`` returns, ``{"texts": [...], "rollout": Rollout,
"temperature": τ, "max_new_tokens": n}`` (the decoded answers, the :class:`~lm.sampling.Rollout` they came
from, the temperature and length cap it was sampled with), and the module's ``model``, ``teacher`` (``None``: no
exposure bias) and ``tokenizer``; :class:`lit_modules.MiniLLM` follows that contract. It logs ``val/valid_rate``
and ``val/ex_acc_err``.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from transformers import PreTrainedModel

from datamodules.instruction_tasks import check_answer
from lit_modules.minillm import kl_per_token
from lm.sampling import Rollout, response_logits, sample_mixed


def per_step_forward_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-step error of the exposure-bias analysis (paper §3.3 and App. B.5, after Arora et al. 2022; LMOps
    ``evaluate_exposure_bias.py``): at every position t of a given prefix,

        e_t = KL(p(·|y<t,x) ‖ q(·|y<t,x)) = Σ_v p(v|y<t,x) [log p(v|y<t,x) − log q(v|y<t,x)],

    teacher p, student q, exactly over the vocabulary (y_t is not sampled); fp32. (B, T, V) × 2 → (B, T); positions
    where ``mask`` is 0 are set to 0."""
    kl = kl_per_token(teacher_logits, student_logits)
    return kl if mask is None else kl * mask.to(kl.dtype)


def excess_accumulated_error(kl_on_student_prefixes: torch.Tensor, mask_s: torch.Tensor,
                             kl_on_teacher_prefixes: torch.Tensor, mask_t: torch.Tensor,
                             alive_mean: bool = True) -> torch.Tensor:
    """ExAccErr(l) in %, for l = 1..T (paper §3.3, App. B.5; Arora et al. 2022), from per-step errors e_t
    (:func:`per_step_forward_kl`, (B, T)) on prefixes sampled from the student (``*_s``) and from the teacher (``*_t``):

        R(l)        = Σ_{t≤l} E_{y<t ~ q(·|x)} [e_t]        accumulated error on the student's own prefixes
        l·ε(l)      = Σ_{t≤l} E_{y<t ~ p(·|x)} [e_t]        ε(l): mean per-step error on oracle (teacher) prefixes
        ExAccErr(l) = (R(l) − l·ε(l)) / (l·ε(l)) × 100

    Each expectation is estimated over the rows of its batch. Masks are 1 where the row's token t was sampled (EOS
    included), i.e. where the prefix y<t exists; a row that emitted EOS before t contributes nothing at t:

    - ``alive_mean=True`` (default): E[e_t] = Σ_i m_it e_it / Σ_i m_it, the mean over the rows still alive at t; a
      step at which no row of that set is alive adds 0 (all of that model's generations have stopped).
    - ``alive_mean=False``: the reference code's convention (LMOps ``evaluate_exposure_bias.py``): E[e_t] =
      Σ_i m_it e_it / N, an ended row counts as error 0 in a mean over all N rows, so a model whose answers end
      sooner accumulates less.

    The two sets may have different lengths (the shorter is padded with mask 0) and sizes. To pool several batches,
    concatenate their (B, T) tensors first; a mean of per-batch curves is not the same estimate. Returns a (T,)
    float tensor, NaN where l·ε(l) = 0 (e.g. identical models). Unlike the reference script, step t = 1 (the first
    response token, prefix = the prompt alone) is included; that script's slicing starts at t = 2.
    """
    T = max(kl_on_student_prefixes.shape[1], kl_on_teacher_prefixes.shape[1])

    def accumulated(kl: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        kl, mask = F.pad(kl.float(), (0, T - kl.shape[1])), F.pad(mask.float(), (0, T - mask.shape[1]))
        total = (kl * mask).sum(0)
        per_step = total / (mask.sum(0).clamp(min=1) if alive_mean else max(kl.shape[0], 1))
        return per_step.cumsum(0)

    r, l_eps = accumulated(kl_on_student_prefixes, mask_s), accumulated(kl_on_teacher_prefixes, mask_t)
    return torch.where(l_eps > 0, (r - l_eps) / l_eps * 100, torch.full_like(l_eps, float("nan")))


@dataclass
class ExposureBias:
    """:func:`measure_exposure_bias`'s result: the ExAccErr curve (T,) in % and its ingredients, the per-step errors
    e_t (B, T) on the student's and on the teacher's samples with their masks, and the two rollouts."""

    curve: torch.Tensor
    kl_student_prefixes: torch.Tensor
    mask_student: torch.Tensor
    kl_teacher_prefixes: torch.Tensor
    mask_teacher: torch.Tensor
    student_rollout: Rollout
    teacher_rollout: Rollout


def _pad_response(rollout: Rollout, length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = length - rollout.response_ids.shape[1]
    return F.pad(rollout.response_ids, (0, extra), value=pad_id), F.pad(rollout.response_mask, (0, extra))


@torch.no_grad()
def measure_exposure_bias(student: PreTrainedModel, teacher: PreTrainedModel, prompt_ids: torch.Tensor,
                          prompt_mask: torch.Tensor, max_new_tokens: int, eos_id: int | None = 1, pad_id: int = 0,
                          generator: torch.Generator | None = None, student_rollout: Rollout | None = None,
                          alive_mean: bool = True) -> ExposureBias:
    """ExAccErr(l), l = 1..``max_new_tokens``, of ``student`` against ``teacher`` on left-padded prompts (paper §3.3).

    Prefixes: one response per prompt from the student (``sample_mixed`` α = 0) and one from the teacher (α = 1),
    temperature 1, no top-k/top-p (as the reference script); ``student_rollout`` reuses a student sample drawn that
    way. Both models then score both sets of prefixes with one forward each (the two sets stacked along the batch)
    → e_t = KL(p ‖ q) at every sampled position (:func:`per_step_forward_kl`) → :func:`excess_accumulated_error`
    (``alive_mean``: its convention for ended sequences). Both models should be in eval mode.
    """
    if student_rollout is None:
        student_rollout = sample_mixed(student, None, prompt_ids, prompt_mask, max_new_tokens, 0.0, eos_id, pad_id,
                                       1.0, generator)
    teacher_rollout = sample_mixed(student, teacher, prompt_ids, prompt_mask, max_new_tokens, 1.0, eos_id, pad_id,
                                   1.0, generator)
    length = max(max_new_tokens, student_rollout.response_ids.shape[1])
    (ids_s, mask_s), (ids_t, mask_t) = (_pad_response(r, length, pad_id) for r in (student_rollout, teacher_rollout))
    both = Rollout(torch.cat([student_rollout.prompt_ids, teacher_rollout.prompt_ids]),
                   torch.cat([student_rollout.prompt_mask, teacher_rollout.prompt_mask]),
                   torch.cat([ids_s, ids_t]), torch.cat([mask_s, mask_t]), *(None,) * 3)
    kl = per_step_forward_kl(response_logits(teacher, both), response_logits(student, both), both.response_mask)
    b = ids_s.shape[0]
    kl_s, kl_t = kl[:b], kl[b:]
    return ExposureBias(excess_accumulated_error(kl_s, mask_s, kl_t, mask_t, alive_mean), kl_s, mask_s, kl_t, mask_t,
                        student_rollout, teacher_rollout)


class GenerationEval(L.Callback):
    """Log ``val/valid_rate`` (every validation batch whose examples carry a checkable ``task``) and
    ``val/ex_acc_err`` = ExAccErr(l) in % at l = ``exposure_bias_length`` (default: the module's eval length; with a
    teacher, on the first ``exposure_bias_batches`` validation batches: one extra teacher sample and one forward of
    each model per batch; the student's sample is the one the module decoded when it was drawn at temperature 1).

    Args:
        exposure_bias: measure ExAccErr (needs ``pl_module.teacher``).
        exposure_bias_batches: how many validation batches (from the first) feed the ExAccErr curve.
        exposure_bias_length: l of the logged ExAccErr(l); default the longest sampled length.
        seed: seed of the exposure-bias samples (+ batch index).
    """

    def __init__(self, exposure_bias: bool = True, exposure_bias_batches: int = 1,
                 exposure_bias_length: int | None = None, seed: int = 0):
        if exposure_bias_batches < 1 or (exposure_bias_length is not None and exposure_bias_length < 1):
            raise ValueError(f"exposure_bias_batches ({exposure_bias_batches}) and exposure_bias_length "
                             f"({exposure_bias_length}) must be >= 1")
        self.exposure_bias, self.batches, self.length, self.seed = (exposure_bias, exposure_bias_batches,
                                                                    exposure_bias_length, seed)
        self.valid = torchmetrics.MeanMetric()
        self._parts: list[ExposureBias] = []
        self._at = 1  # the l of the logged ExAccErr(l)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.valid = self.valid.to(pl_module.device)
        self.valid.reset()
        self._parts = []

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch: dict,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not isinstance(outputs, dict) or "texts" not in outputs:
            return
        valid = [float(check_answer(ex, text)) for ex, text in zip(batch["examples"], outputs["texts"])
                 if "task" in ex and "params" in ex]
        if valid:
            self.valid.update(torch.tensor(valid, device=pl_module.device))
        teacher = getattr(pl_module, "teacher", None)
        if self.exposure_bias and teacher is not None and batch_idx < self.batches:
            rollout: Rollout = outputs["rollout"]
            tok = pl_module.tokenizer
            gen = torch.Generator(device=pl_module.device).manual_seed(self.seed + batch_idx)
            self._at = self.length or outputs["max_new_tokens"]
            reuse = rollout if outputs["temperature"] == 1.0 and self._at <= outputs["max_new_tokens"] else None
            self._parts.append(measure_exposure_bias(pl_module.model, teacher, batch["prompt_input_ids"],
                                                     batch["prompt_attention_mask"], self._at, tok.eos_token_id,
                                                     tok.pad_token_id, gen, reuse))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.valid.update_count:
            pl_module.log("val/valid_rate", self.valid.compute(), prog_bar=True)  # compute() syncs across ranks
        if self._parts:
            fields = ("kl_student_prefixes", "mask_student", "kl_teacher_prefixes", "mask_teacher")
            length = max(max(p.kl_student_prefixes.shape[1], p.kl_teacher_prefixes.shape[1]) for p in self._parts)
            pooled = [torch.cat([F.pad(getattr(p, f), (0, length - getattr(p, f).shape[1])) for p in self._parts])
                      for f in fields]
            pl_module.log("val/ex_acc_err", excess_accumulated_error(*pooled)[self._at - 1], sync_dist=True)
