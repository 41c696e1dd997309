"""One generation path for every module and evaluation that samples from causal LMs: batched, left-padded prompts,
a KV cache per model, per-sequence EOS, optional teacher-mixed sampling, and every sampled token scored.

- :func:`sample_mixed` — y_t ~ α·p + (1−α)·q (teacher p, student q; α = 0: the student alone, α = 1: the teacher
  alone), softmax(logits/temperature) or greedy (temperature 0), returning a :class:`Rollout` with the response
  tokens, their mask and their log-probs under each model and under the mixture;
- :func:`generate` — the one-model case: ``generate(model, prompt_ids, prompt_mask, max_new_tokens, temperature=1.0,
  eos_id=…, pad_id=…, generator=…)``;
- :func:`response_logits` — one teacher-forced forward over prompt + response (the logits predicting each response
  token), for losses and evaluations on a rollout;
- :func:`generate_answers` — text in, text out: a tokenizer's prompts answered by :func:`generate` in batches, each
  answer decoded up to its EOS.

MiniLLM's rollouts (teacher-mixed sampling, paper §2.2 / LMOps ``minillm/sampler.py``), SeqKD/GKD samples, the
exposure-bias evaluation (``callbacks.generation_eval``), QDPO's pair generation (``datamodules.QDPOPairsDataModule``
through ``QDPO.generate_answers``) and its evaluation (``callbacks.quantization_eval``) all draw through
:func:`sample_mixed`.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from lm.tensors import pad_sequences


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


class _EagerDecoder:
    """The reference decoder (HF dynamic cache, no graphs): per step, only the model that draws runs, lazily
    (:class:`_LazyLM`); the other reads what it missed at the end."""

    check_every = 1  # test for "all sequences done" after every token

    def __init__(self, stu: _LazyLM | None, tea: _LazyLM | None):
        self.stu, self.tea = stu, tea

    def dist(self, t: int, tokens: list[torch.Tensor], use_teacher: bool) -> torch.Tensor:
        return (self.tea if use_teacher else self.stu).dist_for(t, tokens)

    def scores(self, tokens: list[torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return (None if self.stu is None else self.stu.score(tokens),
                None if self.tea is None else self.tea.score(tokens))


def _static_prefill_mask(prompt_mask: torch.Tensor, max_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4-D mask (B, 1, P, L) of the prompt forward over a static cache of length L: query i attends key j
    iff j ≤ i and j is a real prompt token, or j = i (so a left-pad query attends itself and stays finite; nothing
    real ever attends a pad key). Keys j ≥ P (not yet written) are masked. 0 = attend, finfo(dtype).min = not."""
    p = prompt_mask.shape[1]
    keys = torch.arange(max_len, device=prompt_mask.device)
    queries = keys[:p, None]
    real = torch.cat([prompt_mask.bool(), prompt_mask.new_zeros(prompt_mask.shape[0], max_len - p).bool()], 1)
    allowed = ((keys <= queries) & real[:, None, :]) | (keys == queries)
    return torch.zeros((), dtype=dtype, device=prompt_mask.device).masked_fill(~allowed, torch.finfo(dtype).min)[
        :, None]


