"""AdEMAMix against hand-computed updates, closed-form schedules, AdamW (α = 0) and itself across paths/resumes.

Expected values are computed here with plain Python floats from docs/papers.md §5:
m1 ← β1 m1 + (1−β1) g;  m2 ← β3 m2 + (1−β3) g;  ν ← β2 ν + (1−β2) g²;
θ ← θ − η[(m1/(1−β1^t) + α m2)/(√(ν/(1−β2^t)) + ε) + λθ].
"""

import math
from pathlib import Path

import pytest
import torch
import yaml

import cli
from optimizers import AdEMAMix, alpha_schedule, beta3_schedule
from optimizers.ademamix import CPU_BLOCK_NUMEL, cache_blocks

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "ademamix"
PATHS = [dict(foreach=False), dict(foreach=True), dict(fused=True)]
PATH_IDS = ["loop", "foreach", "compiled"]


def reference_trajectory(theta, grads, lr, b1, b2, b3, alpha, eps, wd, t_alpha=None, t_beta3=None):
    """Scalar AdEMAMix written out with floats; the schedules are written out here too (not imported)."""
    m1 = m2 = nu = 0.0
    for t, g in enumerate(grads, start=1):
        a = alpha if t_alpha is None else min(t * alpha / t_alpha, alpha)
        if t_beta3 is None or t >= t_beta3:
            beta3 = b3
        else:
            x = t / t_beta3
            beta3 = min(math.exp(math.log(b1) * math.log(b3) / ((1 - x) * math.log(b3) + x * math.log(b1))), b3)
        m1 = b1 * m1 + (1 - b1) * g
        m2 = beta3 * m2 + (1 - beta3) * g
        nu = b2 * nu + (1 - b2) * g * g
        m1_hat = m1 / (1 - b1 ** t) if b1 > 0 else g
        theta = theta - lr * ((m1_hat + a * m2) / (math.sqrt(nu / (1 - b2 ** t)) + eps) + wd * theta)
    return theta


def run_optimizer(theta0, grad_seq, **kwargs):
    p = torch.nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
    opt = AdEMAMix([p], **kwargs)
    for g in grad_seq:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    return p.detach().tolist(), opt


@pytest.mark.parametrize("path", PATHS[:2], ids=PATH_IDS[:2])  # compiled: covered by the ten-step test
def test_one_step_matches_hand_computed_value(path):
    # t = 1, g = 0.5, θ = 1, η = 0.1, β = (0.9, 0.999, 0.99), α = 2, λ = 0.1, ε = 1e-8:
    # m1 = 0.05 → m̂1 = 0.5; m2 = 0.005; ν = 0.00025 → √ν̂ = 0.5;
    # update = (0.5 + 2·0.005)/(0.5 + 1e-8) + 0.1·1 = 0.51/0.50000001 + 0.1 ≈ 1.12; θ = 1 − 0.1·update.
    expected = 1.0 - 0.1 * (0.51 / 0.50000001 + 0.1)
    assert expected == pytest.approx(0.888000002, abs=1e-9)
    (theta,), _ = run_optimizer([1.0], [[0.5]], lr=0.1, betas=(0.9, 0.999, 0.99), alpha=2.0, weight_decay=0.1,
                                **path)
    assert theta == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_ten_steps_with_schedules_match_scalar_reference(path):
    grads = [[0.3, -1.2, 0.05], [-0.7, 0.4, 0.2], [1.5, 0.0, -0.3], [0.1, 0.9, 0.6], [-0.2, -0.5, 1.1],
             [0.8, 0.3, -0.9], [-1.0, 0.7, 0.4], [0.25, -0.6, 0.0], [0.6, 0.2, -0.4], [-0.3, 1.0, 0.5]]
    hyper = dict(lr=0.05, b1=0.9, b2=0.95, b3=0.999, alpha=5.0, eps=1e-8, wd=0.1, t_alpha=6, t_beta3=6)
    theta0 = [1.0, -0.5, 2.0]
    expected = [reference_trajectory(theta0[i], [g[i] for g in grads], **hyper) for i in range(3)]
    got, opt = run_optimizer(theta0, grads, lr=0.05, betas=(0.9, 0.95, 0.999), alpha=5.0, eps=1e-8, weight_decay=0.1,
                             t_alpha=6, t_beta3=6, **path)
    assert got == pytest.approx(expected, abs=1e-12)
    assert opt.state[opt.param_groups[0]["params"][0]]["step"] == 10


