"""Preference losses against plain-float math of the published formulas (docs/papers.md §6), on hand-picked inputs."""

import math
import statistics
import textwrap

import pytest
import torch

from lit_modules import PREFERENCE_LOSSES, preference_loss

# Three pairs. ρ = (pc − pr) − (rc − rr) = [1.0, −2.0, 0.5]; with β = 0.5, z = [0.5, −1.0, 0.25].
PC, PR = [-1.0, -3.0, -2.0], [-2.0, -1.0, -2.5]
RC, RR = [-1.5, -2.0, -2.0], [-1.5, -2.0, -2.0]
BETA = 0.5
RHO = [1.0, -2.0, 0.5]
Z = [BETA * r for r in RHO]


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def nls(x: float) -> float:  # −log σ(x)
    return math.log1p(math.exp(-x))


def relu(x: float) -> float:
    return max(0.0, x)


def run(name, **kwargs):
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return preference_loss(name, t(PC), t(PR), t(RC), t(RR), beta=BETA, **kwargs).tolist()


def expected(name: str) -> list[float]:
    if name in ("sigmoid", "dpo"):
        return [nls(z) for z in Z]
    if name == "hinge":
        return [relu(1 - z) for z in Z]
    if name == "ipo":
        return [(r - 1 / (2 * BETA)) ** 2 for r in RHO]
    if name in ("discopop", "lrml"):
        return [(1 - sig(z / 0.05)) * nls(z) + sig(z / 0.05) * math.exp(-z) for z in Z]
    if name == "padll":
        return [0.9 * (1 - 0.5 * (r < 0)) * nls(BETA * r) for r in RHO]
    if name == "cell":
        return [0.5 * math.exp(-z) + 0.5 * nls(z) for z in Z]
    if name == "aql":
        s = [z / 0.05 for z in Z]
        q = 0.5 + 0.01 * (sig(statistics.mean(s)) - 0.5)
        w = [sig(-(si - q)) for si in s]
        return [wi * nls(z) + (1 - wi) * relu(1 - z) for wi, z in zip(w, Z)]
    if name == "aqfl":
        s = [z / 0.05 for z in Z]
        q = statistics.stdev(s) * statistics.mean(sig(-si) for si in s)
        q = q + 0.05 * (sig(statistics.mean(s)) - q)
        w = [sig(0.1 * abs(si - q)) for si in s]
        return [wi * nls(z) + (1 - wi) * relu(1 - z) for wi, z in zip(w, Z)]
    if name == "pfl":
        return [nls(z) / 2 if pc > pr else 2 * relu(1 - z) for pc, pr, z in zip(PC, PR, Z)]
    if name == "kto_pair":
        rw = [pc - rc for pc, rc in zip(PC, RC)]
        rl = [pr - rr for pr, rr in zip(PR, RR)]
        klw, kll = max(0.0, statistics.mean(rw)), max(0.0, statistics.mean(rl))
        return [0.5 * ((1 - sig(BETA * (a - kll))) + (1 - sig(BETA * (klw - b)))) for a, b in zip(rw, rl)]
    raise AssertionError(name)


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_loss_matches_plain_float_formula(name):
    assert run(name) == pytest.approx(expected(name), rel=1e-9, abs=1e-12)


def test_required_names_registered():
    required = {"sigmoid", "hinge", "ipo", "discopop", "padll", "cell", "aql", "aqfl", "pfl", "kto_pair"}
    assert required <= set(PREFERENCE_LOSSES)


def test_known_values_at_a_glance():
    zero = torch.zeros(1)
    assert preference_loss("sigmoid", zero, zero, zero, zero).item() == pytest.approx(math.log(2))
    # DiscoPOP at z = 0: w = ½, L = ½·log 2 + ½·exp(0)
    assert preference_loss("discopop", zero, zero, zero, zero).item() == pytest.approx(0.5 * math.log(2) + 0.5)
    assert preference_loss("hinge", zero, zero, zero, zero).item() == pytest.approx(1.0)
    # IPO at ρ = 0, β = 0.1: (0 − 5)² = 25
    assert preference_loss("ipo", zero, zero, zero, zero, beta=0.1).item() == pytest.approx(25.0)
    # KTO pair at r = 0: ½·((1 − ½) + (1 − ½)) = ½
    assert preference_loss("kto_pair", zero, zero, zero, zero).item() == pytest.approx(0.5)


