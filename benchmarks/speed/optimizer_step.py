"""Optimizer step time and state memory: AdEMAMix's three paths against ``torch.optim.AdamW`` on one parameter set.

    python -m benchmarks.speed.optimizer_step [--device cpu|cuda] [--quick] [--size NAME] [--threads N] [--only NAME ...]

Every optimizer gets identical fp32 copies of a small Llama-shaped parameter list (embedding, per layer q/k/v/o,
gate/up/down and two norms, final norm, untied head) and the same fixed random gradients. Each is warmed up
(which includes ``torch.compile`` for ``fused=True``), then the optimizers are timed in turns, ``steps`` steps per
turn, ``repeats`` turns; the median time per step is reported with its ratios to ``AdamW(fused=True)`` and to
``AdamW()`` (torch's default path: on CPU the per-tensor loop) measured in the same run. Hyperparameters: lr 1e-3,
weight decay 0.1 for all; AdEMAMix β = (0.9, 0.999, 0.9999), α = 5, t_alpha = t_beta3 = 1000 (the schedules are
evaluated every step, as in training). ``--size cpu25m``: ~25M parameters (hidden 512, 4 layers, vocabulary 12288).
Optional anchor: ``pytorch_optimizer.AdEMAMix`` (skipped when the package is missing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from optimizers import AdEMAMix

SIZES = {  # (hidden, layers, vocab): ~1.6M, ~7.3M, ~25M and ~36M parameters
    "quick": (128, 2, 4096),
    "cpu": (256, 4, 8192),
    "cpu25m": (512, 4, 12288),
    "cuda": (512, 6, 16384),
}


def llama_shapes(hidden: int, layers: int, vocab: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a Llama-style decoder with intermediate size ≈ 8/3·hidden (rounded to 16)."""
    ffn = (8 * hidden // 3 + 15) // 16 * 16
    block = [(hidden, hidden)] * 4 + [(ffn, hidden), (ffn, hidden), (hidden, ffn), (hidden,), (hidden,)]
    return [(vocab, hidden)] + block * layers + [(hidden,), (vocab, hidden)]


def candidates(weight_decay: float = 0.1, lr: float = 1e-3) -> dict[str, Callable[[list], torch.optim.Optimizer]]:
    """Name → constructor of every optimizer compared (pytorch_optimizer's only if installed)."""
    ademamix = dict(lr=lr, weight_decay=weight_decay, alpha=5.0, t_alpha=1000, t_beta3=1000)
    out: dict[str, Callable[[list], torch.optim.Optimizer]] = {
        "AdamW()": lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=weight_decay),  # torch's default path
        "AdamW(fused=True)": lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=weight_decay, fused=True),
        "AdamW(foreach=True)": lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=weight_decay, foreach=True),
        "AdEMAMix(foreach=False)": lambda ps: AdEMAMix(ps, foreach=False, **ademamix),
        "AdEMAMix(foreach=True)": lambda ps: AdEMAMix(ps, foreach=True, **ademamix),
        "AdEMAMix(fused=True)": lambda ps: AdEMAMix(ps, fused=True, **ademamix),
        "AdEMAMix(foreach=True, beta1=0)": lambda ps: AdEMAMix(ps, foreach=True, betas=(0.0, 0.999, 0.9999),
                                                               **ademamix),
        "AdEMAMix(foreach=True, state_dtype=low_memory)": lambda ps: AdEMAMix(ps, foreach=True,
                                                                              state_dtype="low_memory", **ademamix),
    }
    try:
        import pytorch_optimizer
    except ImportError:
        return out
    for foreach in (False, True):
        out[f"pytorch_optimizer.AdEMAMix(foreach={foreach})"] = (
            lambda ps, foreach=foreach: pytorch_optimizer.AdEMAMix(
                ps, lr=lr, weight_decay=weight_decay, weight_decouple=True, alpha=5.0, t_alpha_beta3=1000,
                foreach=foreach))
    return out