class _StaticLM:
    """One causal LM over a preallocated transformers ``StaticCache`` of length L = P + max_new_tokens: the prompt
    in one forward (:meth:`prefill`), then one token per :meth:`step` into slot P + r (r = the response index
    read, kept in a device counter so a CUDA-graph replay advances it by itself). Position of response token r:
    (last prompt position) + r + 1, as in :class:`_LazyLM`; the additive mask attends the real prompt tokens
    and response slots ≤ P + r (response tokens after EOS included, as the eager path does)."""

    def __init__(self, model: PreTrainedModel, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                 temperature: float, max_new_tokens: int):
        from transformers import StaticCache

        if getattr(model, "config", None) is None:
            raise ValueError(f"cache='static' needs a transformers model with a config, got {type(model).__name__}")
        self.model, self.cache_arg = model, _cache_arg(model)
        self.dtype = next(model.parameters()).dtype
        self.temperature = temperature if temperature > 0 else 1.0
        self.prompt_ids, self.prompt_mask = prompt_ids, prompt_mask
        self.p, self.max_len = prompt_ids.shape[1], prompt_ids.shape[1] + max_new_tokens
        self.cache = StaticCache(config=model.config, max_cache_len=self.max_len)
        self.prompt_positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
        self.real = torch.cat([prompt_mask.bool(), prompt_mask.new_ones(prompt_mask.shape[0], max_new_tokens,
                                                                       dtype=torch.bool)], 1)
        self.keys = torch.arange(self.max_len, device=prompt_ids.device)
        self.r = torch.zeros((), dtype=torch.long, device=prompt_ids.device)  # response tokens read

    def _log_dist(self, out) -> torch.Tensor:
        logits = out.logits[:, -1].float()
        return torch.log_softmax(logits if self.temperature == 1.0 else logits / self.temperature, -1)

    def prefill(self) -> torch.Tensor:
        """Read the prompt; log-dist of response token 0."""
        out = self.model(input_ids=self.prompt_ids, position_ids=self.prompt_positions, use_cache=True,
                         attention_mask=_static_prefill_mask(self.prompt_mask, self.max_len, self.dtype),
                         logits_to_keep=1, **{self.cache_arg: self.cache})
        return self._log_dist(out)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """Read response token r (``ids``, (B, 1)); log-dist of token r + 1. No host sync: graph-capturable."""
        allowed = self.real & (self.keys <= self.p + self.r)
        mask = torch.zeros((), dtype=self.dtype, device=ids.device).masked_fill(~allowed, torch.finfo(self.dtype).min)
        out = self.model(input_ids=ids, position_ids=self.prompt_positions[:, -1:] + self.r + 1, use_cache=True,
                         attention_mask=mask[:, None, None], logits_to_keep=1, **{self.cache_arg: self.cache})
        self.r.add_(1)
        return self._log_dist(out)

    def rewind(self, r: int) -> None:
        """Set the read position back to response token ``r`` (after the warm-up runs of a graph capture)."""
        self.r.fill_(r)
        for layer in self.cache.layers:
            layer.cumulative_length.fill_(self.p + r)


