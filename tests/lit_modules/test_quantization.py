"""Weight-only quantization helpers (lm/quantization.py): the RTN quantizer's values and error bound,
straight-through gradients, conversion to real low-bit weights and save/load, GPT-2 Conv1D, bad input."""

import pytest
import torch
from torch import nn

from lm.hf import load_causal_lm
from lm.quantization import conv1d_to_linear, convert_qat, prepare_qat, quantization_tag, quantize_rtn, save_quantized


def _linear(weight: torch.Tensor) -> nn.Sequential:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return nn.Sequential(lin)


def _effective_weight(model: nn.Module, in_features: int) -> torch.Tensor:
    """The weight a (fake-)quantized linear layer really multiplies by: y = I·Wᵀ for the identity input."""
    with torch.no_grad():
        return model(torch.eye(in_features)).t()


def test_int4_symmetric_group_rtn_exact_values():
    # Two groups of 4 with power-of-two scales: scale = max|w| / 7.5, q = clamp(round(w/scale), -8, 7).
    # group 1: max 1.875 -> scale 0.25; w/scale = [7.5, -1.2, 2.4, 0.4] -> [7 (clamped 8), -1, 2, 0]
    # group 2: max 0.9375 -> scale 0.125; w/scale = [-7.5, 1.6, 2.64, -0.4] -> [-8, 2, 3, 0]
    w = torch.tensor([[1.875, -0.3, 0.6, 0.1, -0.9375, 0.2, 0.33, -0.05]])
    expected = torch.tensor([[1.75, -0.25, 0.5, 0.0, -1.0, 0.25, 0.375, 0.0]])
    model = prepare_qat(_linear(w), bits=4, group_size=4)
    assert torch.equal(_effective_weight(model, 8), expected)
    scales = torch.tensor([0.25] * 4 + [0.125] * 4)
    assert bool(((w - expected).abs() <= scales / 2 + 1e-7).all())
    convert_qat(model, bits=4, group_size=4)  # real int codes + scales compute the same weight
    assert torch.equal(_effective_weight(model, 8), expected)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, None), (8, 32), (3, 16)])
def test_rtn_error_is_at_most_half_a_step_per_group(bits, group_size):
    torch.manual_seed(0)
    w = torch.randn(16, 64) * torch.logspace(-2, 0, 16)[:, None]  # rows of very different magnitude
    model = prepare_qat(_linear(w), bits=bits, group_size=group_size)
    q = _effective_weight(model, 64)
    g = group_size or 64
    groups_w, groups_q = w.view(16, -1, g), q.view(16, -1, g)
    amax = groups_w.abs().amax(-1, keepdim=True)
    scale = amax / ((2**bits - 1) / 2)
    ulps = 4 * torch.finfo(torch.float32).eps * amax  # float rounding of w/scale and q·scale
    assert bool(((groups_w - groups_q).abs() <= scale / 2 + ulps).all())
    levels = groups_q / scale  # on the integer grid −2^(b−1) .. 2^(b−1)−1
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert levels.min() >= -(2 ** (bits - 1)) - 1e-4 and levels.max() <= 2 ** (bits - 1) - 1 + 1e-4
    assert not torch.equal(q, w)


def test_straight_through_gradient_reaches_latent_weights():
    torch.manual_seed(0)
    w = torch.randn(6, 8)
    model = prepare_qat(_linear(w), bits=4, group_size=4)
    x, c = torch.randn(5, 8), torch.randn(5, 6)
    (model(x) * c).sum().backward()
    # y = x·Q(w)ᵀ, L = Σ c∘y  =>  ∂L/∂Q(w) = cᵀx; the STE passes it unchanged to the latent weight...
    latent, expected = model[0].weight, c.t() @ x
    # ...except where torchao's clipped STE masks it: only a group's positive maximum can clip
    # (max/scale = 7.5 may round to 8 > q_max = 7), so every other entry must match exactly.
    groups = w.view(6, 2, 4)
    positive_absmax = (groups == groups.abs().amax(-1, keepdim=True)) & (groups > 0)
    clippable = positive_absmax.view(6, 8)
    assert torch.allclose(latent.grad[~clippable], expected[~clippable], atol=1e-5)
    at_max = latent.grad[clippable]
    assert bool(((at_max == 0) | torch.isclose(at_max, expected[clippable], atol=1e-5)).all())
    assert torch.equal(latent.detach(), w)  # the latent fp weights are kept, only the forward is quantized


