"""One generation path for every module and evaluation that samples from causal LMs: batched, left-padded prompts,
a KV cache per model, per-sequence EOS, optional teacher-mixed sampling, and every sampled token scored.

- :func:`sample_mixed` — y_t ~ α·p + (1−α)·q (teacher p, student q; α = 0: the student alone, α = 1: the teacher
  alone), softmax(logits/temperature) or greedy (temperature 0), returning a :class:`Rollout` with the response
  tokens, their mask and their log-probs under each model and under the mixture;
- :func:`generate` — the one-model case: ``generate(model, prompt_ids, prompt_mask, max_new_tokens, temperature=1.0,
  eos_id=…, pad_id=…, generator=…)``;
- :func:`response_logits` — one teacher-forced forward over prompt + response (the logits predicting each response
  token), for losses and evaluations on a rollout.

MiniLLM's rollouts (teacher-mixed sampling, paper §2.2 / LMOps ``minillm/sampler.py``), SeqKD/GKD samples and the
exposure-bias evaluation (``callbacks.generation_eval``) all draw through :func:`sample_mixed`.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel


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


def generate(model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
             temperature: float = 1.0, eos_id: int | None = 1, pad_id: int = 0,
             generator: torch.Generator | None = None) -> Rollout:
    """Sample (``temperature`` > 0) or greedily decode (0) up to ``max_new_tokens`` from one ``model`` for left-padded
    prompts: :func:`sample_mixed` with α = 0 (``teacher_logprobs`` is ``None``)."""
    return sample_mixed(model, None, prompt_ids, prompt_mask, max_new_tokens, 0.0, eos_id, pad_id, temperature,
                        generator)