def test_schedules_closed_forms():
    # α(t) = min(tα/T, α), T = 100, α = 8: t = 0, T/2, T, 2T → 0, 4, 8, 8.
    assert [alpha_schedule(t, 8.0, 100) for t in (0, 50, 100, 200)] == [0.0, 4.0, 8.0, 8.0]
    assert alpha_schedule(7, 8.0, None) == 8.0
    # β3(T/2) with β_start = 0.9, β3 = 0.999: exp(ln0.9·ln0.999/(½ln0.999 + ½ln0.9))
    #   = exp((−0.105360516)(−0.0010005003)/(−0.0531805082)) = exp(−0.00198218) = 0.99801979
    values = [beta3_schedule(t, 0.9, 0.999, 100) for t in (0, 50, 100, 200)]
    assert values[0] == pytest.approx(0.9, abs=1e-12)
    assert values[1] == pytest.approx(0.99801979, abs=1e-8)
    assert values[2] == 0.999 and values[3] == 0.999
    # Same half-life view: half-life h(β) = ln0.5/lnβ is linear in t (h(0.9)=6.579, h(0.999)=692.801).
    half_life = lambda b: math.log(0.5) / math.log(b)  # noqa: E731
    assert half_life(values[1]) == pytest.approx((6.5788 + 692.8005) / 2, abs=1e-3)
    # β_start = 0 is the limit β3^(T/t): at T/2, 0.999² = 0.998001.
    assert beta3_schedule(50, 0.0, 0.999, 100) == pytest.approx(0.998001, abs=1e-12)
    assert beta3_schedule(0, 0.0, 0.999, 100) == 0.0 and beta3_schedule(3, 0.9, 0.999, None) == 0.999


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_beta1_zero_allocates_no_fast_ema_and_uses_the_raw_gradient(path):
    (theta,), opt = run_optimizer([1.0], [[0.5], [-0.25]], lr=0.1, betas=(0.0, 0.9, 0.99), alpha=1.0, **path)
    state = opt.state[opt.param_groups[0]["params"][0]]
    assert set(state) == {"step", "exp_avg_slow", "exp_avg_sq"}
    # t=1: m2 = 0.005, ν = 0.025, ν̂ = 0.25 → θ = 1 − 0.1·(0.5 + 0.005)/(0.5 + 1e-8)
    # t=2: m2 = 0.99·0.005 − 0.0025 = 0.00245, ν = 0.0225 + 0.00625 = 0.02875, ν̂ = 0.02875/0.19
    t1 = 1 - 0.1 * 0.505 / (0.5 + 1e-8)
    t2 = t1 - 0.1 * (-0.25 + 0.00245) / (math.sqrt(0.02875 / 0.19) + 1e-8)
    assert theta == pytest.approx(t2, abs=1e-12)


