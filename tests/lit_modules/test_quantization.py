"""Weight-only quantizers (lm/quantization.py): the grids of RTN/HQQ/GPTQ/AWQ against independent math and GPTQ's
reference implementation, RTN's grid recomputed from the latent weights vs the fixed grids of the others,
straight-through gradients, QAT → export → reload equality for every quantizer, GPT-2 Conv1D, bad input."""

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lm.hf import load_causal_lm
from lm.quantization import (FIXED_GRID, QUANTIZERS, FixedGridFakeQuantLinear, QuantizerConfig, awq_fold_scales,
                             conv1d_to_linear, convert_qat, fake_quantized_layers, gptq_quantize_weight, prepare_qat,
                             ptq_grids, quantize, quantize_rtn, save_quantized)
from tiny_models import TINY

FIXTURES = Path(__file__).with_name("fixtures")


def _linear(weight: torch.Tensor) -> nn.Sequential:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return nn.Sequential(lin)


def _on_grid(latent: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int | None) -> nn.Sequential:
    """One :class:`FixedGridFakeQuantLinear` with these latent weights on this grid."""
    return nn.Sequential(FixedGridFakeQuantLinear.from_linear(_linear(latent)[0], latent, scale, bits, group_size))


def _effective_weight(model: nn.Module, in_features: int) -> torch.Tensor:
    """The weight a (fake-)quantized linear layer really multiplies by: y = I·Wᵀ for the identity input."""
    with torch.no_grad():
        return model(torch.eye(in_features)).t()


def _tiny(seed: int = 0):
    return load_causal_lm(TINY, vocab_size=259, seed=seed).eval()


def _calibration(n: int = 6, length: int = 16, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 259, (length,), generator=g) for _ in range(n)]


def test_int4_symmetric_group_rtn_exact_values():
    # Two groups of 4 with power-of-two scales: scale = max|w| / 7.5, q = clamp(round(w/scale), -8, 7).
    # group 1: max 1.875 -> scale 0.25; w/scale = [7.5, -1.2, 2.4, 0.4] -> [7 (clamped 8), -1, 2, 0]
    # group 2: max 0.9375 -> scale 0.125; w/scale = [-7.5, 1.6, 2.64, -0.4] -> [-8, 2, 3, 0]
    w = torch.tensor([[1.875, -0.3, 0.6, 0.1, -0.9375, 0.2, 0.33, -0.05]])
    expected = torch.tensor([[1.75, -0.25, 0.5, 0.0, -1.0, 0.25, 0.375, 0.0]])
    model = prepare_qat(_linear(w), QuantizerConfig("rtn", 4, 4))
    assert torch.equal(_effective_weight(model, 8), expected)
    convert_qat(model)  # real int codes + scales compute the same weight
    assert torch.equal(_effective_weight(model, 8), expected)
    assert model[0].weight.qdata.tolist() == [[7, -1, 2, 0, -8, 2, 3, 0]]
    assert torch.equal(model[0].weight.scale.reshape(1, 2), torch.tensor([[0.25, 0.125]]))


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, None), (8, 32), (3, 16), (2, 16)])
def test_rtn_error_is_at_most_half_a_step_per_group(bits, group_size):
    torch.manual_seed(0)
    w = torch.randn(16, 64) * torch.logspace(-2, 0, 16)[:, None]  # rows of very different magnitude
    q = _effective_weight(prepare_qat(_linear(w), QuantizerConfig("rtn", bits, group_size)), 64)
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


def test_rtn_recomputes_its_scale_from_the_latent_weights_in_training_and_export():
    """RTN's grid is a function of the weights: a latent update past the group's old maximum rescales the group in
    the fake-quantized forward and in the export alike (a fixed grid would keep scale 0.25 and give
    [1.75, −2.0, 0.5, −0.25])."""
    w = torch.tensor([[1.875, -0.3, 0.6, 0.1]])  # scale 1.875/7.5 = 0.25
    model = prepare_qat(_linear(w), QuantizerConfig("rtn", 4, 4))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.75, -2.1, 0.62, -0.13]]))
    # new scale 3.75/7.5 = 0.5: w/s = [7.5, −4.2, 1.24, −0.26] -> codes [7 (8 clamped), −4, 1, 0]
    expected = torch.tensor([[3.5, -2.0, 0.5, 0.0]])
    assert torch.equal(_effective_weight(model, 4), expected)
    convert_qat(model)
    assert torch.equal(model[0].weight.scale.reshape(1, 1), torch.tensor([[0.5]]))
    assert torch.equal(_effective_weight(model, 4), expected)


