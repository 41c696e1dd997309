"""lm.logprobs.token_logps: hand-computed values, finite-difference gradients, chunking and half precision."""

import math

import pytest
import torch

from lm.logprobs import token_logps


def test_hand_computed_values_for_every_chunk_size():
    ln2, ln3 = math.log(2), math.log(3)
    logits = torch.tensor([[0.0, ln2, 0.0], [ln3, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    targets = torch.tensor([1, 0, 2])
    want = [math.log(1 / 2), math.log(3 / 5), math.log(1 / 3)]  # p = [1/4, 1/2, 1/4], [3/5, 1/5, 1/5], uniform
    for chunk in (1, 2, 3, 100):
        assert token_logps(logits, targets, chunk_size=chunk).tolist() == pytest.approx(want, rel=1e-12)


def test_gradient_matches_finite_differences_across_chunks():
    logits = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 6, 3, 3, 1])
    assert torch.autograd.gradcheck(lambda z: token_logps(z, targets, chunk_size=2), (logits,))


def test_half_precision_logits_are_upcast_and_get_a_gradient_of_their_dtype():
    logits = (3 * torch.randn(6, 11)).bfloat16().requires_grad_()
    targets = torch.randint(0, 11, (6,))
    got = token_logps(logits, targets, chunk_size=4)
    want = torch.log_softmax(logits.detach().double(), -1).gather(-1, targets[:, None]).squeeze(-1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    weights = torch.randn(6)
    (got * weights).sum().backward()
    ref = logits.detach().double().requires_grad_()
    (torch.log_softmax(ref, -1).gather(-1, targets[:, None]).squeeze(-1) * weights.double()).sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits.grad.double(), ref.grad, rtol=1e-2, atol=1e-2)  # bf16 rounding of the grad


def test_shape_errors():
    with pytest.raises(ValueError, match="logits"):
        token_logps(torch.zeros(2, 3, 4), torch.zeros(2, dtype=torch.long))
