"""The static-KV-cache decode path of the sampler (``cache="static"``, optionally CUDA graphs) against the eager
dynamic-cache path (the reference) and against a teacher-forced forward: same tokens, same log-probs, same
random draws. CUDA-only tests (``-k cuda``) are skipped without a GPU."""

import pytest
import torch

from lm.hf import load_causal_lm
from lm.sampling import Rollout, _static_prefill_mask, _StaticDecoder, _StaticLM, response_logits, sample_mixed

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}
# left-padded prompts of lengths 2, 4, 1 and 3
PROMPT = torch.tensor([[0, 0, 4, 5], [6, 7, 8, 9], [0, 0, 0, 3], [0, 10, 11, 2]])
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _pair(device="cpu", dtype=torch.float32, vocab=12):
    student = load_causal_lm(TINY, vocab_size=vocab, seed=1, dtype=dtype).to(device).eval()
    teacher = load_causal_lm(TINY | {"hidden_size": 48}, vocab_size=vocab, seed=2, dtype=dtype).to(device).eval()
    return student, teacher


def _draw(student, teacher, alpha, seed, device="cpu", **kw) -> Rollout:
    prompt = PROMPT.to(device)
    g = torch.Generator(device).manual_seed(seed)
    return sample_mixed(student, teacher, prompt, (prompt != 0).long(), 21, alpha=alpha, eos_id=1, pad_id=0,
                        temperature=kw.pop("temperature", 0.7), generator=g, **kw)


def _assert_same(a: Rollout, b: Rollout, atol: float) -> None:
    assert a.response_ids.tolist() == b.response_ids.tolist()
    assert a.response_mask.tolist() == b.response_mask.tolist()
    for name in ("student_logprobs", "teacher_logprobs", "mix_logprobs"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("alpha,seed", [(0.0, 0), (0.0, 5), (0.2, 0), (0.2, 7), (1.0, 3)])
def test_static_cache_draws_the_same_tokens_and_logprobs_as_the_eager_path(alpha, seed):
    student, teacher = _pair()
    eager = _draw(student, teacher, alpha, seed, cache="dynamic")
    static = _draw(student, teacher, alpha, seed, cache="static", cuda_graphs=False)
    _assert_same(eager, static, atol=1e-5)
    # the case is not trivial: sequences end at different steps (per-sequence EOS, then padding, mask 0)
    ends = static.response_mask.sum(1)
    assert ends.min() < static.response_ids.shape[1] and len(set(ends.tolist())) > 1
    assert (static.response_ids[static.response_mask == 0] == 0).all()


def test_static_cache_without_eos_runs_the_full_length_and_greedy_matches():
    student, teacher = _pair()
    prompt, mask = PROMPT, (PROMPT != 0).long()
    for temperature in (1.0, 0.0):
        kw = dict(alpha=0.0, eos_id=None, temperature=temperature)
        a = sample_mixed(student, teacher, prompt, mask, 13, generator=torch.Generator().manual_seed(1),
                         cache="dynamic", **kw)
        b = sample_mixed(student, teacher, prompt, mask, 13, generator=torch.Generator().manual_seed(1),
                         cache="static", **kw)
        assert b.response_ids.shape == (4, 13) and b.response_mask.all()
        _assert_same(a, b, atol=1e-5)


def test_static_cache_logprobs_match_a_teacher_forced_forward():
    """Independent of both decode paths: log q, log p of every sampled token from one full forward over
    prompt + response, and log p̃ = log(α·p + (1 − α)·q)."""
    student, teacher = _pair()
    alpha = 0.2
    out = _draw(student, teacher, alpha, 7, cache="static", cuda_graphs=False, temperature=1.0)
    with torch.no_grad():
        logq = torch.log_softmax(response_logits(student, out), -1).gather(-1, out.response_ids[..., None])[..., 0]
        logp = torch.log_softmax(response_logits(teacher, out), -1).gather(-1, out.response_ids[..., None])[..., 0]
    m = out.response_mask.bool()
    torch.testing.assert_close(out.student_logprobs[m], logq[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.teacher_logprobs[m], logp[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.mix_logprobs[m], torch.log(alpha * logp.exp() + (1 - alpha) * logq.exp())[m],
                               atol=1e-5, rtol=1e-5)


def test_prefill_mask_attends_real_prompt_keys_causally_and_pads_only_themselves():
    # prompt [pad, a, b], cache length 5: hand-written allowed (query row, key column) pairs
    allowed = _static_prefill_mask(torch.tensor([[0, 1, 1]]), 5, torch.float32)[0, 0] == 0
    assert allowed.tolist() == [[True, False, False, False, False],
                                [False, True, False, False, False],
                                [False, True, True, False, False]]


def test_default_is_eager_on_cpu_and_bad_arguments_are_named():
    class NoConfig(torch.nn.Module):
        config = None

    student, _ = _pair()
    prompt = torch.tensor([[4, 5]])
    with pytest.raises(ValueError, match="cache"):
        sample_mixed(student, None, prompt, torch.ones_like(prompt), 2, cache="paged")
    with pytest.raises(ValueError, match="cuda_graphs"):
        sample_mixed(student, None, prompt, torch.ones_like(prompt), 2, cache="static", cuda_graphs=True)
    with pytest.raises(ValueError, match="config"):
        sample_mixed(NoConfig(), None, prompt, torch.ones_like(prompt), 2, cache="static")


def test_a_failed_graph_capture_warns_and_rewinds_to_the_uncaptured_step(monkeypatch):
    def failing_capture(self, live):  # warm-up steps advance the caches, then the capture fails
        self._eager_step(), self._eager_step()
        raise RuntimeError("operation not permitted when stream is capturing")

    student, teacher = _pair()
    prompt, mask = PROMPT, (PROMPT != 0).long()
    tokens = [torch.tensor([3, 4, 5, 6]), torch.tensor([7, 1, 2, 3]), torch.tensor([8, 9, 10, 11])]

    def run(cuda_graphs):
        decoder = _StaticDecoder([_StaticLM(m, prompt, mask, 1.0, 4) for m in (student, teacher)], cuda_graphs)
        return [decoder.dist(t, tokens, use_teacher=t == 1) for t in range(3)]

    reference = run(False)
    monkeypatch.setattr(_StaticDecoder, "_capture", failing_capture)
    with pytest.warns(RuntimeWarning, match="capture of the decode step failed"):
        fallback = run(True)
    for a, b in zip(reference, fallback):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@cuda
@pytest.mark.filterwarnings("error::RuntimeWarning")  # a failed capture (fallback to uncaptured) fails the test
def test_cuda_graph_replay_is_bitwise_the_uncaptured_static_step():
    student, teacher = _pair("cuda", torch.bfloat16, vocab=300)
    for alpha in (0.0, 0.2):
        plain = _draw(student, teacher, alpha, 0, "cuda", cache="static", cuda_graphs=False)
        graphed = _draw(student, teacher, alpha, 0, "cuda", cache="static", cuda_graphs=True)
        _assert_same(plain, graphed, atol=1e-3)  # the same kernels: equal up to a different cuBLAS workspace


@cuda
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_cuda_default_static_graphs_match_the_eager_path_in_fp32(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    student, teacher = _pair("cuda")
    for alpha in (0.0, 0.2):
        eager = _draw(student, teacher, alpha, 0, "cuda", cache="dynamic")
        default = _draw(student, teacher, alpha, 0, "cuda")  # static + CUDA graphs
        _assert_same(eager, default, atol=1e-4)