def test_rtn_straight_through_gradient_reaches_latent_weights():
    torch.manual_seed(0)
    w = torch.randn(6, 8)
    model = prepare_qat(_linear(w), QuantizerConfig("rtn", 4, 4))
    x, c = torch.randn(5, 8), torch.randn(5, 6)
    (model(x) * c).sum().backward()
    # y = x·Q(w)ᵀ, L = Σ c∘y  =>  ∂L/∂Q(w) = cᵀx; the STE passes it unchanged to the latent weight...
    latent, expected = model[0].weight, c.t() @ x
    # ...except where torchao's clipped STE masks it: only a group's positive maximum can clip
    # (max/scale = 7.5 may round to 8 > q_max = 7), so every other entry must match exactly.
    groups = w.view(6, 2, 4)
    clippable = ((groups == groups.abs().amax(-1, keepdim=True)) & (groups > 0)).view(6, 8)
    assert torch.allclose(latent.grad[~clippable], expected[~clippable], atol=1e-5)
    at_max = latent.grad[clippable]
    assert bool(((at_max == 0) | torch.isclose(at_max, expected[clippable], atol=1e-5)).all())
    assert torch.equal(latent.detach(), w)  # the latent fp weights are kept, only the forward is quantized


def test_fixed_grid_stays_fixed_and_straight_through_gradient_is_clipped_to_it():
    w = torch.tensor([[1.875, -0.3, 0.6, 0.1]])  # scale 0.25 (max/7.5), codes [7, -1, 2, 0]
    model = _on_grid(w, torch.tensor([[0.25]]), 4, 4)
    layer = model[0]
    with torch.no_grad():  # a latent update that RTN would answer with a new scale (max 3.0 -> 0.4)
        layer.weight.copy_(torch.tensor([[3.0, -2.1, 0.62, -0.13]]))
    # fixed grid: codes clamp(round(w/0.25), -8, 7) = [7 (12), -8, 2, -1] -> [1.75, -2.0, 0.5, -0.25]
    assert torch.equal(_effective_weight(model, 4), torch.tensor([[1.75, -2.0, 0.5, -0.25]]))
    x, c = torch.randn(5, 4), torch.randn(5, 1)
    (model(x) * c).sum().backward()
    # ∂L/∂Q(w) = cᵀx passes to the latent weight where round(w/scale) is inside [-8, 7], zero where clamped:
    # round(3.0/0.25) = 12 > 7 and round(-2.1/0.25) = -8 (inside)
    expected = (c.t() @ x) * torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    assert torch.allclose(layer.weight.grad, expected, atol=1e-6)
    assert torch.equal(layer.scale, torch.tensor([[0.25]]))
    assert torch.equal(_effective_weight(convert_qat(model), 4), torch.tensor([[1.75, -2.0, 0.5, -0.25]]))


def test_learned_scale_gets_the_lsq_gradient_and_is_exported():
    w = torch.tensor([[1.875, -0.3, 0.6, 0.1]])  # scale 0.25: w/s = [7.5, -1.2, 2.4, 0.4], codes [7 (8), -1, 2, 0]
    model = _on_grid(w, torch.tensor([[0.25]]), 4, 4)
    model[0].learn_scale()
    assert isinstance(model[0].scale, nn.Parameter) and "0.scale" in model.state_dict()
    x, c = torch.randn(5, 4), torch.randn(5, 1)
    (model(x) * c).sum().backward()
    # ∂Q/∂s = round(w/s) − w/s inside the range, the clamped code outside: [7, 0.2, −0.4, −0.4]
    g = (c.t() @ x)[0]
    expected = (g * torch.tensor([7.0, 0.2, -0.4, -0.4])).sum()
    assert torch.allclose(model[0].scale.grad, expected.view(1, 1), atol=1e-5)
    with torch.no_grad():
        model[0].scale.fill_(0.2)  # a trained scale: codes clamp(round(w/0.2)) = [7 (9), -2 (-1.5), 3, 0 (0.5)]
    fake = _effective_weight(model, 4)
    assert torch.allclose(fake, torch.tensor([[1.4, -0.4, 0.6, 0.0]]))
    assert torch.equal(_effective_weight(convert_qat(model), 4), fake)