def test_alpha_zero_is_adamw():
    # With α = 0 the slow EMA drops out: θ ← θ − η[m̂1/(√ν̂ + ε) + λθ] is exactly torch.optim.AdamW.
    torch.manual_seed(0)
    shapes = [(4, 3), (5,), (2, 2, 2)]
    ours = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_a = AdEMAMix(ours, lr=0.01, betas=(0.9, 0.99, 0.999), alpha=0.0, weight_decay=0.1)
    opt_b = torch.optim.AdamW(theirs, lr=0.01, betas=(0.9, 0.99), weight_decay=0.1, eps=1e-8)
    for _ in range(20):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt_a.step()
        opt_b.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def random_problem(dtype=torch.float64, seed=0):
    """Small tensors, one bigger than a CPU cache block (split into slices) and one non-contiguous (kept whole)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(16, 8), (8,), (CPU_BLOCK_NUMEL + 1000,), (3, 5, 2), (1,), (8, 5)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]
    params[-1] = torch.nn.Parameter(params[-1].detach().t())
    grads = [[torch.randn(p.shape, generator=gen, dtype=dtype) for p in params] for _ in range(30)]
    return params, grads


def test_cache_blocks_cover_every_element_once():
    a, b = torch.arange(10.0), torch.arange(10.0, 12.0)
    c = torch.arange(12.0, 18.0).view(2, 3).t()  # non-contiguous: never sliced
    blocks = list(cache_blocks([a, b, c], None, [a * 10, b * 10, c * 10], block=4))
    assert all(middle is None for _, middle, _ in blocks)
    sizes = [sum(t.numel() for t in first) for first, _, _ in blocks]
    assert sizes == [4, 4, 4, 6]  # a[0:4], a[4:8], a[8:10]+b, c
    flat = torch.cat([t.reshape(-1) for first, _, _ in blocks for t in first])
    assert sorted(flat.tolist()) == list(range(18))
    for first, _, third in blocks:
        for x, y in zip(first, third):
            torch.testing.assert_close(y, x * 10)
    first, _, _ = blocks[0]
    first[0].fill_(-1.0)  # blocks are views: the update writes through to the parameters
    assert a[:4].tolist() == [-1.0] * 4


def make(params, **path):
    groups = [{"params": params[:3], "weight_decay": 0.1}, {"params": params[3:], "weight_decay": 0.0, "lr": 0.02}]
    return AdEMAMix(groups, lr=0.01, betas=(0.9, 0.999, 0.999), alpha=5.0, t_alpha=12, t_beta3=12, **path)


def train(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


# float64: the three paths agree to 1e-12; float32: they differ only by the rounding of θ (~|θ|·2⁻²⁴ per step,
# ~3e-6 after 30 steps for |θ| ≈ 3), exactly as each differs from a float64 run.
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_paths_agree_over_many_steps(dtype, atol):
    results = []
    for path in PATHS:
        params, grads = random_problem(dtype)
        train(make(params, **path), params, grads)
        results.append(params)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=atol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_cuda_paths_agree_with_the_cpu_loop(dtype, atol):
    params, grads = random_problem(dtype)
    train(make(params, foreach=False), params, grads)
    for path in PATHS:
        cuda_params, cuda_grads = random_problem(dtype)
        cuda_params = [torch.nn.Parameter(p.detach().cuda()) for p in cuda_params]
        cuda_grads = [[g.cuda() for g in step] for step in cuda_grads]
        train(make(cuda_params, **path), cuda_params, cuda_grads)
        for a, b in zip(params, cuda_params):
            torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=0, atol=atol)


@pytest.mark.parametrize("path", PATHS[:2], ids=PATH_IDS[:2])
def test_resume_from_state_dict_continues_the_schedule(path):
    params, grads = random_problem()
    straight = make(params, **path)
    train(straight, params, grads[:20])

    params2, _ = random_problem()
    first = make(params2, **path)
    train(first, params2, grads[:10])
    saved = first.state_dict()
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params2]
    resumed = make(resumed_params, **path)
    resumed.load_state_dict(saved)
    assert resumed.state[resumed_params[0]]["step"] == 10
    train(resumed, resumed_params, grads[10:20])
    for a, b in zip(params, resumed_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_closure_is_evaluated_with_grad_and_its_loss_returned():
    p = torch.nn.Parameter(torch.tensor([3.0]))
    opt = AdEMAMix([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 9.0
    assert p.item() < 3.0


def test_sparse_and_complex_gradients_are_rejected():
    emb = torch.nn.Embedding(5, 2, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        AdEMAMix(emb.parameters()).step()
    z = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    z.grad = torch.ones_like(z)
    with pytest.raises(RuntimeError, match="complex"):
        AdEMAMix([z]).step()


@pytest.mark.parametrize("kwargs,name", [
    (dict(lr=-1e-3), "lr"), (dict(alpha=-1.0), "alpha"), (dict(eps=-1e-8), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(betas=(1.0, 0.999, 0.9999)), r"betas\[0\]"),
    (dict(betas=(0.9, -0.1, 0.9999)), r"betas\[1\]"), (dict(betas=(0.9, 0.999, 1.5)), r"betas\[2\]"),
    (dict(betas=(0.9, 0.999)), "betas"), (dict(t_alpha=0), "t_alpha"), (dict(t_beta3=-5), "t_beta3"),
    (dict(fused=True, foreach=True), "fused"),
])
def test_invalid_hyperparameters_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AdEMAMix([torch.nn.Parameter(torch.zeros(1))], **kwargs)


def test_invalid_param_group_override_is_rejected():
    with pytest.raises(ValueError, match="weight_decay"):
        AdEMAMix([{"params": [torch.nn.Parameter(torch.zeros(1))], "weight_decay": -1.0}])


def test_defaults_hold_every_constructor_argument():
    # `defaults` holds every argument, so a checkpoint's param_groups restore the full configuration.
    opt = AdEMAMix([torch.nn.Parameter(torch.zeros(1))], lr=0.5, t_alpha=7, t_beta3=9, foreach=False)
    assert set(opt.defaults) == {"lr", "betas", "alpha", "t_alpha", "t_beta3", "eps", "weight_decay", "foreach",
                                 "fused", "state_dtype"}
    clone = type(opt)([torch.nn.Parameter(torch.zeros(1))], **opt.defaults)
    assert clone.defaults == opt.defaults


FAST = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.callbacks", "[]", "--data.init_args.max_documents", "40"]


def test_quick_config_trains_with_ademamix_through_the_cli():
    run = cli.build_cli(["fit", "--config", str(CONFIGS / "quick.yaml"), *FAST])
    opt = run.trainer.optimizers[0]
    assert type(opt).__name__ == "AdEMAMix"
    assert opt.defaults["t_alpha"] == 300 and opt.defaults["betas"] == (0.9, 0.999, 0.999)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # the module's groups
    assert {s["step"] for s in opt.state.values()} == {2}
    assert math.isfinite(float(run.trainer.callback_metrics["val/loss"]))


def test_optimizer_short_name_resolves_on_the_adamw_config():
    run = cli.build_cli(["fit", "--config", str(CONFIGS / "quick_adamw.yaml"), "--optimizer", "AdEMAMix",
                         "--optimizer.lr", "1e-3", "--optimizer.t_alpha", "2", *FAST])
    opt = run.trainer.optimizers[0]
    assert type(opt).__name__ == "AdEMAMix" and opt.defaults["lr"] == 1e-3 and opt.defaults["alpha"] == 5.0


@pytest.mark.parametrize("name", ["quick.yaml", "paper_110m.yaml"])
def test_configs_parse(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_cli(["fit", "--config", str(CONFIGS / name), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    optimizer = config["model"]["init_args"]["optimizer"]  # the model's own argument (lit_modules/base.py)
    assert optimizer["class_path"] == "optimizers.AdEMAMix"
    assert optimizer["init_args"]["t_alpha"] == config["trainer"]["max_steps"]


# ------------------------------------------------------------------------------------------ low precision
def bf16(x: float) -> float:
    """Round a Python float to the nearest bfloat16 (round-to-nearest-even, as torch's cast)."""
    return torch.tensor(x, dtype=torch.float64).to(torch.bfloat16).item()


# The compiled path's state dtype and values are checked by the next-but-one test (2000 compiled steps take ~80 s).
@pytest.mark.parametrize("path,beta3,steps", [(dict(foreach=True), 0.9999, 20000), (dict(foreach=False), 0.999, 2000)],
                         ids=["foreach", "loop"])
def test_long_horizon_emas_of_bf16_parameters_match_the_closed_form(path, beta3, steps):
    # Constant g = 1 from zero state: m1 = 1 − β1^t, m2 = 1 − β3^t, ν = 1 − β2^t exactly (geometric series).
    # β3 = 0.9999, t = 20000: m2 = 1 − e^(20000·ln 0.9999) = 0.86468. A bf16 state stalls where (1 − β3)·g is
    # below half an ulp of m2: at 2⁻⁵ = 0.03125 for β3 = 0.9999 and at 0.25 for β3 = 0.999 (issue 11 §3).
    betas = (0.9, 0.999, beta3)
    expected = {"exp_avg_fast": 1 - 0.9 ** steps, "exp_avg_slow": 1 - beta3 ** steps, "exp_avg_sq": 1 - 0.999 ** steps}
    assert expected["exp_avg_slow"] == pytest.approx(0.864678 if beta3 == 0.9999 else 0.864800, abs=1e-6)
    low_p, full_p = (torch.nn.Parameter(torch.zeros(3, dtype=dtype)) for dtype in (torch.bfloat16, torch.float32))
    opt = AdEMAMix([low_p, full_p], lr=0.0, betas=betas, **path)  # lr = 0: only the state moves
    for _ in range(steps):
        low_p.grad, full_p.grad = torch.ones_like(low_p), torch.ones_like(full_p)
        opt.step()
    for key, value in expected.items():
        low, full = opt.state[low_p][key], opt.state[full_p][key]
        assert low.tolist() == pytest.approx([value] * 3, rel=1e-2)
        torch.testing.assert_close(low, full, rtol=1e-2, atol=0)
        assert low.dtype == torch.float32


def test_low_precision_state_where_asked_reproduces_the_stall():
    # state_dtype="param": m2 in bf16 stops at 0.25 for β3 = 0.999 (closed form 0.8648 after 2000 steps).
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    opt = AdEMAMix([p], lr=0.0, betas=(0.9, 0.999, 0.999), state_dtype="param")
    for _ in range(2000):
        p.grad = torch.ones_like(p)
        opt.step()
    assert opt.state[p]["exp_avg_slow"].dtype == torch.bfloat16
    assert opt.state[p]["exp_avg_slow"].tolist() == [0.25, 0.25]
    q = torch.nn.Parameter(torch.zeros(2))  # fp32 parameters, bf16 state on request
    q.grad = torch.ones_like(q)
    opt = AdEMAMix([q], state_dtype=torch.bfloat16)
    opt.step()
    assert {v.dtype for k, v in opt.state[q].items() if k != "step"} == {torch.bfloat16}


@pytest.mark.parametrize("path", PATHS, ids=PATH_IDS)
def test_bf16_parameter_update_is_the_fp32_update_rounded_once(path):
    # With fp32 state the update u_t is computed from exact EMAs of the (bf16-representable) gradients and
    # θ_t = bf16(θ_{t−1} − η·u_t): the scalar reference of this file with θ rounded to bf16 after each step.
    grads = [0.5, -0.25, 1.0, 0.75, -1.5, 0.125, 2.0, -0.5]
    lr, b1, b2, b3, alpha, wd = 0.05, 0.9, 0.99, 0.999, 5.0, 0.1
    theta, m1, m2, nu = [bf16(1.3), bf16(-0.7)], 0.0, 0.0, 0.0
    expected = []
    for t, g in enumerate(grads, start=1):
        m1, m2, nu = b1 * m1 + (1 - b1) * g, b3 * m2 + (1 - b3) * g, b2 * nu + (1 - b2) * g * g
        u = (m1 / (1 - b1 ** t) + alpha * m2) / (math.sqrt(nu / (1 - b2 ** t)) + 1e-8)
        theta = [bf16(th - lr * (u + wd * th)) for th in theta]
        expected.append(theta)
    p = torch.nn.Parameter(torch.tensor([1.3, -0.7], dtype=torch.bfloat16))
    opt = AdEMAMix([p], lr=lr, betas=(b1, b2, b3), alpha=alpha, weight_decay=wd, **path)
    for g, want in zip(grads, expected):
        p.grad = torch.full_like(p, g)
        opt.step()
        assert p.dtype == torch.bfloat16
        assert p.tolist() == want  # every step: the exactly rounded fp32 result, never a bf16-accumulated one
    # fp32 state (the compiled path's 1 − β3 is rounded in fp32: 1e-5 relative); a bf16 m2 would be off by ~4e-3
    assert opt.state[p]["exp_avg_slow"].dtype == torch.float32
    assert opt.state[p]["exp_avg_slow"].tolist() == pytest.approx([m2, m2], rel=1e-4)


@pytest.mark.parametrize("path", PATHS[:2], ids=PATH_IDS[:2])
def test_state_dict_round_trip_keeps_the_fp32_state_of_bf16_parameters(path):
    torch.manual_seed(0)
    grads = [torch.randn(5, dtype=torch.bfloat16) for _ in range(20)]

    def run(opt, p, gs):
        for g in gs:
            p.grad = g.clone()
            opt.step()

    p = torch.nn.Parameter(torch.ones(5, dtype=torch.bfloat16))
    straight = AdEMAMix([p], lr=0.01, betas=(0.9, 0.999, 0.9999), **path)
    run(straight, p, grads)
    q = torch.nn.Parameter(torch.ones(5, dtype=torch.bfloat16))
    first = AdEMAMix([q], lr=0.01, betas=(0.9, 0.999, 0.9999), **path)
    run(first, q, grads[:10])
    saved = first.state_dict()
    r = torch.nn.Parameter(q.detach().clone())
    resumed = AdEMAMix([r], lr=0.01, betas=(0.9, 0.999, 0.9999), **path)
    resumed.load_state_dict(saved)
    for key in ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq"):
        assert resumed.state[r][key].dtype == torch.float32  # torch's default would round it to bf16
        assert torch.equal(resumed.state[r][key], first.state[q][key])
        assert resumed.state[r][key].data_ptr() != saved["state"][0][key].data_ptr()
    run(resumed, r, grads[10:])
    assert torch.equal(r, p)
    assert torch.equal(resumed.state[r]["exp_avg_slow"], straight.state[p]["exp_avg_slow"])


def test_state_dict_saved_before_state_dtype_existed_loads_with_the_default():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    old = AdEMAMix([p], state_dtype="param")
    p.grad = torch.full_like(p, 0.5)
    old.step()
    saved = old.state_dict()
    for group in saved["param_groups"]:
        del group["state_dtype"]
    new = AdEMAMix([p])
    new.load_state_dict(saved)
    assert new.param_groups[0]["state_dtype"] is None
    assert new.state[p]["exp_avg_slow"].dtype == torch.float32  # the default rule, widened losslessly
    assert torch.equal(new.state[p]["exp_avg_slow"], old.state[p]["exp_avg_slow"].float())
    new.step()


def test_invalid_state_dtype_is_rejected():
    with pytest.raises(ValueError, match="state_dtype"):
        AdEMAMix([torch.nn.Parameter(torch.zeros(1))], state_dtype="int8")
    with pytest.raises(ValueError, match="state_dtype"):
        AdEMAMix([{"params": [torch.nn.Parameter(torch.zeros(1))], "state_dtype": torch.int32}])


# ------------------------------------------------------------------------------------- low-memory state
def bf16_neighbours(x: float) -> tuple[float, float]:
    """The bfloat16 values a ≤ x ≤ b next to a positive float32 x (a == b when x is one): truncation of the float32
    bit pattern, and that plus one bfloat16 ulp."""
    bits = torch.tensor([x], dtype=torch.float32).view(torch.int32).item()
    down = torch.tensor([bits & ~0xFFFF], dtype=torch.int32).view(torch.float32).item()
    up = down if bits & 0xFFFF == 0 else torch.tensor([(bits & ~0xFFFF) + 0x10000], dtype=torch.int32).view(
        torch.float32).item()
    return down, up


def test_stochastic_rounding_is_unbiased_between_the_two_bf16_neighbours():
    # x = 1 + 2⁻¹⁰ lies between the bf16 values 1 and 1 + 2⁻⁷, an eighth of the way up: P(up) = 1/8, E = x.
    from optimizers.ademamix import rounding_noise, stochastic_round_bf16_
    x = 1.0 + 2.0 ** -10
    n = 40000
    out = torch.empty(n, dtype=torch.bfloat16)
    stochastic_round_bf16_([out], [torch.full((n,), x)], rounding_noise(n, torch.device("cpu"), seed=3))
    assert set(out.float().unique().tolist()) == {1.0, 1.0 + 2.0 ** -7}
    share_up = (out.float() > 1.0).double().mean().item()
    assert share_up == pytest.approx(1 / 8, abs=4 * math.sqrt(1 / 8 * 7 / 8 / n))  # 4 binomial σ
    assert out.double().mean().item() == pytest.approx(x, abs=4 * 2.0 ** -7 * math.sqrt(1 / 8 * 7 / 8 / n))
    exact = torch.empty(3, dtype=torch.bfloat16)  # bf16-representable values (incl. negative) are kept as they are
    stochastic_round_bf16_([exact], [torch.tensor([0.75, -1.5, 0.0])], rounding_noise(3, torch.device("cpu"), 0))
    assert exact.tolist() == [0.75, -1.5, 0.0]


@pytest.mark.parametrize("path", PATHS[:2], ids=PATH_IDS[:2])
def test_low_memory_steps_are_the_fp32_update_of_the_stored_state(path):
    # Each step is the float32 update computed from the stored (bf16 m1/ν, fp32 m2) state; then m1 is stored rounded
    # to nearest and ν rounded to one of its two bf16 neighbours. Scalar reference: plain floats, formula of this file.
    grads = [0.5, -0.3, 1.1, 0.7, -0.9, 0.2]
    lr, b1, b2, b3, alpha, wd, eps = 0.05, 0.9, 0.99, 0.999, 5.0, 0.1, 1e-8
    values = [1.3, -0.7, 0.4]
    p = torch.nn.Parameter(torch.tensor(values))
    opt = AdEMAMix([p], lr=lr, betas=(b1, b2, b3), alpha=alpha, weight_decay=wd, eps=eps, state_dtype="low_memory",
                   **path)
    m1 = m2 = 0.0
    nus = [0.0] * 3  # ν is rounded stochastically, so each element has its own stored value
    for t, g in enumerate(grads, start=1):
        p.grad = torch.full_like(p, g)
        opt.step()
        m1, m2 = b1 * m1 + (1 - b1) * g, b3 * m2 + (1 - b3) * g
        nus = [b2 * nu + (1 - b2) * g * g for nu in nus]
        values = [v - lr * ((m1 / (1 - b1 ** t) + alpha * m2) / (math.sqrt(nu / (1 - b2 ** t)) + eps) + wd * v)
                  for v, nu in zip(values, nus)]
        state = opt.state[p]
        assert p.tolist() == pytest.approx(values, abs=1e-6)  # float32 arithmetic on θ
        assert state["exp_avg_fast"].tolist() == [bf16(m1)] * 3
        assert state["exp_avg_slow"].tolist() == pytest.approx([m2] * 3, rel=1e-6)
        for nu, stored in zip(nus, state["exp_avg_sq"].tolist()):
            assert stored in bf16_neighbours(nu)
        m1 = bf16(m1)  # the reference continues from the stored state
        nus = state["exp_avg_sq"].tolist()
    assert {k: v.dtype for k, v in state.items() if k != "step"} == {
        "exp_avg_fast": torch.bfloat16, "exp_avg_slow": torch.float32, "exp_avg_sq": torch.bfloat16}


def state_bytes_after_one_step(make, shapes, dtype):
    params = [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes]
    opt = make(params)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    return sum(v.numel() * v.element_size() for p in params for v in opt.state[p].values() if torch.is_tensor(v))


def test_low_memory_state_is_no_larger_than_fused_adamw():
    shapes = [(64, 32), (32,), (16, 8, 4)]
    n = 64 * 32 + 32 + 16 * 8 * 4
    low = state_bytes_after_one_step(lambda ps: AdEMAMix(ps, state_dtype="low_memory"), shapes, torch.float32)
    default = state_bytes_after_one_step(AdEMAMix, shapes, torch.float32)
    adamw = state_bytes_after_one_step(lambda ps: torch.optim.AdamW(ps, fused=True), shapes, torch.float32)
    assert (low, default) == ((2 + 4 + 2) * n, 3 * 4 * n)  # bf16 m1, fp32 m2, bf16 ν against three fp32 states
    assert adamw == 2 * 4 * n + 4 * len(shapes)  # fp32 exp_avg, exp_avg_sq and a float32 step per tensor
    assert low <= adamw
    # bf16 parameters: the same 8 bytes (the default keeps 12: fp32 m1, m2, ν)
    low_bf16 = state_bytes_after_one_step(lambda ps: AdEMAMix(ps, state_dtype="low_memory"), shapes, torch.bfloat16)
    assert (low_bf16, state_bytes_after_one_step(AdEMAMix, shapes, torch.bfloat16)) == (8 * n, 12 * n)


@pytest.mark.parametrize("path", PATHS[:2], ids=PATH_IDS[:2])
def test_low_memory_slow_ema_and_second_moment_follow_the_closed_form_where_bf16_stalls(path):
    # g = 1 for 3000 steps, then g = 0 for 2000, from zero state: m2 = (1 − β3^3000)·β3^2000 = 0.21221 and
    # ν = (1 − β2^3000)·β2^2000 = 0.12848 (geometric series, then pure decay). A round-to-nearest bf16 m2 stalls at
    # 2⁻⁵ on the way up and a bf16 ν at 0.25, where (1 − β)·(g − x) is below half an ulp; ν can never come down
    # either, as its largest decrement (1 − β2)·ν is always below half an ulp. β3 = 0.9999 as the paper.
    b1, b2, b3 = 0.9, 0.999, 0.9999
    m2_closed = (1 - b3 ** 3000) * b3 ** 2000
    nu_closed = (1 - b2 ** 3000) * b2 ** 2000
    assert (m2_closed, nu_closed) == (pytest.approx(0.212207, abs=1e-6), pytest.approx(0.128479, abs=1e-6))
    p = torch.nn.Parameter(torch.zeros(1024))
    opt = AdEMAMix([p], lr=0.0, betas=(b1, b2, b3), state_dtype="low_memory", **path)  # lr = 0: only the state moves
    for step in range(5000):
        p.grad = torch.full_like(p, 1.0 if step < 3000 else 0.0)
        opt.step()
    state = opt.state[p]
    assert state["exp_avg_slow"].tolist() == pytest.approx([m2_closed] * 1024, rel=1e-4)  # float32, deterministic
    nu = state["exp_avg_sq"].double()
    assert nu.mean().item() == pytest.approx(nu_closed, rel=0.02)  # unbiased: the mean of 1024 dithered copies
    assert (nu - nu_closed).abs().max().item() < 0.3 * nu_closed  # each copy: a few % of noise, no drift


@pytest.mark.parametrize("path", PATHS[:2], ids=PATH_IDS[:2])
def test_low_memory_state_dict_round_trip_resumes_bit_for_bit(path):
    # ν's rounding bits are drawn from the step count, so 10 + 10 resumed steps equal 20 straight ones exactly.
    params, grads = random_problem(torch.float32)
    straight = make(params, state_dtype="low_memory", **path)
    train(straight, params, grads[:20])
    params2, _ = random_problem(torch.float32)
    first = make(params2, state_dtype="low_memory", **path)
    train(first, params2, grads[:10])
    saved = first.state_dict()
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params2]
    resumed = make(resumed_params, state_dtype="low_memory", **path)
    resumed.load_state_dict(saved)
    for p, q in zip(params2, resumed_params):
        for key, dtype in (("exp_avg_fast", torch.bfloat16), ("exp_avg_slow", torch.float32),
                           ("exp_avg_sq", torch.bfloat16)):
            assert resumed.state[q][key].dtype == dtype
            assert torch.equal(resumed.state[q][key], first.state[p][key])
    train(resumed, resumed_params, grads[10:20])
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)
    for a, b in zip(params, resumed_params):
        assert torch.equal(straight.state[a]["exp_avg_sq"], resumed.state[b]["exp_avg_sq"])


def test_low_memory_state_is_named_in_yaml_and_refused_by_the_fused_path():
    p = torch.nn.Parameter(torch.zeros(1))
    assert AdEMAMix([p], state_dtype="low_memory").defaults["state_dtype"] == "low_memory"
    with pytest.raises(ValueError, match="low_memory.*fused"):
        AdEMAMix([p], state_dtype="low_memory", fused=True)
    with pytest.raises(ValueError, match="low_memory.*fused"):
        AdEMAMix([{"params": [p], "fused": True}], state_dtype="low_memory")