def test_sigmoid_label_smoothing_is_conservative_dpo():
    eps = 0.2
    got = run("sigmoid", label_smoothing=eps)
    assert got == pytest.approx([(1 - eps) * nls(z) + eps * nls(-z) for z in Z], rel=1e-9)


def test_discopop_tau_kwarg():
    got = run("discopop", tau=0.5)
    assert got == pytest.approx([(1 - sig(z / 0.5)) * nls(z) + sig(z / 0.5) * math.exp(-z) for z in Z], rel=1e-9)


def test_mean_of_kto_pair_equals_mean_of_reference_2b_terms():
    rw = [pc - rc for pc, rc in zip(PC, RC)]
    rl = [pr - rr for pr, rr in zip(PR, RR)]
    klw, kll = max(0.0, statistics.mean(rw)), max(0.0, statistics.mean(rl))
    terms = [1 - sig(BETA * (a - kll)) for a in rw] + [1 - sig(BETA * (klw - b)) for b in rl]
    assert statistics.mean(run("kto_pair")) == pytest.approx(statistics.mean(terms), rel=1e-9)


def test_aqfl_single_pair_is_finite():
    one = torch.tensor([-1.0])
    assert torch.isfinite(preference_loss("aqfl", one, one - 1, one, one)).all()


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_gradient_raises_chosen_and_lowers_rejected(name):
    """−∂L/∂log π(y_w) > 0 and −∂L/∂log π(y_l) < 0 for every pair, at margins
    z = βρ ∈ {±0.3, 0.15, −0.2} (outside DiscoPOP's small non-monotone region around 0, see the next test)."""
    rho = torch.tensor([3.0, -3.0, 1.5, -2.0])
    rc, rr = torch.tensor([-5.0, -6.0, -4.0, -5.0]), torch.tensor([-6.0, -5.0, -4.5, -5.0])
    pr = torch.tensor([-6.0, -6.0, -6.5, -4.0], requires_grad=True)
    pc = (pr.detach() + rho + (rc - rr)).requires_grad_()
    preference_loss(name, pc, pr, rc, rr, beta=0.1).sum().backward()
    assert (pc.grad < 0).all(), (pc.grad, pr.grad)
    assert (pr.grad > 0).all(), (pc.grad, pr.grad)


def test_discopop_is_not_monotone_near_zero():
    """LRML's blend weight σ(z/τ) is steep (τ = 0.05), so dL/dz > 0 on a small interval around z = 0: the
    literal formula pushes the margin *down* there (a local minimum near z ≈ −0.118). Checked by central
    finite differences of the plain-float formula against autograd."""
    lrml = lambda z: (1 - sig(z / 0.05)) * nls(z) + sig(z / 0.05) * math.exp(-z)  # noqa: E731
    zs = [-0.3, -0.12, -0.05, 0.0, 0.05, 0.3]
    z = torch.tensor(zs, dtype=torch.float64, requires_grad=True)
    zero = torch.zeros_like(z)
    preference_loss("discopop", z, zero, zero, zero, beta=1.0).sum().backward()
    fd = [(lrml(v + 1e-6) - lrml(v - 1e-6)) / 2e-6 for v in zs]
    assert z.grad.tolist() == pytest.approx(fd, rel=1e-5, abs=1e-8)
    assert [g > 0 for g in fd] == [False, False, True, True, True, False]


def test_custom_loss_from_module_path(tmp_path, monkeypatch):
    (tmp_path / "my_losses.py").write_text(textwrap.dedent("""
        def doubled(pc, pr, rc, rr, beta=0.1, scale=2.0):
            return scale * beta * ((pc - pr) - (rc - rr)) ** 2
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    got = run("my_losses:doubled", scale=3.0)
    assert got == pytest.approx([3.0 * BETA * r ** 2 for r in RHO])


def test_bad_names_and_kwargs_are_clear(tmp_path, monkeypatch):
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="unknown preference loss 'nope'"):
        preference_loss("nope", x, x, x, x)
    with pytest.raises(ValueError, match="cannot import module"):
        preference_loss("no_such_module_xyz:f", x, x, x, x)
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        preference_loss("math:missing", x, x, x, x)
    with pytest.raises(TypeError, match=r"'hinge' does not accept \['tau'\]"):
        preference_loss("hinge", x, x, x, x, tau=0.1)
    (tmp_path / "bad_losses.py").write_text("def total(pc, pr, rc, rr, beta=0.1):\n    return (pc - pr).sum()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="expected one loss per pair"):
        preference_loss("bad_losses:total", x, x, x, x)