def test_gptq_matches_the_reference_implementation():
    """Against outputs of IST-DASLab/gptq's GPTQ.fasterquant (fixtures/make_gptq_reference.py): same Hessian
    (torchao's observer vs the reference's add_batch), same error propagation, same group grids."""
    from torchao.prototype.gptq.observer import GPTQObserverTensor

    ref = json.loads((FIXTURES / "gptq_reference.json").read_text())
    weight, inputs = torch.tensor(ref["weight"]), [torch.tensor(x) for x in ref["inputs"]]
    observed = GPTQObserverTensor.from_hp(weight.clone())
    for x in inputs:
        torch.nn.functional.linear(x, observed)
    xs = torch.cat([x.reshape(-1, 32) for x in inputs])
    assert torch.allclose(observed.hessian, 2 / len(inputs) * xs.t() @ xs, rtol=1e-5, atol=1e-4)
    rtn_differs = 0
    for case in ref["cases"]:
        group = None if case["groupsize"] == -1 else case["groupsize"]
        latent, scale = gptq_quantize_weight(weight, observed.hessian, case["bits"], group,
                                             lazy_block=case["blocksize"])
        model = _on_grid(latent, scale, case["bits"], group)
        ours, expected = _effective_weight(model, 32), torch.tensor(case["quantized"])
        assert torch.allclose(ours, expected, atol=1e-5), case
        rtn = _effective_weight(prepare_qat(_linear(weight), QuantizerConfig("rtn", case["bits"], group)), 32)
        rtn_differs += not torch.allclose(rtn, expected, atol=1e-5)
    assert rtn_differs == len(ref["cases"])  # the fixture exercises GPTQ's updates, not plain rounding


def _calibration_inputs(in_features: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_features, in_features, generator=g) / 3 + torch.eye(in_features)
    return torch.randn(256, in_features, generator=g) @ mix * torch.logspace(-1, 0.5, in_features)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_output_error_and_hqq_weight_error_are_below_rtn(bits):
    """Each method's own objective on a layer with calibration data: GPTQ ‖XWᵀ − XQᵀ‖², HQQ ‖W − Q‖² below
    RTN's."""
    torch.manual_seed(0)
    w, x = torch.randn(32, 64), _calibration_inputs(64)
    rtn = _effective_weight(prepare_qat(_linear(w), QuantizerConfig("rtn", bits, 16)), 64)
    latent, scale = gptq_quantize_weight(w, 2 / 256 * x.t() @ x, bits, 16)
    gptq = _effective_weight(_on_grid(latent, scale, bits, 16), 64)
    assert ((x @ (w - gptq).t()) ** 2).sum() < ((x @ (w - rtn).t()) ** 2).sum()
    hqq = _effective_weight(prepare_qat(_linear(w), QuantizerConfig("hqq", bits, 16)), 64)
    assert ((w - hqq) ** 2).sum() < ((w - rtn) ** 2).sum()


def test_hqq_scale_is_a_fixed_point_of_its_least_squares_update():
    """HQQ's scale-only solver alternates q = clamp(round(w/s)) and s = ⟨w, q⟩/⟨q, q⟩: at its answer, the
    least-squares scale of its own codes is the scale itself."""
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    model = prepare_qat(_linear(w), QuantizerConfig("hqq", 3, 16))
    scale = model[0].scale
    codes = (_effective_weight(model, 64) / scale.repeat_interleave(16, 1)).round()
    wg, qg = w.view(8, 4, 16), codes.view(8, 4, 16)
    ls = (wg * qg).sum(-1) / (qg * qg).sum(-1)
    assert torch.allclose(ls, scale, rtol=1e-4)
    assert not torch.allclose(scale, w.view(8, 4, 16).abs().amax(-1) / 3.5, rtol=1e-3)  # not RTN's scale


