"""The teacher-mixed sampler: mixture probabilities, EOS handling, left padding / positions / masks."""

from types import SimpleNamespace

import torch

from lm.hf import load_causal_lm
from lm.sampling import generate, response_logits, sample_categorical, sample_mixed
from tiny_models import TINY



class Scripted(torch.nn.Module):
    """A fake LM: after reading n response tokens it emits ``script[b, n]`` with certainty (the "cache" is n);
    it records what the sampler passed in."""

    def __init__(self, script: list[list[int]], vocab: int = 10):
        super().__init__()
        self.script, self.vocab, self.calls = torch.tensor(script), vocab, []

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True, logits_to_keep=0):
        self.calls.append({"ids": input_ids.clone(), "mask": attention_mask.clone(), "pos": position_ids.clone()})
        b, k = input_ids.shape
        read = 0 if past_key_values is None else past_key_values + k
        nxt = [0] * k if past_key_values is None else list(range(past_key_values + 1, read + 1))
        logits = torch.full((b, k, self.vocab), -1e4)
        for i, n in enumerate(nxt):
            logits[torch.arange(b), i, self.script[:, min(n, self.script.shape[1] - 1)]] = 0.0
        return SimpleNamespace(logits=logits, past_key_values=read)


class Fixed(torch.nn.Module):
    """A fake LM whose next-token distribution is ``probs`` whatever the context."""

    def __init__(self, probs: list[float]):
        super().__init__()
        self.logits, self.calls = torch.tensor(probs).log(), 0

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True, logits_to_keep=0):
        self.calls += 1
        return SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1), past_key_values=0)


def test_finished_sequences_get_padding_and_masks():
    lm = Scripted([[5, 1, 6, 6], [5, 6, 1, 6], [5, 6, 6, 6]])
    prompt = torch.tensor([[7, 8], [7, 8], [7, 8]])
    out = sample_mixed(lm, None, prompt, torch.ones_like(prompt), max_new_tokens=4, eos_id=1, pad_id=0)
    assert out.response_ids.tolist() == [[5, 1, 0, 0], [5, 6, 1, 0], [5, 6, 6, 6]]
    assert out.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]


def test_stops_when_every_sequence_is_done():
    lm = Scripted([[5, 1, 6, 6, 6, 6], [1, 6, 6, 6, 6, 6]])
    prompt = torch.tensor([[7], [7]])
    out = sample_mixed(lm, None, prompt, torch.ones_like(prompt), max_new_tokens=6, eos_id=1, pad_id=0)
    assert out.response_ids.tolist() == [[5, 1], [1, 0]]
    assert len(lm.calls) == 2  # the prompt, then one token: no forward after the last EOS


