"""MiniLLM: knowledge distillation of a causal LM by minimising the *reverse* KL, KL[q_θ ‖ p], on student
samples (Gu et al., ICLR 2024, arXiv 2306.08543; reference code microsoft/LMOps ``minillm/``), with its
baselines as ``objective`` values of the same module:

===========  ==============================================================================================
``sft``      cross-entropy on the data's responses (no teacher)
``kd``       word-level KD: (1−kd_ratio)·CE + kd_ratio·Σ_t KL(p ‖ q_θ) on the data's responses
``seqkd``    SeqKD: cross-entropy on responses *sampled from the teacher*
``gkd``      TRL GKD style: generalized JSD_β(p, q_θ) per token on responses *sampled from the student*
             (β=1: reverse KL(q_θ ‖ p), β=0: forward KL(p ‖ q_θ))
``minillm``  the policy-gradient estimator below (+ the PT loss)
===========  ==============================================================================================

MiniLLM (paper §2.2, LMOps ``minillm/losses.py``, ``sampler.py``). With per-token reward
r_t = log p(y_t|y_<t,x) − log q_θ(y_t|y_<t,x) and R_t = Σ_{t'≥t} r_t',

    ∇KL[q_θ‖p] = −E_{y~q_θ} Σ_t (R_t − 1) ∇log q_θ(y_t|y_<t,x)
               = E_{y~q_θ} Σ_t [ ∇KL(q_θ(·|y_<t) ‖ p(·|y_<t))          ← single-step term, exact over the vocab
                                 − R_{t+1} ∇log q_θ(y_t|y_<t) ]          ← long-term term

- length normalisation: R_{t+1} → R_{t+1}/(number of tokens summed);
- teacher-mixed sampling: y_t ~ p̃ = α·p + (1−α)·q_θ with per-token weight w_t = q_θ(y_t)/p̃(y_t);
- PPO-style clipped surrogate, ratio ρ_t = w_t·q_θ(y_t)/q_θold(y_t), clip ε, ``ppo_epochs`` steps per rollout;
- L = L_long + L_single + lm_coef·L_PT, L_PT = (1−kd_ratio)·LM + kd_ratio·forward KL (LMOps ``losses.pt_loss``,
  ``trainer.train``: ``loss = rl_loss + lm_coef * pt_loss``, kd_ratio 0.5) on a batch of the *pretraining* stream
  (the datamodule's ``pt_input_ids``: ``InstructionDataModule(pretrain=True)``, the built-in corpus, or
  ``pretrain_path``), as the paper's OpenWebText term. ``pt_source="sft"`` computes it on the batch's SFT
  responses instead (then L_PT is exactly the ``kd`` objective, which confounds MiniLLM vs KD); with neither a
  pretraining stream nor that option a MiniLLM step with ``lm_coef > 0`` is an error.
- Temperature τ: as in LMOps (``trainer.compute_logits_and_log_probs`` and ``losses.ppo_loss`` divide the logits by
  τ) every distribution of the method is the tempered one, softmax(logits/τ): the sampler, log q_θold and
  log p̃ stored with the rollout, the rewards' log p and log q, the PPO ratio and the single-step KL. So at
  θ = θold the ratio is exactly 1. (LMOps' ``reward.reward_fn`` scores the teacher's log p untempered; we temper
  it too, so r_t is the log-ratio of the two distributions the estimator's KL is about.) ``gkd`` tempers both
  models as TRL's ``generalized_jsd_loss(..., temperature)``; SeqKD's cross-entropy is on raw logits.

As in the reference code the rewards are divided by ``reward_scaling`` (0.5), discounted by ``gamma`` and
whitened over the batch; with ``single_step=False`` the long-term term uses R_t (r_t included) so the
estimator stays unbiased. Every training step is one optimizer step (automatic optimization: gradient clipping,
accumulation and DDP come from the Trainer); a rollout is reused for ``ppo_epochs`` consecutive steps.

Rollouts are drawn by :func:`lm.sampling.sample_mixed`. Validation logs the SFT loss, Rouge-L and the
response length, and returns its decoded samples for :class:`callbacks.GenerationEval` (valid-answer rate and
exposure bias, paper §3.3).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from transformers import PreTrainedModel

from lit_modules.base import DeferredNetworksModule, LRSchedulerCallable, OptimizerCallable
from lit_modules.builtin_checkpoints import require_built_in
from lm.hf import ModelSpec, check_same_vocabulary, keep_layers, load_causal_lm
from lm.sampling import Rollout, response_logits, sample_mixed
from lm.sharding import build_causal_lm, export_pretrained, is_model_parallel, truncate_at_eos
from lm.tokenizers import load_tokenizer

OBJECTIVES = ("sft", "kd", "seqkd", "gkd", "minillm")
PT_SOURCES = ("pretrain", "sft")
ROLLOUT_KEY = "minillm_rollout"  # checkpoint entry of the rollout being reused (resume mid inner epochs)
DEFAULT_TEACHER = "checkpoints/minillm_teacher"


# ----------------------------------------------------------------------------------------------- the math
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ x·m / max(Σ m, 1)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens]: (B, T, V), (B, T) → (B, T), in fp32."""
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def kl_per_token(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """KL(a ‖ b) = Σ_v a_v (log a_v − log b_v) at every position, exactly over the vocabulary (fp32)."""
    log_a, log_b = torch.log_softmax(logits_a.float(), -1), torch.log_softmax(logits_b.float(), -1)
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def entropy_per_token(logits: torch.Tensor) -> torch.Tensor:
    """H(q) = −Σ_v q_v log q_v at every position."""
    logq = torch.log_softmax(logits.float(), -1)
    return -(logq.exp() * logq).sum(-1)


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token generalized JSD of GKD (Agarwal et al. 2024; TRL ``GKDTrainer.generalized_jsd_loss``):
    with M = β·p + (1−β)·q,  JSD_β = β·KL(p ‖ M) + (1−β)·KL(q ‖ M); TRL's endpoints: β=0 → KL(p ‖ q)
    (forward), β=1 → KL(q ‖ p) (reverse)."""
    if beta == 0.0:
        return kl_per_token(teacher_logits, student_logits)
    if beta == 1.0:
        return kl_per_token(student_logits, teacher_logits)
    logq, logp = torch.log_softmax(student_logits.float(), -1), torch.log_softmax(teacher_logits.float(), -1)
    logm = torch.logsumexp(torch.stack([logp + math.log(beta), logq + math.log(1 - beta)]), 0)
    kl_pm = (logp.exp() * (logp - logm)).sum(-1)
    kl_qm = (logq.exp() * (logq - logm)).sum(-1)
    return beta * kl_pm + (1 - beta) * kl_qm


def future_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, include_current: bool = False,
                   length_norm: bool = True) -> torch.Tensor:
    """Per position t: R = Σ_{t'>t} γ^{t'−t−1} r_t' (``include_current``: Σ_{t'≥t} γ^{t'−t} r_t'), over the
    unmasked tokens; with ``length_norm`` divided by the number of tokens summed (≥ 1), the paper's
    R^norm_{t+1} = R_{t+1}/(T−t−1). Masked positions get 0."""
    rewards = rewards.float() * mask
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        if include_current:
            running = rewards[:, t] + gamma * running
            out[:, t] = running
        else:
            out[:, t] = running
            running = rewards[:, t] + gamma * running
    if length_norm:
        m = mask.float()
        remaining = m.flip(-1).cumsum(-1).flip(-1)  # tokens from t to the end, t included
        count = remaining if include_current else remaining - m
        out = out / count.clamp(min=1)
    return out * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean)/std over the unmasked entries, std the population one: x̂ = (x − μ)/sqrt(σ² + eps), masked → 0.
    LMOps ``utils.whiten`` (called in ``losses._get_advantages_and_returns``) takes μ and σ over every entry of the
    padded (B, T) tensor; here padding after EOS is left out of both."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def ppo_clipped_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                     weights: torch.Tensor, mask: torch.Tensor, clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO surrogate with importance weights (LMOps ``losses._pg_loss``): ρ = w·exp(log q_θ − log q_old),
    L = mean_t max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)). Returns (loss, fraction of tokens where the clip is active)."""
    ratio = weights * torch.exp(logprobs - old_logprobs)
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clip_frac


