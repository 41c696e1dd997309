"""MiniLLM's math against independent references: exact enumeration of ∇KL(q‖p), hand-computed returns, JSD."""

import itertools
import math

import pytest
import torch

from lit_modules.minillm import future_returns, generalized_jsd, minillm_loss, ppo_clipped_loss


def _exact_and_estimated_grads(single_step: bool, vocab: int = 3, seed: int = 0):
    """Student q(y1, y2) = softmax(a)[y1]·softmax(B[y1])[y2] (autoregressive table), teacher likewise.
    Returns (∇ exact KL(q‖p), Σ_y q(y)·∇ estimator-loss(y)·T) for T = 2 tokens per sequence."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(vocab, generator=g, requires_grad=True)
    b = torch.randn(vocab, vocab, generator=g, requires_grad=True)
    ta, tb = 2 * torch.randn(vocab, generator=g), 2 * torch.randn(vocab, vocab, generator=g)

    def logprob(first, second, y1, y2):
        return torch.log_softmax(first, -1)[y1] + torch.log_softmax(second[y1], -1)[y2]

    seqs = list(itertools.product(range(vocab), repeat=2))
    kl = sum(logprob(a, b, *y).exp() * (logprob(a, b, *y) - logprob(ta, tb, *y)) for y in seqs)
    exact = torch.autograd.grad(kl, (a, b))

    est = [torch.zeros_like(a), torch.zeros_like(b)]
    for y1, y2 in seqs:
        s_logits = torch.stack([a, b[y1]])[None]  # (1, T=2, V): position 1, position 2 given y1
        t_logits = torch.stack([ta, tb[y1]])[None]
        tokens = torch.tensor([[y1, y2]])
        old = torch.log_softmax(s_logits.detach(), -1).gather(-1, tokens[..., None]).squeeze(-1)
        loss, _ = minillm_loss(s_logits, t_logits, tokens, torch.ones(1, 2), old, single_step=single_step,
                               length_norm=False, gamma=1.0, reward_scaling=1.0, whiten_advantages=False)
        ga, gb = torch.autograd.grad(loss, (a, b))
        weight = logprob(a, b, y1, y2).exp().detach()
        est[0] += weight * ga * 2
        est[1] += weight * gb * 2
    return exact, est


@pytest.mark.parametrize("single_step", [True, False])
def test_estimator_expectation_equals_exact_reverse_kl_gradient(single_step):
    exact, est = _exact_and_estimated_grads(single_step)
    assert exact[0].abs().max() > 1e-2  # a non-trivial case
    torch.testing.assert_close(est[0], exact[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(est[1], exact[1], atol=1e-5, rtol=1e-4)


def test_future_returns_hand_computed():
    r = torch.tensor([[1.0, 2.0, 3.0]])
    full = torch.ones(1, 3)
    # R_{t+1}: [2+3, 3, 0]; normalised by the number of summed tokens [2, 1, 0→1]
    assert future_returns(r, full, length_norm=False).tolist() == [[5.0, 3.0, 0.0]]
    assert future_returns(r, full, length_norm=True).tolist() == [[2.5, 3.0, 0.0]]
    # R_t: [6, 5, 3] / [3, 2, 1]
    assert future_returns(r, full, include_current=True, length_norm=True).tolist() == [[2.0, 2.5, 3.0]]
    # discount: R_1 = 2 + 0.5·3 = 3.5; masked third token contributes nothing
    assert future_returns(r, full, gamma=0.5, length_norm=False)[0, 0].item() == 3.5
    assert future_returns(r, torch.tensor([[1.0, 1.0, 0.0]]), length_norm=False).tolist() == [[2.0, 0.0, 0.0]]


def test_generalized_jsd_endpoints_and_midpoint():
    p, q = torch.tensor([0.9, 0.1]), torch.tensor([0.5, 0.5])
    lp, lq = p.log()[None], q.log()[None]
    kl = lambda x, y: float((x * (x / y).log()).sum())  # noqa: E731
    assert generalized_jsd(lq, lp, 0.0).item() == pytest.approx(kl(p, q), rel=1e-5)  # forward KL(p‖q)
    assert generalized_jsd(lq, lp, 1.0).item() == pytest.approx(kl(q, p), rel=1e-5)  # reverse KL(q‖p)
    m = 0.5 * (p + q)
    assert generalized_jsd(lq, lp, 0.5).item() == pytest.approx(0.5 * kl(p, m) + 0.5 * kl(q, m), rel=1e-5)
    assert generalized_jsd(lq, lp, 0.5).item() <= math.log(2)


def test_ppo_clip_stops_gradient_outside_the_trust_region():
    logp = torch.tensor([[0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0]])
    weights = torch.tensor([[1.5, 1.0]])  # token 1's ratio 1.5 is above 1 + ε
    adv = torch.tensor([[1.0, 1.0]])
    loss, clip_frac = ppo_clipped_loss(logp, old, adv, weights, torch.ones(1, 2), clip_eps=0.2)
    # loss = mean(max(−1.5, −1.2), max(−1, −1)) = (−1.2 − 1)/2; only token 2 has a gradient (−ρ/2 = −0.5)
    assert loss.item() == pytest.approx(-1.1)
    assert clip_frac.item() == pytest.approx(0.5)
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad.tolist() == [[0.0, -0.5]]