def test_left_padded_prompts_get_positions_and_growing_attention_mask():
    lm = Scripted([[5, 6, 6], [5, 6, 6]])
    prompt = torch.tensor([[0, 0, 7], [7, 8, 9]])
    mask = torch.tensor([[0, 0, 1], [1, 1, 1]])
    sample_mixed(lm, None, prompt, mask, max_new_tokens=3, eos_id=None, pad_id=0)
    first, second, third = lm.calls
    assert first["pos"].tolist() == [[0, 0, 0], [0, 1, 2]]
    assert second["pos"].tolist() == [[1], [3]] and third["pos"].tolist() == [[2], [4]]
    assert second["mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert second["ids"].tolist() == [[5], [5]]


def test_sampled_logprobs_match_a_full_forward_with_left_padding():
    torch.manual_seed(0)
    student = load_causal_lm(TINY, vocab_size=12, seed=1).eval()
    teacher = load_causal_lm(TINY | {"hidden_size": 48}, vocab_size=12, seed=2).eval()
    prompt = torch.tensor([[0, 0, 4, 5], [6, 7, 8, 9]])
    mask = (prompt != 0).long()
    alpha = 0.3
    out = sample_mixed(student, teacher, prompt, mask, max_new_tokens=6, alpha=alpha, eos_id=1, pad_id=0)
    with torch.no_grad():
        logq = torch.log_softmax(response_logits(student, out), -1).gather(-1, out.response_ids[..., None])[..., 0]
        logp = torch.log_softmax(response_logits(teacher, out), -1).gather(-1, out.response_ids[..., None])[..., 0]
    m = out.response_mask.bool()
    torch.testing.assert_close(out.student_logprobs[m], logq[m], atol=1e-4, rtol=1e-4)
    mix = torch.log(alpha * logp.exp() + (1 - alpha) * logq.exp())
    torch.testing.assert_close(out.mix_logprobs[m], mix[m], atol=1e-4, rtol=1e-4)
    # the same prompt without left padding gives the same first-step distribution
    alone = load_causal_lm(TINY, vocab_size=12, seed=1).eval()
    with torch.no_grad():
        ref = torch.log_softmax(alone(torch.tensor([[4, 5]])).logits[0, -1], -1)[out.response_ids[0, 0]]
    torch.testing.assert_close(out.student_logprobs[0, 0], ref, atol=1e-4, rtol=1e-4)


def test_empirical_frequencies_follow_the_mixture_with_independent_steps():
    p, q, alpha, n = [0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7], 0.2, 3000
    teacher, student = Fixed(p), Fixed(q)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.tensor([[2, 3]])
    samples = torch.cat([sample_mixed(student, teacher, prompt, torch.ones_like(prompt), max_new_tokens=2,
                                      alpha=alpha, eos_id=None, generator=gen).response_ids for _ in range(n)])
    mix = alpha * torch.tensor(p) + (1 - alpha) * torch.tensor(q)  # [0.22, 0.1, 0.1, 0.58]
    tol = lambda x: 4 * (x * (1 - x) / n) ** 0.5  # noqa: E731  4 standard errors of a frequency
    for step in range(2):
        freq = torch.bincount(samples[:, step], minlength=4).float() / n
        assert ((freq - mix).abs() <= tol(mix)).all(), (step, freq, mix)
    # the two steps draw their coins independently: P(y1 = y2 = 0) = mix_0² (= 0.048), not α·p0² + (1−α)·q0² (0.106)
    both = ((samples[:, 0] == 0) & (samples[:, 1] == 0)).float().mean()
    assert abs(both - mix[0] ** 2) <= tol(mix[0] ** 2)


def test_only_the_drawing_model_runs_at_each_step():
    teacher, student = Fixed([0.5, 0.5]), Fixed([0.5, 0.5])
    prompt = torch.tensor([[1, 1]])
    out = sample_mixed(student, teacher, prompt, torch.ones_like(prompt), max_new_tokens=200, alpha=0.2,
                       eos_id=None, generator=torch.Generator().manual_seed(0))
    assert out.response_ids.shape == (1, 200)
    # each step runs only the model that draws (≈ α·T teacher and (1−α)·T student forwards), plus ≤ 1 final
    # catch-up forward each: the forward count of sampling from one model, not of stepping both
    assert teacher.calls < 0.35 * 200 and student.calls < 0.9 * 200
    assert teacher.calls + student.calls <= 200 + 2
    torch.testing.assert_close(out.teacher_logprobs, torch.full((1, 200), 0.5).log())
    torch.testing.assert_close(out.student_logprobs, torch.full((1, 200), 0.5).log())


def test_alpha_one_samples_the_teacher_only():
    lm_s = Scripted([[5, 5]])
    lm_t = Scripted([[6, 1]])
    out = sample_mixed(lm_s, lm_t, torch.tensor([[7]]), torch.ones(1, 1, dtype=torch.long), 4, alpha=1.0)
    assert out.response_ids.tolist() == [[6, 1]] and lm_s.calls == []
    torch.testing.assert_close(out.mix_logprobs, out.teacher_logprobs)


def test_inverse_cdf_draws_follow_the_distribution_and_never_pick_zero_mass():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2], [0.1, 0.0, 0.0, 0.0, 0.9]])
    g = torch.Generator().manual_seed(0)
    n = 40_000
    draws = torch.stack([sample_categorical(probs.log(), g) for _ in range(n)])  # (n, 2)
    for row in range(2):
        freq = torch.bincount(draws[:, row], minlength=5).double() / n
        assert freq[probs[row] == 0].sum() == 0
        # 5 binomial standard errors at n = 40k is < 0.013
        torch.testing.assert_close(freq, probs[row].double(), atol=0.013, rtol=0)


def test_greedy_generate_matches_a_cache_free_argmax_loop_with_left_padding_and_eos():
    """``generate`` at temperature 0 = for each prompt alone (no padding, no cache): append argmax of a full forward
    until EOS or the cap; then pad. EOS is chosen as a token the model does emit, so one sequence ends early."""
    model = load_causal_lm(TINY, vocab_size=12, seed=3).eval()
    prompts = [[5, 7, 2, 9], [4, 3]]
    ids = torch.tensor([[5, 7, 2, 9], [0, 0, 4, 3]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])

    def argmax_loop(prompt, eos, cap):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(cap):
                seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
                if seq[-1] == eos:
                    break
        return seq[len(prompt):]

    eos = argmax_loop(prompts[0], None, 3)[2]  # the first sequence's third greedy token ends it
    out = generate(model, ids, mask, 6, temperature=0.0, eos_id=eos, pad_id=0)
    for b, prompt in enumerate(prompts):
        want = argmax_loop(prompt, eos, 6)
        assert out.response_ids[b, :len(want)].tolist() == want
        assert out.response_mask[b].tolist() == [1] * len(want) + [0] * (out.response_ids.shape[1] - len(want))
        assert not out.response_ids[b, len(want):].any()
    assert out.teacher_logprobs is None
