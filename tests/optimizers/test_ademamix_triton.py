"""AdEMAMix's Triton multi-tensor kernel (``fused=True`` on CUDA) against the per-parameter loop.

On CUDA (skipped without a GPU): 30 steps with schedules and weight decay on a multi-shape fp32 parameter set, the
Triton path must match ``foreach=False`` to 1e-5 (β1 = 0.9 and β1 = 0); the bucket must actually take the kernel.
On CPU (skipped without triton): the kernel launch run under Triton's interpreter (``TRITON_INTERPRET=1``, set in a
subprocess before triton is imported) against :func:`optimizers.ademamix.loop_update`, for fp32, bf16 parameters with
an fp32 state (the default) and an all-bf16 bucket.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from optimizers import AdEMAMix

ROOT = Path(__file__).resolve().parents[2]
HAS_TRITON = importlib.util.find_spec("triton") is not None
SHAPES = [(3, 5), (7000,), (4096,), (1,), (33, 129), (257, 64), (8193,)]
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA and triton")


def _run(params0, grads, **kwargs):
    params = [torch.nn.Parameter(p.clone()) for p in params0]
    opt = AdEMAMix(params, lr=1e-2, alpha=5.0, t_alpha=20, t_beta3=20, weight_decay=0.1, **kwargs)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()  # a new gradient tensor every step, as in training
        opt.step()
    return params, opt


@needs_cuda
@pytest.mark.parametrize("beta1", [0.9, 0.0])
def test_triton_path_matches_the_loop_over_30_steps(beta1, monkeypatch):
    from optimizers import ademamix_triton

    calls = []
    launch = ademamix_triton.launch
    monkeypatch.setattr(ademamix_triton, "launch", lambda *a: (calls.append(1), launch(*a)))
    gen = torch.Generator().manual_seed(0)
    params0 = [torch.randn(s, generator=gen).cuda() for s in SHAPES]
    grads = [[torch.randn(s, generator=gen).cuda() for s in SHAPES] for _ in range(30)]
    betas = (beta1, 0.999, 0.9999)
    got, opt = _run(params0, grads, fused=True, betas=betas)
    want, ref = _run(params0, grads, foreach=False, betas=betas)
    assert len(calls) == 30
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for a, b in zip(got, want):
        for key in ref.state[b]:
            if key != "step":
                torch.testing.assert_close(opt.state[a][key], ref.state[b][key], atol=1e-5, rtol=0)
    assert ("exp_avg_fast" in opt.state[got[0]]) == (beta1 != 0.0)


@needs_cuda
def test_triton_path_in_bfloat16_stays_close_to_fp32():
    gen = torch.Generator().manual_seed(1)
    params0 = [torch.randn(s, generator=gen).cuda() for s in SHAPES]
    grads = [[torch.randn(s, generator=gen).cuda() for s in SHAPES] for _ in range(10)]
    got, _ = _run([p.bfloat16() for p in params0], [[g.bfloat16() for g in gs] for gs in grads], fused=True)
    want, _ = _run(params0, grads, foreach=False)
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b, atol=5e-2, rtol=2e-2)


@needs_cuda
def test_unsupported_buckets_fall_back_to_the_compiled_path():
    from optimizers import ademamix_triton

    p = torch.zeros(4, 4, device="cuda")
    assert ademamix_triton.supported([p], [p], None, [p], [p])
    assert not ademamix_triton.supported([p.t()], [p], None, [p], [p])
    assert not ademamix_triton.supported([p.double()], [p.double()], None, [p.double()], [p.double()])
    assert not ademamix_triton.supported([p.cpu()], [p.cpu()], None, [p.cpu()], [p.cpu()])
    b = p.bfloat16()
    assert ademamix_triton.supported([b], [b], [p], [p], [p])  # bf16 parameters, fp32 state (the default)
    assert not ademamix_triton.supported([b], [p], None, [p], [p])  # grads must be in the parameters' dtype
    assert not ademamix_triton.supported([b], [b], [b], [p], [p])  # one state dtype


INTERPRETER_SCRIPT = textwrap.dedent("""
    import torch
    from optimizers import ademamix_triton as at
    from optimizers.ademamix import FoldedScalars, loop_update, step_scalars

    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (7000,), (4096,), (1,), (33, 129)]
    cases = [(0.9, torch.float32, torch.float32), (0.0, torch.float32, torch.float32),
             (0.9, torch.bfloat16, torch.float32), (0.0, torch.bfloat16, torch.bfloat16)]
    for beta1, dtype, state_dtype in cases:  # (β1, parameter dtype, state dtype)
        ps = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
        ref = [p.clone() for p in ps]
        zeros = lambda: [torch.zeros_like(p, dtype=state_dtype) for p in ps]
        m1, m1_ref = (zeros(), zeros()) if beta1 else (None, None)
        m2, m2_ref, nu, nu_ref = zeros(), zeros(), zeros(), zeros()
        group = dict(lr=1e-2, betas=(beta1, 0.999, 0.9999), alpha=5.0, t_alpha=4, t_beta3=4, eps=1e-8,
                     weight_decay=0.1)
        for t in range(1, 6):
            gs = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
            s = step_scalars(group, t)
            at.launch(ps, gs, m1, m2, nu, FoldedScalars.of(s))
            loop_update(ref, gs, m1_ref, m2_ref, nu_ref, s)
        pairs = list(zip(ps, ref)) + list(zip(m2, m2_ref)) + list(zip(nu, nu_ref))
        pairs += list(zip(m1, m1_ref)) if m1 is not None else []
        # Both compute in fp32 and round each store once. fp32 tensors: equal up to fp32 order of operations.
        # bf16 tensors: the interpreter casts fp32 -> bf16 by truncation (compiled Triton and torch round to
        # nearest), so they may drift apart by up to one bf16 ulp per step (<= 2^-7 of the tensor's largest
        # magnitude M): 5 steps -> 5 * 2^-7 * M. A wrong pointer type or dtype would be off by far more.
        for a, b in pairs:
            assert a.dtype == b.dtype
            if a.dtype == torch.float32:
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
            else:
                torch.testing.assert_close(a.float(), b.float(), atol=5 * 2 ** -7 * b.float().abs().max().item(),
                                           rtol=0)
    print("ok")
""")


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (its interpreter runs the kernel on CPU tensors)")
def test_kernel_under_the_triton_interpreter_matches_the_loop():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    out = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith("ok")