def test_awq_folding_keeps_the_function_and_lowers_the_group_output_error():
    fp, cal = _tiny(), _calibration()
    ids = torch.randint(3, 259, (2, 12))
    inputs = {}
    layer = fp.model.layers[0]
    hook = layer.mlp.down_proj.register_forward_hook(lambda m, a, o: inputs.setdefault("x", []).append(a[0]))
    with torch.no_grad():
        before = fp(ids).logits
        for c in cal:
            fp(c[None])
    hook.remove()
    x = torch.cat([t.reshape(-1, 64) for t in inputs["x"]])
    config = QuantizerConfig("awq", 3, 16)
    awq = copy.deepcopy(fp)
    scales = awq_fold_scales(awq, config, cal)
    assert set(scales) == {f"model.layers.0.{n}" for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj",
                                                            "mlp.down_proj")}
    with torch.no_grad():
        assert torch.allclose(awq(ids).logits, before, atol=1e-5)  # an equivalence transform in full precision
    s = scales["model.layers.0.mlp.down_proj"]
    assert not torch.allclose(s, torch.ones_like(s))
    down = awq.model.layers[0].mlp.down_proj
    assert torch.allclose(down.weight, layer.mlp.down_proj.weight * s)
    rtn3 = QuantizerConfig("rtn", 3, 16)
    rtn = _effective_weight(prepare_qat(_linear(layer.mlp.down_proj.weight.detach()), rtn3), 64)
    q_awq = _effective_weight(prepare_qat(_linear(down.weight.detach()), rtn3), 64)
    with torch.no_grad():
        target = x @ layer.mlp.down_proj.weight.t()
        assert (((x / s) @ q_awq.t() - target) ** 2).sum() < ((x @ rtn.t() - target) ** 2).sum()


@pytest.mark.parametrize("name", QUANTIZERS)
def test_trained_fake_quantized_model_equals_the_exported_and_reloaded_one(name, tmp_path):
    fp, cal = _tiny(), _calibration()
    ids = torch.randint(3, 259, (2, 12))
    config = QuantizerConfig(name, 3, 16)
    fake = prepare_qat(copy.deepcopy(fp), config, cal)
    ptq = quantize(fp, config, cal)
    with torch.no_grad():
        assert torch.equal(fake(ids).logits, ptq(ids).logits)  # QAT starts from the PTQ model
        assert (fake(ids).logits - fp(ids).logits).abs().max() > 1e-4
    layers = fake_quantized_layers(fake)
    latents = [m.weight for m in layers]
    fixed = name in FIXED_GRID
    assert len(layers) == 7 and all(isinstance(m, FixedGridFakeQuantLinear) == fixed for m in layers)
    scales = [m.scale.clone() for m in layers if fixed]
    opt = torch.optim.SGD(latents, lr=0.5)
    for _ in range(2):  # train through the fake quantizer until some code moves
        opt.zero_grad()
        fake(ids, labels=ids).loss.backward()
        opt.step()
    fake.eval()
    assert all(torch.equal(a, m.scale) for a, m in zip(scales, layers))  # hqq/gptq: the PTQ grid stays
    with torch.no_grad():
        trained = fake(ids).logits
        assert not torch.equal(trained, ptq(ids).logits)
        real = convert_qat(copy.deepcopy(fake))
        assert torch.equal(real(ids).logits, trained)
    up = real.model.layers[0].mlp.up_proj.weight
    if not fixed:  # rtn, awq: the export's scales are RTN's of the trained (folded) latent weights: max|w_g| / 3.5
        trained_up = fake.model.layers[0].mlp.up_proj.weight.detach()
        rtn_scale = trained_up.view(trained_up.shape[0], -1, 16).abs().amax(-1) / 3.5
        assert torch.allclose(up.scale.reshape(rtn_scale.shape), rtn_scale, rtol=1e-6)
        start = prepare_qat(copy.deepcopy(fp), config, cal).model.layers[0].mlp.up_proj.weight.detach()
        assert not torch.allclose(rtn_scale, start.view(start.shape[0], -1, 16).abs().amax(-1) / 3.5, rtol=1e-6)
    assert type(up).__name__ == "IntxUnpackedToInt8Tensor"
    assert isinstance(real.lm_head.weight, nn.Parameter)  # lm_head kept in full precision
    loaded = load_causal_lm(str(save_quantized(real, tmp_path / name, config)))
    assert type(loaded.model.layers[0].self_attn.q_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, trained)