def minillm_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tokens: torch.Tensor,
                 mask: torch.Tensor, old_logprobs: torch.Tensor, mix_logprobs: torch.Tensor | None = None, *,
                 single_step: bool = True, length_norm: bool = True, gamma: float = 1.0,
                 reward_scaling: float = 1.0, reward_clip: float | None = None, whiten_advantages: bool = False,
                 clip_eps: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The MiniLLM estimator on one rollout batch (response positions only, shapes (B, T[, V])).

    ``old_logprobs`` = log q_θold(y_t) at sampling time; ``mix_logprobs`` = log p̃(y_t) (``None``: sampled
    from the student, w = 1). Rewards r_t = (log p(y_t) − log q_θold(y_t))/reward_scaling (clipped to
    ±reward_clip). Returns (loss, stats); the loss's gradient at θ = θold with the defaults (γ 1, no length
    norm, no whitening, no mixing) is, in expectation over y ~ q_θ, ∇KL[q_θ‖p] times 1/(tokens per batch).
    """
    mask = mask.float()
    logq = gather_logprobs(student_logits, tokens)
    with torch.no_grad():
        logp = gather_logprobs(teacher_logits, tokens)
        rewards = (logp - old_logprobs) / reward_scaling
        if reward_clip is not None:
            rewards = rewards.clamp(-reward_clip, reward_clip)
        adv = future_returns(rewards, mask, gamma, include_current=not single_step, length_norm=length_norm)
        if whiten_advantages:
            adv = whiten(adv, mask)
        weights = torch.ones_like(logq) if mix_logprobs is None else torch.exp(old_logprobs - mix_logprobs)
    pg_loss, clip_frac = ppo_clipped_loss(logq, old_logprobs, adv, weights, mask, clip_eps)
    single = masked_mean(kl_per_token(student_logits, teacher_logits), mask)
    loss = pg_loss + single if single_step else pg_loss
    with torch.no_grad():
        stats = {"pg_loss": pg_loss.detach(), "single_step": single.detach(), "clip_frac": clip_frac,
                 "reward": masked_mean(logp - old_logprobs, mask),
                 "reverse_kl": ((old_logprobs - logp) * mask).sum(-1).mean(),
                 "entropy": masked_mean(entropy_per_token(student_logits), mask),
                 "importance_weight": masked_mean(weights, mask),
                 "max_abs_log_ratio": ((logq - old_logprobs).abs() * mask).max()}
    return loss, stats


# ----------------------------------------------------------------------------------------------- module
class MiniLLM(DeferredNetworksModule):
    """Distil ``teacher`` into ``student`` with MiniLLM or one of its baselines (see the module docstring).

    Args:
        student: hub name, ``save_pretrained`` directory or config dict (tiny random model) of the student.
        student_layers: keep only these decoder layers of ``student`` (e.g. every third layer of the teacher's
            checkpoint: ``student`` = the teacher, ``[0, 3, ..., 27]``): the usual distillation initialisation of a
            smaller student sharing the teacher's tokenizer (:func:`lm.hf.keep_layers`). ``None``: all.
        teacher: the same for the frozen teacher; default ``checkpoints/minillm_teacher``, written by
            ``configs/minillm/teacher_sft.yaml``. Not needed for ``objective: sft``.
        tokenizer: tokenizer name/path; default: the student's (or teacher's) directory, else byte-level.
        objective: one of ``sft``, ``kd``, ``seqkd``, ``gkd``, ``minillm``.
        teacher_dtype: e.g. ``bf16`` to hold the teacher in half precision.
        teacher_mix_alpha: α of teacher-mixed sampling (0 = pure student sampling).
        single_step: use the exact single-step term (else the long-term term includes r_t).
        length_norm: normalise the long-term return by the number of future tokens.
        ppo_epochs: optimizer steps per rollout batch; clip_eps: PPO clip ε.
        gamma, reward_scaling, reward_clip, whiten_advantages: reward shaping of the reference code.
        lm_coef: weight of the PT loss (MiniLLM); kd_ratio: KD share in the PT loss and in ``kd``.
        pt_source: the batches L_PT reads: ``"pretrain"`` (default; the datamodule's pretraining stream
            ``pt_input_ids``, an error when it has none) or ``"sft"`` (the batch's SFT responses: L_PT = the KD
            objective; an explicit opt-in, not the paper's setting).
        gkd_beta: β of the generalized JSD (``gkd``; 1 = reverse KL).
        max_new_tokens, temperature: rollout length cap and sampling temperature.
        eval_max_new_tokens, eval_temperature, eval_seed: validation sampling (temperature 0 = greedy).
        export_dir: ``save_pretrained`` the student (and tokenizer) there when training ends.
        lr, weight_decay, betas, warmup_steps, lr_decay, min_lr_ratio, optimizer, lr_scheduler: see
            :class:`PaperModule`.

    Student (``self.model``) and teacher are declared on the meta device at construction (so the layer list and the
    shared vocabulary are checked before any weight is read) and materialised by ``configure_model``
    (:class:`~lit_modules.base.DeferredNetworksModule`; sharded under ``ModelParallelStrategy``; outside a trainer
    call ``module.configure_model()`` first).
    """

    trainable_networks = ("model",)
    frozen_networks = ("teacher",)

    def __init__(self, student: ModelSpec | None = None, teacher: ModelSpec | None = DEFAULT_TEACHER,
                 tokenizer: str | None = None, student_layers: list[int] | None = None, objective: str = "minillm",
                 teacher_dtype: str | None = None,
                 init_seed: int = 0, teacher_mix_alpha: float = 0.2, single_step: bool = True,
                 length_norm: bool = True, ppo_epochs: int = 4, clip_eps: float = 0.2, gamma: float = 1.0,
                 reward_scaling: float = 0.5, reward_clip: float | None = None, whiten_advantages: bool = True,
                 lm_coef: float = 1.0, kd_ratio: float = 0.5, pt_source: str = "pretrain", gkd_beta: float = 1.0, max_new_tokens: int = 32,
                 temperature: float = 1.0, eval_max_new_tokens: int | None = None, eval_temperature: float = 1.0,
                 eval_seed: int = 0, export_dir: str | None = None,
                 lr: float = 5e-4, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95),
                 warmup_steps: int = 0, lr_decay: str = "cosine", min_lr_ratio: float = 0.1,
                 optimizer: OptimizerCallable | None = None, lr_scheduler: LRSchedulerCallable | None = None):
        super().__init__(optimizer=optimizer, lr_scheduler=lr_scheduler, lr=lr, weight_decay=weight_decay,
                         betas=betas, warmup_steps=warmup_steps, lr_decay=lr_decay, min_lr_ratio=min_lr_ratio)
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r} is not one of {OBJECTIVES}")
        if not 0.0 <= teacher_mix_alpha < 1.0:
            raise ValueError(f"teacher_mix_alpha must be in [0, 1), got {teacher_mix_alpha}")
        if ppo_epochs < 1 or max_new_tokens < 1:
            raise ValueError(f"ppo_epochs ({ppo_epochs}) and max_new_tokens ({max_new_tokens}) must be >= 1")
        if not 0.0 <= gkd_beta <= 1.0 or not 0.0 <= kd_ratio <= 1.0:
            raise ValueError(f"gkd_beta ({gkd_beta}) and kd_ratio ({kd_ratio}) must be in [0, 1]")
        if pt_source not in PT_SOURCES:
            raise ValueError(f"pt_source={pt_source!r} is not one of {PT_SOURCES}")
        if temperature <= 0 or lm_coef < 0:
            raise ValueError(f"temperature ({temperature}) must be > 0 (training samples) and lm_coef ({lm_coef}) >= 0")
        self.save_hyperparameters()
        self.strict_loading = False  # checkpoints leave the frozen teacher out
        student = {} if student is None else student
        if objective != "sft" and teacher is None:
            raise ValueError(f"objective={objective!r} needs a teacher (model.teacher)")
        student_how, teacher_how = ("student", student, "sft.yaml"), ("teacher", teacher, "teacher_sft.yaml")
        owner = student_how if isinstance(student, str) else teacher_how if objective != "sft" else student_how
        self.tokenizer = _clear_load_error(*owner, lambda: load_tokenizer(tokenizer, owner[1]))
        self._specs = {"student": (student_how, init_seed, None),
                       "teacher": None if objective == "sft" else (teacher_how, init_seed + 1, teacher_dtype)}
        self.export_dir = export_dir
        self.val_loss = torchmetrics.MeanMetric()
        self.val_rouge = torchmetrics.text.ROUGEScore(rouge_keys="rougeL", accumulate="best")
        self.val_length = torchmetrics.MeanMetric()
        self._rollout: Rollout | None = None  # the rollout batch being reused for PPO's inner epochs
        self._teacher_logits: torch.Tensor | None = None
        self._rollout_uses = 0
        self.declare_networks()  # a clear error now, from the architectures alone (meta device: no weights)
        if self.teacher is not None:
            check_same_vocabulary(self.model, self.teacher)

    # -- bookkeeping: frozen teacher stays in eval mode, out of the optimizer and of the checkpoint
    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def trainable_parameters(self):
        return ((n, p) for n, p in self.named_parameters() if p.requires_grad and not n.startswith("teacher."))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave the teacher out; keep the rollout being reused and how many inner epochs it has served, so a
        resumed run continues PPO's inner epochs on the same samples (the teacher's logits on it are recomputed:
        the teacher is frozen). Under DDP the checkpoint holds rank 0's rollout, which every rank then resumes."""
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]
        if self._rollout is not None:
            checkpoint[ROLLOUT_KEY] = {"rollout": self._rollout.to("cpu").as_dict(), "uses": self._rollout_uses}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(ROLLOUT_KEY)
        self._rollout = None if saved is None else Rollout(**saved["rollout"])
        self._rollout_uses, self._teacher_logits = (0 if saved is None else saved["uses"]), None

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    # -- rollouts and losses
    def rollout(self, batch: dict, alpha: float, max_new_tokens: int | None = None, temperature: float | None = None,
                generator: torch.Generator | None = None) -> Rollout:
        was_training = self.model.training
        self.model.eval()
        # sharded (FSDP2): every forward is a collective, so every rank runs both models at every step (static
        # caches; no CUDA graph: FSDP's all-gathers cannot be captured) for max_new_tokens steps, and the rollout
        # is cut at EOS afterwards (sharding.truncate_at_eos)
        sharded, eos = is_model_parallel(self), self.tokenizer.eos_token_id
        try:
            out = sample_mixed(self.model, self.teacher if alpha > 0 else None, batch["prompt_input_ids"],
                               batch["prompt_attention_mask"], max_new_tokens or self.hparams.max_new_tokens, alpha,
                               None if sharded else eos, self.pad_id,
                               self.hparams.temperature if temperature is None else temperature, generator,
                               cache="static" if sharded else None, cuda_graphs=False if sharded else None)
            return truncate_at_eos(out, eos, self.pad_id) if sharded and eos is not None else out
        finally:
            self.model.train(was_training)

    def _lm_loss(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None,
                 kd_ratio: float) -> torch.Tensor:
        """(1−kd_ratio)·CE(labels) + kd_ratio·mean_t KL(p ‖ q_θ) over the labelled positions."""
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        target = labels[:, 1:]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)
        if kd_ratio > 0:
            with torch.no_grad():
                t_logits = self.teacher(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
            kd = masked_mean(kl_per_token(t_logits, logits), target != -100)
            loss = (1 - kd_ratio) * loss + kd_ratio * kd
        return loss

    def _pt_loss(self, batch: dict) -> torch.Tensor:
        """L_PT = (1−kd_ratio)·LM + kd_ratio·KL(p ‖ q_θ) on the stream ``pt_source`` names (module docstring)."""
        hp = self.hparams
        if hp.pt_source == "sft":
            return self._lm_loss(batch["input_ids"], batch["labels"], batch["attention_mask"], hp.kd_ratio)
        if "pt_input_ids" not in batch:
            raise ValueError("MiniLLM's PT loss (lm_coef > 0) reads a pretraining stream, but the batch has no "
                             "'pt_input_ids': set data.init_args.pretrain: true (built-in corpus) or "
                             "data.init_args.pretrain_path, or model.init_args.lm_coef: 0, or "
                             "model.init_args.pt_source: sft (L_PT on the SFT data, = the KD objective)")
        return self._lm_loss(batch["pt_input_ids"], batch["pt_input_ids"], None, hp.kd_ratio)

    def _rollout_loss(self, rollout: Rollout, teacher_logits: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The sampling objectives' loss on ``rollout``; ``teacher_logits`` are already divided by τ."""
        hp = self.hparams
        s_logits = response_logits(self.model, rollout)
        mask = rollout.response_mask
        if hp.objective == "seqkd":
            return masked_mean(-gather_logprobs(s_logits, rollout.response_ids), mask), {}
        s_logits = s_logits / hp.temperature  # the tempered student, as sampled (module docstring)
        if hp.objective == "gkd":
            loss = masked_mean(generalized_jsd(s_logits, teacher_logits, hp.gkd_beta), mask)
            return loss, {"entropy": masked_mean(entropy_per_token(s_logits.detach()), mask)}
        mix = rollout.mix_logprobs if hp.teacher_mix_alpha > 0 else None
        return minillm_loss(s_logits, teacher_logits, rollout.response_ids, mask, rollout.student_logprobs, mix,
                            single_step=hp.single_step, length_norm=hp.length_norm, gamma=hp.gamma,
                            reward_scaling=hp.reward_scaling, reward_clip=hp.reward_clip,
                            whiten_advantages=hp.whiten_advantages, clip_eps=hp.clip_eps)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """One optimizer step. Sampling objectives draw a rollout from this batch's prompts; MiniLLM reuses it
        for ``ppo_epochs`` consecutive steps (its PPO inner epochs), each with this step's batch for L_PT."""
        hp = self.hparams
        n = batch["input_ids"].shape[0]
        if hp.objective in ("sft", "kd"):
            kd_ratio = hp.kd_ratio if hp.objective == "kd" else 0.0
            loss = self._lm_loss(batch["input_ids"], batch["labels"], batch["attention_mask"], kd_ratio)
            self.log("train/loss", loss.detach(), prog_bar=True, batch_size=n)
            return loss
        reuse = hp.ppo_epochs if hp.objective == "minillm" else 1
        if self._rollout is None or self._rollout_uses >= reuse:
            alpha = {"seqkd": 1.0, "gkd": 0.0, "minillm": hp.teacher_mix_alpha}[hp.objective]
            self._rollout, self._teacher_logits, self._rollout_uses = self.rollout(batch, alpha), None, 0
        self._rollout = self._rollout.to(self.device)  # no-op unless restored from a checkpoint
        if self._teacher_logits is None and hp.objective != "seqkd":  # a new rollout, or one restored
            with torch.no_grad():
                self._teacher_logits = response_logits(self.teacher, self._rollout) / hp.temperature
        self._rollout_uses += 1
        loss, stats = self._rollout_loss(self._rollout, self._teacher_logits)
        stats["response_length"] = self._rollout.response_mask.sum(-1).float().mean()
        if hp.objective == "minillm" and hp.lm_coef > 0:
            stats["rl_loss"], stats["pt_loss"] = loss.detach(), self._pt_loss(batch)
            loss = loss + hp.lm_coef * stats["pt_loss"]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in stats.items()}, batch_size=n)
        return loss

    # -- evaluation: SFT loss, Rouge-L (best over references), response length; the samples for GenerationEval
    def validation_step(self, batch: dict, batch_idx: int) -> dict[str, Any]:
        """Returns ``{"texts", "rollout", "temperature", "max_new_tokens"}``: the decoded samples, for
        :class:`callbacks.GenerationEval` (valid-answer rate, exposure bias)."""
        hp = self.hparams
        n = batch["input_ids"].shape[0]
        self.val_loss.update(self._lm_loss(batch["input_ids"], batch["labels"], batch["attention_mask"], 0.0),
                             weight=n)
        gen = torch.Generator(device=self.device).manual_seed(hp.eval_seed + batch_idx)
        length = hp.eval_max_new_tokens or hp.max_new_tokens
        rollout = self.rollout(batch, 0.0, length, hp.eval_temperature, gen)
        texts = self.tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)
        self.val_rouge.update(texts, [ex["references"] or [""] for ex in batch["examples"]])
        self.val_length.update(rollout.response_mask.sum(-1).float())
        self.log("val/loss", self.val_loss, on_epoch=True, batch_size=n)
        self.log("val/response_length", self.val_length, on_epoch=True, batch_size=n)
        return {"texts": texts, "rollout": rollout, "temperature": hp.eval_temperature, "max_new_tokens": length}

    def on_validation_epoch_end(self) -> None:
        self.log("val/rougeL", self.val_rouge.compute()["rougeL_fmeasure"], prog_bar=True, sync_dist=True)
        self.val_rouge.reset()

    def _load(self, role: str) -> PreTrainedModel:
        """The student or the teacher as its spec says (whole; on the meta device inside ``torch.device("meta")``)."""
        how, seed, dtype = self._specs[role]
        model = _clear_load_error(*how, lambda: load_causal_lm(how[1], vocab_size=len(self.tokenizer), dtype=dtype,
                                                               seed=seed))
        layers = self.hparams.student_layers if role == "student" else None
        return model if layers is None else keep_layers(model, layers, "model.init_args.student_layers")

    def build_networks(self) -> None:
        self.model: PreTrainedModel = build_causal_lm(self, lambda: self._load("student"))
        self.teacher: PreTrainedModel | None = None
        if self._specs["teacher"] is not None:
            self.teacher = build_causal_lm(self, lambda: self._load("teacher"), frozen=True)

    def on_train_end(self) -> None:
        if self.export_dir:  # every rank: sharded weights are gathered collectively, rank 0 writes
            export_pretrained(self, self.model, self.tokenizer, self.export_dir)


def _clear_load_error(role: str, spec: ModelSpec, config: str, load):
    """Run ``load()``, after checking that ``spec`` is not a missing built-in checkpoint
    (:func:`~lit_modules.builtin_checkpoints.require_built_in`); a model/tokenizer path that cannot be loaded
    becomes an error saying how to make it."""
    require_built_in(spec)
    try:
        return load()
    except (OSError, ValueError) as e:
        if isinstance(spec, str):
            raise FileNotFoundError(f"{role} model {spec!r} could not be loaded ({type(e).__name__}: {e}). If it is "
                                    f"the default local checkpoint, make it first: litpapers fit --config "
                                    f"configs/minillm/{config}") from e
        raise