def test_fake_quantized_llama_matches_converted_and_reloads(tmp_path):
    torch.manual_seed(0)
    fp = load_causal_lm({}, vocab_size=259, seed=0).eval()
    ids = torch.randint(3, 259, (2, 12))
    fake = prepare_qat(load_causal_lm({}, vocab_size=259, seed=0).eval(), bits=4, group_size=32)
    with torch.no_grad():
        fake_logits = fake(ids).logits
        assert (fake_logits - fp(ids).logits).abs().max() > 1e-4  # quantization changed something
        real = quantize_rtn(fp, bits=4, group_size=32)
        assert torch.equal(real(ids).logits, fake_logits)
    assert type(real.model.layers[0].mlp.up_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert isinstance(real.lm_head.weight, nn.Parameter)  # lm_head kept in full precision
    out = save_quantized(real, tmp_path / "int4", bits=4, group_size=32)
    loaded = load_causal_lm(str(out))
    assert type(loaded.model.layers[0].self_attn.q_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, fake_logits)


def test_gpt2_conv1d_converted_to_equivalent_linear():
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32,
                                       bos_token_id=1, eos_token_id=1)).eval()
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        before = model(ids).logits
        assert conv1d_to_linear(model) == 4  # c_attn, c_proj (attention), c_fc, c_proj (mlp)
        assert not any(isinstance(m, Conv1D) for m in model.modules())
        assert torch.allclose(model(ids).logits, before, atol=1e-5)
    prepare_qat(model, bits=8, group_size=16)
    assert type(model.transformer.h[0].mlp.c_fc).__name__ == "FakeQuantizedLinear"


@pytest.mark.parametrize("bits", [1, 9, 16])
def test_unsupported_bit_widths_raise(bits):
    with pytest.raises(ValueError, match=f"bits={bits} is not supported"):
        prepare_qat(_linear(torch.randn(4, 8)), bits=bits, group_size=4)


def test_group_size_must_divide_input_width():
    with pytest.raises(ValueError, match=r"group_size=48 does not divide the input width 64 of layer '0'"):
        prepare_qat(_linear(torch.randn(4, 64)), bits=4, group_size=48)


def test_unsupported_layer_type_is_named():
    model = nn.Sequential(nn.Linear(8, 8), nn.Conv2d(1, 2, 3))
    with pytest.raises(ValueError, match=r"layer '1' of type Conv2d holds a 4-D weight"):
        prepare_qat(model, bits=4, group_size=4)


def test_tied_lm_head_cannot_be_quantized():
    model = load_causal_lm({"tie_word_embeddings": True}, vocab_size=259, seed=0)
    with pytest.raises(ValueError, match="shares its weight with the input embedding"):
        prepare_qat(model, bits=4, group_size=32, include_lm_head=True)


def test_convert_without_prepare_and_save_unconverted_raise(tmp_path):
    with pytest.raises(ValueError, match="run prepare_qat first"):
        convert_qat(_linear(torch.randn(4, 8)))
    model = prepare_qat(load_causal_lm({}, vocab_size=259, seed=0), bits=4, group_size=32)
    with pytest.raises(ValueError, match="still fake-quantized"):
        save_quantized(model, tmp_path / "x", bits=4, group_size=32)


def test_quantization_tag():
    assert quantization_tag(4, 32) == "int4-g32"
    assert quantization_tag(8, None, include_lm_head=True) == "int8-perchannel+lm_head"