def test_gptq_full_model_uses_the_calibration_hessian():
    fp = _tiny()
    a = ptq_grids(copy.deepcopy(fp), QuantizerConfig("gptq", 3, 16), _calibration(seed=1))
    b = ptq_grids(copy.deepcopy(fp), QuantizerConfig("gptq", 3, 16), _calibration(seed=2))
    name = "model.layers.0.mlp.down_proj"
    assert not torch.equal(a[name][0], b[name][0])  # other calibration data, other updates
    assert not torch.equal(a[name][0], fp.get_submodule(name).weight)


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
    with pytest.raises(ValueError, match="quantizer='awq' .* Llama-style decoder layers"):
        prepare_qat(copy.deepcopy(model), QuantizerConfig("awq", 4, 16), [torch.arange(8)])
    prepare_qat(model, QuantizerConfig("hqq", 8, 16))
    assert isinstance(model.transformer.h[0].mlp.c_fc, FixedGridFakeQuantLinear)


@pytest.mark.parametrize("kwargs,message", [
    ({"name": "gguf"}, r"quantizer name 'gguf' is unknown: choose one of rtn, hqq, gptq, awq"),
    ({"name": "gptq", "bits": 1}, r"quantizer bits=1 is not supported by 'gptq'"),
    ({"bits": 9}, r"quantizer bits=9 is not supported by 'rtn'"),
    ({"group_size": 1}, r"quantizer group_size must be an integer >= 2"),
    ({"name": "awq", "calibration": "heldout"}, r"quantizer calibration must be one of"),
])
def test_bad_quantizer_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantizerConfig(**kwargs)


def test_group_size_must_divide_input_width_and_calibration_is_required():
    with pytest.raises(ValueError, match=r"quantizer group_size=48 does not divide the input width 64 of layer '0'"):
        prepare_qat(_linear(torch.randn(4, 64)), QuantizerConfig("rtn", 4, 48))
    with pytest.raises(ValueError, match="quantizer name 'gptq' needs calibration"):
        prepare_qat(_linear(torch.randn(4, 64)), QuantizerConfig("gptq", 4, 16))


def test_unsupported_layer_type_is_named():
    model = nn.Sequential(nn.Linear(8, 8), nn.Conv2d(1, 2, 3))
    with pytest.raises(ValueError, match=r"layer '1' of type Conv2d holds a 4-D weight"):
        prepare_qat(model, QuantizerConfig("rtn", 4, 4))


def test_tied_lm_head_cannot_be_quantized():
    model = load_causal_lm({**TINY, "tie_word_embeddings": True}, vocab_size=259, seed=0)
    with pytest.raises(ValueError, match="shares its weight with the input embedding"):
        prepare_qat(model, QuantizerConfig("rtn", 4, 32, include_lm_head=True))


def test_convert_without_prepare_and_save_unconverted_raise(tmp_path):
    with pytest.raises(ValueError, match="run prepare_qat first"):
        convert_qat(_linear(torch.randn(4, 8)))
    model = prepare_qat(_tiny(), QuantizerConfig())
    with pytest.raises(ValueError, match="still fake-quantized"):
        save_quantized(model, tmp_path / "x", QuantizerConfig())


def test_quantize_rtn_is_the_rtn_quantizer():
    fp, ids = _tiny(), torch.randint(3, 259, (1, 8))
    with torch.no_grad():
        assert torch.equal(quantize_rtn(fp, 4, 32)(ids).logits, quantize(fp, QuantizerConfig("rtn", 4, 32))(ids).logits)


def test_tag_and_cache_key():
    assert QuantizerConfig("rtn", 4, 32).tag == "rtn-int4-g32"
    assert QuantizerConfig("gptq", 8, None, include_lm_head=True).tag == "gptq-int8-perchannel+lm_head"
    assert "calibration" not in QuantizerConfig("hqq").key()
    assert QuantizerConfig("gptq").key() != QuantizerConfig("gptq", calibration_seed=1).key()
    assert "percdamp" in QuantizerConfig("gptq").key() and "awq_grid" not in QuantizerConfig("gptq").key()