def device_name(device: torch.device) -> str:
    """GPU name, or the CPU model from /proc/cpuinfo (Linux) with the number of cores."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model} ({os.cpu_count()} cores)"


def state_bytes_per_param(optimizer: torch.optim.Optimizer, n_params: int) -> float:
    """Bytes of every tensor in the optimizer state (moments and step counters) per parameter."""
    total = sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
                if torch.is_tensor(v))
    return total / n_params


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="small parameter set, few repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="steps per timed turn")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--size", choices=sorted(SIZES), default=None,
                        help="parameter set (default: 'quick' with --quick, else the device's)")
    parser.add_argument("--only", nargs="+", default=None, metavar="NAME",
                        help="time only these candidates (AdamW(fused=True), the anchor, is always timed)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    hidden, layers, vocab = SIZES[args.size or ("quick" if args.quick else args.device)]
    repeats = args.repeats or (5 if args.quick else 9)
    steps = args.steps or (3 if args.quick else 5)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    gen = torch.Generator().manual_seed(0)
    shapes = llama_shapes(hidden, layers, vocab)
    init = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    n_params = sum(t.numel() for t in init)

    runs = {}
    chosen = candidates()
    if args.only:
        unknown = set(args.only) - set(chosen)
        if unknown:
            parser.error(f"unknown --only names {sorted(unknown)}; choose from {list(chosen)}")
        chosen = {name: make for name, make in chosen.items() if name in {"AdamW(fused=True)", *args.only}}
    for name, make in chosen.items():
        params = [torch.nn.Parameter(t.to(device)) for t in init]
        for p, g in zip(params, grads):
            p.grad = g.to(device)
        optimizer = make(params)
        start = time.perf_counter()
        for _ in range(3):  # warm-up; includes compilation for the compiled paths
            optimizer.step()
        sync()
        runs[name] = {"optimizer": optimizer, "warmup_s": time.perf_counter() - start, "times": []}

    for _ in range(repeats):  # the candidates take turns so machine noise hits them alike
        for run in runs.values():
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                run["optimizer"].step()
            sync()
            run["times"].append((time.perf_counter() - start) / steps)

    anchor = statistics.median(runs["AdamW(fused=True)"]["times"])
    default = statistics.median(runs["AdamW()"]["times"]) if "AdamW()" in runs else None
    results = {name: {"median_step_ms": 1e3 * statistics.median(run["times"]),
                      "step_ms_all": [round(1e3 * t, 4) for t in run["times"]],
                      "ratio_vs_adamw_fused": statistics.median(run["times"]) / anchor,
                      "ratio_vs_adamw_default": default and statistics.median(run["times"]) / default,
                      "state_bytes_per_param": state_bytes_per_param(run["optimizer"], n_params),
                      "warmup_s_incl_compile": run["warmup_s"]}
               for name, run in runs.items()}
    for name, row in results.items():
        vs_default = "" if default is None else f" (x{row['ratio_vs_adamw_default']:.2f} AdamW())"
        print(f"{name:45s} {row['median_step_ms']:9.3f} ms  x{row['ratio_vs_adamw_fused']:.2f}{vs_default}  "
              f"{row['state_bytes_per_param']:.2f} B/param")
    report = {
        "benchmark": "optimizer_step",
        "device": device_name(device),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "param_set": {"hidden": hidden, "layers": layers, "vocab": vocab, "tensors": len(shapes),
                      "parameters": n_params, "dtype": "float32"},
        "settings": {"lr": 1e-3, "weight_decay": 0.1, "ademamix": {"betas": [0.9, 0.999, 0.9999], "alpha": 5.0,
                                                                    "t_alpha": 1000, "t_beta3": 1000},
                     "repeats": repeats, "steps_per_repeat": steps, "statistic": "median over repeats"},
        "anchor": "AdamW(fused=True)", "second_anchor": "AdamW() (torch's default: the for-loop path on CPU)",
        "results": results,
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
