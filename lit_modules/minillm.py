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

Validation also measures exposure bias (paper §3.3, App. B.5, LMOps ``evaluate_exposure_bias.py``): ExAccErr, how
much more per-step error KL(p ‖ q) the student accumulates on its own samples than on the teacher's
(:func:`per_step_forward_kl`, :func:`excess_accumulated_error`, :func:`measure_exposure_bias`).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from transformers import PreTrainedModel

from datamodules.instruction_tasks import check_answer
from lit_modules.base import PaperModule
from lit_modules.builtin_checkpoints import ensure_built_in
from lit_modules.hf import (ModelSpec, check_same_vocabulary, load_causal_lm, load_tokenizer,
                             save_pretrained_with_tokenizer)

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
    """(x − mean)/std over the unmasked entries (LMOps ``utils.whiten``)."""
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


# ---------------------------------------------------------------------------------------------- sampling
@dataclass
class Rollout:
    """Sampled responses for left-padded prompts. ``response_ids`` are padded with ``pad_id`` after EOS;
    ``response_mask`` is 1 on sampled tokens (EOS included). Log-probs are of the sampled tokens: student
    log q(y_t), teacher log p(y_t) (``None`` without a teacher) and mixture log p̃(y_t)."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    student_logprobs: torch.Tensor
    teacher_logprobs: torch.Tensor | None
    mix_logprobs: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor | None]:
        return dict(vars(self))

    def to(self, device: torch.device | str) -> Rollout:
        return Rollout(**{k: None if v is None else v.to(device) for k, v in vars(self).items()})


def _cache_arg(model: PreTrainedModel | None) -> str:
    """The KV-cache keyword of ``model.forward``: ``cache`` (transformers ≥ 5.2x) or ``past_key_values``."""
    return "cache" if model is not None and "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"


def sample_categorical(log_probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row from softmax(``log_probs``) (B, V) by inverting the CDF: i = min{i : F_i > u·F_V},
    F = cumsum(exp(log_probs)), u ~ U[0, 1). P(i) = (F_i − F_{i−1}) / F_V exactly (up to float rounding), so a
    zero-probability token is never drawn; ~7× faster than ``torch.multinomial`` on CPU at (16, 259)."""
    cdf = log_probs.exp().cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