class _StaticDecoder:
    """Static KV caches for every model that scores (student and/or teacher), all stepped together one token at a
    time, so the step has fixed shapes and, with ``cuda_graphs``, is captured once into a ``torch.cuda.CUDAGraph``
    and replayed (the token to read is copied into a fixed input buffer). Each step yields every model's
    distribution of the next token, so the sampled token is scored on the way (log q, log p) and the loop draws
    from the coin's model exactly as the eager path does, with the same random draws. The host checks for
    "all done" every ``check_every`` tokens (a device sync), and the extra all-padding tokens are trimmed."""

    check_every = 8

    def __init__(self, lms: list[_StaticLM | None], cuda_graphs: bool):
        self.lms = lms  # [student, teacher], None where absent
        live = [lm for lm in lms if lm is not None]
        self.dists = [None if lm is None else lm.prefill() for lm in lms]
        self.ids = torch.zeros(live[0].prompt_ids.shape[0], 1, dtype=torch.long, device=live[0].prompt_ids.device)
        self.logps: list[list[torch.Tensor]] = [[], []]
        self.t = 0  # the token whose distributions are in self.dists
        self._step = self._eager_step
        if cuda_graphs:
            try:
                self._step = self._capture(live)
            except RuntimeError as e:  # a forward that cannot be captured (e.g. a host sync): run it uncaptured
                warnings.warn(f"sample_mixed: CUDA-graph capture of the decode step failed, running it uncaptured "
                              f"({type(e).__name__}: {e})", RuntimeWarning, stacklevel=2)
                for lm in live:
                    lm.rewind(0)

    def _eager_step(self) -> list[torch.Tensor | None]:
        return [None if lm is None else lm.step(self.ids) for lm in self.lms]

    def _capture(self, live: list[_StaticLM]):
        """Warm up on a side stream (2 steps, then rewind the caches), capture one step into a CUDA graph; the
        replay writes the new distributions into the graph's output tensors."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._eager_step()
        torch.cuda.current_stream().wait_stream(stream)
        for lm in live:
            lm.rewind(0)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = self._eager_step()
        self.graph = graph

        def replay() -> list[torch.Tensor | None]:
            graph.replay()
            return outs

        return replay

    def dist(self, t: int, tokens: list[torch.Tensor], use_teacher: bool) -> torch.Tensor:
        if t > self.t:  # score token t − 1 under every model, then read it
            self._score(tokens[t - 1])
            self.ids.copy_(tokens[t - 1][:, None])
            self.dists, self.t = self._step(), t
        return self.dists[1 if use_teacher else 0]

    def _score(self, token: torch.Tensor) -> None:
        for logps, d in zip(self.logps, self.dists):
            if d is not None:
                logps.append(d.gather(-1, token[:, None]).squeeze(-1))

    def scores(self, tokens: list[torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        self._score(tokens[-1])
        return tuple(torch.stack(lp, 1) if lp else None for lp in self.logps)


def default_cache(device: torch.device) -> str:
    """``"static"`` on CUDA (fixed-shape one-token steps, CUDA-graph capturable), ``"dynamic"`` elsewhere."""
    return "static" if torch.device(device).type == "cuda" else "dynamic"


@torch.inference_mode()
def _sample_mixed(student: PreTrainedModel | None, teacher: PreTrainedModel | None, prompt_ids: torch.Tensor,
                 prompt_mask: torch.Tensor, max_new_tokens: int, alpha: float = 0.0, eos_id: int | None = 1,
                 pad_id: int = 0, temperature: float = 1.0, generator: torch.Generator | None = None,
                 cache: str | None = None, cuda_graphs: bool | None = None) -> Rollout:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"teacher-mix alpha must be in [0, 1], got {alpha}")
    if alpha > 0 and teacher is None:
        raise ValueError("teacher-mixed sampling (alpha > 0) needs a teacher")
    if temperature <= 0 and 0 < alpha < 1:
        raise ValueError("greedy decoding (temperature 0) of a teacher-student mixture is not defined; "
                         "use alpha 0 or 1")
    device = prompt_ids.device
    cache = default_cache(device) if cache is None else cache
    if cache not in ("dynamic", "static"):
        raise ValueError(f"sample_mixed cache must be 'dynamic' or 'static', got {cache!r}")
    cuda_graphs = cache == "static" and device.type == "cuda" if cuda_graphs is None else cuda_graphs
    if cuda_graphs and (cache != "static" or device.type != "cuda"):
        raise ValueError(f"sample_mixed cuda_graphs=True needs cache='static' on a CUDA device, got cache={cache!r} "
                         f"on {device}")
    lm_cls = _StaticLM if cache == "static" else _LazyLM
    stu = lm_cls(student, prompt_ids, prompt_mask, temperature, max_new_tokens) if alpha < 1 else None
    tea = lm_cls(teacher, prompt_ids, prompt_mask, temperature, max_new_tokens) if teacher is not None else None
    coins = (torch.rand(max_new_tokens, generator=generator, device=generator.device if generator else device)
             < alpha).tolist()
    decoder = _StaticDecoder([stu, tea], cuda_graphs) if cache == "static" else _EagerDecoder(stu, tea)
    done = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=device)
    tokens, masks = [], []
    for t in range(max_new_tokens):
        logits = decoder.dist(t, tokens, stu is None or coins[t])
        if temperature > 0:
            nxt = sample_categorical(logits, generator)
        else:
            nxt = logits.argmax(-1)
        tokens.append(torch.where(done, torch.full_like(nxt, pad_id), nxt))
        masks.append(~done)
        if eos_id is not None:
            done = done | (tokens[-1] == eos_id)
            if (t + 1) % decoder.check_every == 0 and bool(done.all()):
                break
    logq, logp = decoder.scores(tokens)
    logq = logp if logq is None else logq
    if stu is None or alpha == 0:
        logmix = logq
    else:
        logmix = torch.logaddexp(logp + math.log(alpha), logq + math.log1p(-alpha))
    mask = torch.stack(masks, 1).long()
    # the loop stops after the token at which the last sequence ended: trim what a sparser check drew beyond it
    n = int(mask.sum(1).max()) if eos_id is not None else mask.shape[1]
    return Rollout(prompt_ids, prompt_mask, torch.stack(tokens, 1)[:, :n], mask[:, :n], logq[:, :n],
                   None if logp is None else logp[:, :n], logmix[:, :n])


def sample_mixed(student: PreTrainedModel | None, teacher: PreTrainedModel | None, prompt_ids: torch.Tensor,
                 prompt_mask: torch.Tensor, max_new_tokens: int, alpha: float = 0.0, eos_id: int | None = 1,
                 pad_id: int = 0, temperature: float = 1.0, generator: torch.Generator | None = None,
                 cache: str | None = None, cuda_graphs: bool | None = None) -> Rollout:
    """Sample y_t ~ p̃ = α·p + (1−α)·q (softmax of logits/temperature), batched with KV caches; a sequence
    that emitted ``eos_id`` gets ``pad_id`` (mask 0) afterwards and the loop stops when all are done.

    The mixture is drawn as: at each step a coin c_t ~ Bernoulli(α), independent of everything before;
    y_t ~ p(·|y_<t) if c_t else q(·|y_<t). Marginalising c_t gives exactly y_t | y_<t ~ α·p + (1−α)·q for
    every sequence. The coin is shared by the batch (sequences stay independent given the coins, each with
    the exact mixture law). Every sampled token is scored (log q, log p and log p̃ for the rewards and the
    importance weights) at the FLOPs of sampling from one model plus one forward of the other.
    ``alpha=0``: student only; ``alpha=1``: teacher only (SeqKD). ``temperature=0`` is greedy (for α ∈ {0, 1}).

    Two decode paths, the same law and the same random draws (coins, then one uniform per row per token):

    - ``cache="dynamic"`` (the default off CUDA; the reference): HF's dynamic cache; at each step only the model
      that draws runs, reading the tokens it has not seen in one chunked forward; the other catches up at the end.
    - ``cache="static"`` (the default on CUDA): a preallocated ``transformers.StaticCache`` per model, both models
      read each token as it is drawn (one-token steps of fixed shape), with ``cuda_graphs`` (default: on for
      CUDA) the step is captured once into a CUDA graph and replayed (if capture fails: a ``RuntimeWarning`` and
      the uncaptured step). All-done is checked every 8 tokens, so the
      generator may advance by up to 7 draws more than on the dynamic path (the outputs are the same).

    Runs under ``torch.inference_mode`` (less per-call overhead); the outputs are cloned into normal tensors.
    """
    out = _sample_mixed(student, teacher, prompt_ids, prompt_mask, max_new_tokens, alpha, eos_id, pad_id,
                        temperature, generator, cache, cuda_graphs)
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
             generator: torch.Generator | None = None, cache: str | None = None,
             cuda_graphs: bool | None = None) -> Rollout:
    """Sample (``temperature`` > 0) or greedily decode (0) up to ``max_new_tokens`` from one ``model`` for left-padded
    prompts: :func:`sample_mixed` with α = 0 (``teacher_logprobs`` is ``None``; ``cache``/``cuda_graphs`` as there)."""
    return sample_mixed(model, None, prompt_ids, prompt_mask, max_new_tokens, 0.0, eos_id, pad_id, temperature,
                        generator, cache, cuda_graphs)


def generate_answers(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 32,
                     batch_size: int = 64, max_prompt_length: int = 128, do_sample: bool = False,
                     temperature: float = 1.0, seed: int = 0) -> list[str]:
    """Answer every prompt with :func:`generate` (batches of ``batch_size`` left-padded prompts, each cut to its last
    ``max_prompt_length`` tokens, KV cache), decoded up to (without) the tokenizer's EOS.

    Greedy unless ``do_sample`` (plain softmax(logits/``temperature``) sampling, no top-k/top-p). Batch ``i`` draws
    from its own ``torch.Generator`` seeded ``seed + i`` (the global RNG is untouched), so two models given the
    same prompts and seed share their random numbers (coupled sampling). ``model`` runs in eval mode; its mode is
    restored afterwards.
    """
    if do_sample and temperature <= 0:
        raise ValueError(f"generate_answers: temperature must be > 0 when sampling, got {temperature}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    answers = []
    for batch_no, start in enumerate(range(0, len(prompts), batch_size)):
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"][-max_prompt_length:]
               for p in prompts[start:start + batch_size]]
        input_ids = pad_sequences(ids, pad, left=True).to(device)
        attention_mask = pad_sequences([[1] * len(i) for i in ids], 0, left=True).to(device)
        generator = torch.Generator(device=device).manual_seed(seed + batch_no)
        out = generate(model, input_ids, attention_mask, max_new_tokens, temperature if do_sample else 0.0,
                       eos_id=eos, pad_id=pad, generator=generator)
        for row, mask in zip(out.response_ids.tolist(), out.response_mask.tolist()):
            row = [t for t, m in zip(row, mask) if m]
            if eos in row:
                row = row[: row.index(eos)]
            answers.append(tokenizer.decode(row, skip_special_tokens=True))
    model.train(was_training)
    return answers