class _LazyLM:
    """One causal LM decoding left-padded prompts with its KV cache, *lazily*: :meth:`dist_for` reads only the
    tokens it has not seen yet (one chunked forward, all attended, also after EOS) and returns the
    log-distribution of token t; every token is scored (log-prob under this model) exactly once on the way."""

    def __init__(self, model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                 temperature: float, max_new_tokens: int):
        self.model, self.cache_arg, self.cache = model, _cache_arg(model), None
        self.temperature = temperature if temperature > 0 else 1.0
        self.prompt_ids = prompt_ids
        # the attention mask of prompt + every response token (all attended), handed out as growing views
        self.mask = torch.cat([prompt_mask.long(), prompt_mask.new_ones(prompt_mask.shape[0], max_new_tokens,
                                                                        dtype=torch.long)], 1)
        self.prompt_positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
        self.next: torch.Tensor | None = None  # log-dist of token index `seen`
        self.seen = 0  # response tokens read so far
        self.scores: list[torch.Tensor] = []  # log-prob of response tokens 0, 1, ... under this model

    def _forward(self, ids: torch.Tensor, n_new: int, keep: int) -> torch.Tensor:
        """Read ``ids`` (the prompt and/or response tokens ``seen`` … ``seen + n_new − 1``) into the cache; log-dists
        of the last ``keep`` positions."""
        response_positions = self.prompt_positions[:, -1:] + torch.arange(self.seen + 1, self.seen + n_new + 1,
                                                                          device=ids.device)
        if self.cache is None:
            positions = torch.cat([self.prompt_positions, response_positions], 1)
        else:
            positions = response_positions
        out = self.model(input_ids=ids, attention_mask=self.mask[:, :self.prompt_ids.shape[1] + self.seen + n_new],
                         position_ids=positions, use_cache=True, logits_to_keep=keep, **{self.cache_arg: self.cache})
        self.cache = getattr(out, self.cache_arg)
        logits = out.logits[:, -keep:].float()
        return torch.log_softmax(logits if self.temperature == 1.0 else logits / self.temperature, -1)

    def dist_for(self, t: int, tokens: list[torch.Tensor]) -> torch.Tensor:
        """log-dist of token t given the prompt and ``tokens[:t]``."""
        if self.next is not None and t == self.seen:
            return self.next
        chunk = torch.stack(tokens[self.seen:t], 1) if t > self.seen else self.prompt_ids[:, :0]
        k = chunk.shape[1]
        if self.next is None:  # first call: prompt and chunk in one forward
            dists = self._forward(torch.cat([self.prompt_ids, chunk], 1), k, k + 1)
        else:
            dists = torch.cat([self.next[:, None], self._forward(chunk, k, k)], 1)
        for i in range(k):  # dists[:, i] is the distribution of token seen + i
            if self.seen + i == len(self.scores):
                self.scores.append(dists[:, i].gather(-1, chunk[:, i, None]).squeeze(-1))
        self.next, self.seen = dists[:, -1], t
        return self.next

    def score(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        """(B, T) log-probs of all ``tokens`` under this model."""
        last = len(tokens) - 1
        dist = self.dist_for(last, tokens)
        if len(self.scores) == last:
            self.scores.append(dist.gather(-1, tokens[last][:, None]).squeeze(-1))
        return torch.stack(self.scores, 1)


@torch.inference_mode()
def _sample_mixed(student: PreTrainedModel | None, teacher: PreTrainedModel | None, prompt_ids: torch.Tensor,
                 prompt_mask: torch.Tensor, max_new_tokens: int, alpha: float = 0.0, eos_id: int | None = 1,
                 pad_id: int = 0, temperature: float = 1.0, generator: torch.Generator | None = None) -> Rollout:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"teacher-mix alpha must be in [0, 1], got {alpha}")
    if alpha > 0 and teacher is None:
        raise ValueError("teacher-mixed sampling (alpha > 0) needs a teacher")
    if temperature <= 0 and 0 < alpha < 1:
        raise ValueError("greedy decoding (temperature 0) of a teacher-student mixture is not defined; "
                         "use alpha 0 or 1")
    device = prompt_ids.device
    stu = _LazyLM(student, prompt_ids, prompt_mask, temperature, max_new_tokens) if alpha < 1 else None
    tea = _LazyLM(teacher, prompt_ids, prompt_mask, temperature, max_new_tokens) if teacher is not None else None
    coins = (torch.rand(max_new_tokens, generator=generator, device=generator.device if generator else device)
             < alpha).tolist()
    done = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=device)
    tokens, masks = [], []
    for t in range(max_new_tokens):
        logits = (tea if stu is None or coins[t] else stu).dist_for(t, tokens)
        if temperature > 0:
            nxt = sample_categorical(logits, generator)
        else:
            nxt = logits.argmax(-1)
        tokens.append(torch.where(done, torch.full_like(nxt, pad_id), nxt))
        masks.append(~done)
        if eos_id is not None:
            done = done | (tokens[-1] == eos_id)
        if bool(done.all()):
            break
    logp = tea.score(tokens) if tea is not None else None
    logq = stu.score(tokens) if stu is not None else logp
    if stu is None or alpha == 0:
        logmix = logq
    else:
        logmix = torch.logaddexp(logp + math.log(alpha), logq + math.log1p(-alpha))
    return Rollout(prompt_ids, prompt_mask, torch.stack(tokens, 1), torch.stack(masks, 1).long(), logq, logp,
                   logmix)


def sample_mixed(student: PreTrainedModel | None, teacher: PreTrainedModel | None, prompt_ids: torch.Tensor,
                 prompt_mask: torch.Tensor, max_new_tokens: int, alpha: float = 0.0, eos_id: int | None = 1,
                 pad_id: int = 0, temperature: float = 1.0, generator: torch.Generator | None = None) -> Rollout:
    """Sample y_t ~ p̃ = α·p + (1−α)·q (softmax of logits/temperature), batched with KV caches; a sequence
    that emitted ``eos_id`` gets ``pad_id`` (mask 0) afterwards and the loop stops when all are done.

    The mixture is drawn as: at each step a coin c_t ~ Bernoulli(α), independent of everything before;
    y_t ~ p(·|y_<t) if c_t else q(·|y_<t). Marginalising c_t gives exactly y_t | y_<t ~ α·p + (1−α)·q for
    every sequence. The coin is shared by the batch (sequences stay independent given the coins, each with
    the exact mixture law), so at each step only the model that draws has to run: it reads the tokens it has
    not seen in one chunked forward. At the end both models read what they missed, which scores every token
    (log q, log p and log p̃ for the rewards and the importance weights): the same FLOPs as sampling from one
    model plus one forward of the other. ``alpha=0``: student only; ``alpha=1``: teacher only (SeqKD).
    ``temperature=0`` is greedy (for α ∈ {0, 1} only).

    Runs under ``torch.inference_mode`` (less per-call overhead); the outputs are cloned into normal tensors.
    """
    out = _sample_mixed(student, teacher, prompt_ids, prompt_mask, max_new_tokens, alpha, eos_id, pad_id,
                        temperature, generator)
    return Rollout(*(None if x is None else x.clone() for x in vars(out).values()))


def response_logits(model: PreTrainedModel, rollout: Rollout) -> torch.Tensor:
    """Logits (B, T, V) that predict each response token, from one forward over prompt + response."""
    ids = torch.cat([rollout.prompt_ids, rollout.response_ids], dim=1)
    mask = torch.cat([rollout.prompt_mask.long(), rollout.response_mask.long()], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    p, t = rollout.prompt_ids.shape[1], rollout.response_ids.shape[1]
    return logits[:, p - 1: p + t - 1]


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


# ----------------------------------------------------------------------------------------------- module
class MiniLLM(PaperModule):
    """Distil ``teacher`` into ``student`` with MiniLLM or one of its baselines (see the module docstring).

    Args:
        student: hub name, ``save_pretrained`` directory or config dict (tiny random model) of the student.
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
        eval_exposure_bias: with a teacher, log ``val/ex_acc_err`` = ExAccErr (%) at the eval length (paper §3.3,
            :func:`measure_exposure_bias`), on the FIRST validation batch only (one extra teacher sample and one
            forward of each model; the student sample is the Rouge-L one when ``eval_temperature`` is 1).
        export_dir: ``save_pretrained`` the student (and tokenizer) there when training ends.
        lr, weight_decay, betas, warmup_steps, lr_decay, min_lr_ratio: see :class:`PaperModule`.
    """

    def __init__(self, student: ModelSpec | None = None, teacher: ModelSpec | None = DEFAULT_TEACHER,
                 tokenizer: str | None = None, objective: str = "minillm", teacher_dtype: str | None = None,
                 init_seed: int = 0, teacher_mix_alpha: float = 0.2, single_step: bool = True,
                 length_norm: bool = True, ppo_epochs: int = 4, clip_eps: float = 0.2, gamma: float = 1.0,
                 reward_scaling: float = 0.5, reward_clip: float | None = None, whiten_advantages: bool = True,
                 lm_coef: float = 1.0, kd_ratio: float = 0.5, pt_source: str = "pretrain", gkd_beta: float = 1.0, max_new_tokens: int = 32,
                 temperature: float = 1.0, eval_max_new_tokens: int | None = None, eval_temperature: float = 1.0,
                 eval_seed: int = 0, eval_exposure_bias: bool = True, export_dir: str | None = None,
                 lr: float = 5e-4, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95),
                 warmup_steps: int = 0, lr_decay: str = "cosine", min_lr_ratio: float = 0.1):
        super().__init__(lr=lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps,
                         lr_decay=lr_decay, min_lr_ratio=min_lr_ratio)
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
        self.model: PreTrainedModel = _clear_load_error(
            *student_how, lambda: load_causal_lm(student, vocab_size=len(self.tokenizer), seed=init_seed))
        self.teacher: PreTrainedModel | None = None
        if objective != "sft":
            self.teacher = _clear_load_error(*teacher_how, lambda: load_causal_lm(
                teacher, vocab_size=len(self.tokenizer), dtype=teacher_dtype, seed=init_seed + 1))
            check_same_vocabulary(self.model, self.teacher)
            self.teacher.requires_grad_(False).eval()
        self.export_dir = export_dir
        self.val_loss = torchmetrics.MeanMetric()
        self.val_rouge = torchmetrics.text.ROUGEScore(rouge_keys="rougeL", accumulate="best")
        self.val_valid = torchmetrics.MeanMetric()
        self.val_length = torchmetrics.MeanMetric()
        self.history: dict[str, list[float]] = {"step": [], "reward": [], "reverse_kl": []}
        self._rollout: Rollout | None = None  # the rollout batch being reused for PPO's inner epochs
        self._teacher_logits: torch.Tensor | None = None
        self._rollout_uses = 0

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
        try:
            return sample_mixed(self.model, self.teacher if alpha > 0 else None, batch["prompt_input_ids"],
                                batch["prompt_attention_mask"],
                                max_new_tokens or self.hparams.max_new_tokens, alpha, self.tokenizer.eos_token_id,
                                self.pad_id, self.hparams.temperature if temperature is None else temperature,
                                generator)
        finally:
            self.model.train(was_training)

    def exposure_bias(self, batch: dict, generator: torch.Generator | None = None,
                      student_rollout: Rollout | None = None) -> ExposureBias:
        """ExAccErr of the student against the teacher on ``batch``'s prompts at the eval length
        (:func:`measure_exposure_bias`)."""
        hp = self.hparams
        return measure_exposure_bias(self.model, self.teacher, batch["prompt_input_ids"],
                                     batch["prompt_attention_mask"], hp.eval_max_new_tokens or hp.max_new_tokens,
                                     self.tokenizer.eos_token_id, self.pad_id, generator, student_rollout)

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
        if "reward" in stats:
            self.history["step"].append(self.global_step)
            self.history["reward"].append(float(stats["reward"]))
            self.history["reverse_kl"].append(float(stats["reverse_kl"]))
        return loss

    # -- evaluation: Rouge-L (best over references), valid-answer rate, response length
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        hp = self.hparams
        n = batch["input_ids"].shape[0]
        self.val_loss.update(self._lm_loss(batch["input_ids"], batch["labels"], batch["attention_mask"], 0.0),
                             weight=n)
        gen = torch.Generator(device=self.device).manual_seed(hp.eval_seed + batch_idx)
        rollout = self.rollout(batch, 0.0, hp.eval_max_new_tokens or hp.max_new_tokens, hp.eval_temperature, gen)
        texts = self.tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)
        examples = batch["examples"]
        self.val_rouge.update(texts, [ex["references"] or [""] for ex in examples])
        valid = [float(check_answer(ex, t)) for ex, t in zip(examples, texts) if "task" in ex and "params" in ex]
        if valid:
            self.val_valid.update(torch.tensor(valid, device=self.device))
        self.val_length.update(rollout.response_mask.sum(-1).float())
        if batch_idx == 0 and hp.eval_exposure_bias and self.teacher is not None:
            reuse = rollout if hp.eval_temperature == 1.0 else None  # a temperature-1 student sample already
            curve = self.exposure_bias(batch, gen, reuse).curve
            self.log("val/ex_acc_err", curve[-1], batch_size=n, sync_dist=True)
        self.log("val/loss", self.val_loss, on_epoch=True, batch_size=n)
        self.log("val/response_length", self.val_length, on_epoch=True, batch_size=n)
        if valid:
            self.log("val/valid_rate", self.val_valid, prog_bar=True, on_epoch=True, batch_size=n)

    def on_validation_epoch_end(self) -> None:
        self.log("val/rougeL", self.val_rouge.compute()["rougeL_fmeasure"], prog_bar=True, sync_dist=True)
        self.val_rouge.reset()

    def on_train_end(self) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        if self.history["step"] and isinstance(self.logger, TensorBoardLogger) and self.trainer.is_global_zero:
            import matplotlib.pyplot as plt

            fig, axes = plt.subplots(1, 2, figsize=(8, 3))
            for ax, key in zip(axes, ("reward", "reverse_kl")):
                ax.plot(self.history["step"], self.history[key])
                ax.set_xlabel("optimizer step")
                ax.set_title(key)
            fig.tight_layout()
            self.logger.experiment.add_figure("train/reward_and_kl", fig, global_step=self.global_step)
            plt.close(fig)
        if self.export_dir and self.trainer.is_global_zero:
            save_pretrained_with_tokenizer(self.model, self.tokenizer, self.export_dir)


def _clear_load_error(role: str, spec: ModelSpec, config: str, load):
    """Run ``load()``, after training ``spec`` if it is a missing built-in checkpoint
    (:func:`~lit_modules.builtin_checkpoints.ensure_built_in`); a model/tokenizer path that cannot be loaded
    becomes an error saying how to make it."""
    ensure_built_in(spec)
    try:
        return load()
    except (OSError, ValueError) as e:
        if isinstance(spec, str):
            raise FileNotFoundError(f"{role} model {spec!r} could not be loaded ({type(e).__name__}: {e}). If it is "
                                    f"the default local checkpoint, make it first: litpapers fit --config "
                                    f"configs/minillm/{config}") from e
        raise
