"""AdEMAMix's low-memory state (``state_dtype="low_memory"``) against its float32 state on the AdEMAMix claim setting.

    python -m benchmarks.claim_ademamix_low_memory [--full] [--seeds N] [--lr LR] [--json PATH]

Runs :func:`benchmarks.claim_ademamix.train_run` — the claim's model, data, batch order, warm-up + cosine schedule,
β3 = 1 − 5/T, α = 5, t_α = t_β3 = T, clipping and forgetting probe — for AdEMAMix with the default float32 state
and with ``state_dtype="low_memory"`` (bfloat16 m1, stochastically rounded bfloat16 ν, float32 m2), same lr and
seeds (0..n−1), no lr tuning: ``--lr`` defaults to the lr the claim's tuning chose for AdEMAMix (1e-3). ``--full``
is the claim's full mode (T = 1200, 3 seeds). The claim module builds its optimizer in ``make_optimizer``; this
script substitutes, for its own low-memory runs only, a ``make_optimizer`` that adds ``state_dtype`` (the claim
module itself is unchanged). Reported per seed: the claim's metric (validation loss, mean of the last evaluations
up to T) and the optimizer state's bytes per parameter; then whether the low-memory mean lies within the float32
runs' seed spread (their min..max, and mean ± one sample standard deviation).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time
from unittest import mock

import torch

from benchmarks import claim_ademamix
from benchmarks.claim_common import mode_settings, write_record
from optimizers import AdEMAMix

STATES = {"float32": None, "low_memory": "low_memory"}


def state_bytes_per_param(optimizer: torch.optim.Optimizer) -> float:
    """Bytes of the optimizer's state tensors (m1, m2, ν) per parameter it updates."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    total = sum(v.numel() * v.element_size() for p in params for v in optimizer.state[p].values()
                if torch.is_tensor(v))
    return total / sum(p.numel() for p in params)


def run_state(state: str, lr: float, seed: int, data: dict, s: dict, progress) -> dict:
    """One claim run (:func:`claim_ademamix.train_run`, AdEMAMix) with state ``state`` of :data:`STATES`."""
    made = []

    def make_optimizer(name: str, groups: list[dict], lr: float, steps: int) -> torch.optim.Optimizer:
        assert name == "ademamix", name
        optimizer = AdEMAMix(groups, lr=lr, betas=(0.9, 0.999, claim_ademamix.beta3_for(steps)), alpha=5.0,
                             t_alpha=steps, t_beta3=steps, state_dtype=STATES[state])
        made.append(optimizer)
        return optimizer

    with mock.patch.object(claim_ademamix, "make_optimizer", make_optimizer):
        result = claim_ademamix.train_run("ademamix", lr, s["steps"], seed, data, s, progress)
    return {"final_loss": result["final"], "state_bytes_per_param": state_bytes_per_param(made[0]),
            "curve": result["curve"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the claim's full mode (T = 1200, 3 seeds)")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="override T")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak lr of both runs (the claim's tuned AdEMAMix lr)")
    parser.add_argument("--json", default=None, help="also write the result (with command, date, machine) here")
    args = parser.parse_args(argv)
    mode = "full" if args.full else "quick"
    s = mode_settings(claim_ademamix.MODES, mode, args.seeds, {"steps": args.steps} if args.steps else None)
    s["eval_every"] = s["eval_every"] or max(1, s["steps"] // 20)  # as claim_ademamix.run

    def progress(msg: str) -> None:
        print(msg, flush=True)

    start = time.perf_counter()
    data = claim_ademamix.build_data(s, progress)
    runs = {state: [] for state in STATES}
    for seed in range(s["seeds"]):
        for state in STATES:  # interleaved, so machine load affects both alike (it cannot change the losses)
            runs[state].append(run_state(state, args.lr, seed, data, s, progress))
            progress(f"{state} seed {seed}: final loss {runs[state][-1]['final_loss']:.5f}")
    losses = {state: [r["final_loss"] for r in runs[state]] for state in STATES}
    fp32, low = losses["float32"], losses["low_memory"]
    low_mean = statistics.fmean(low)
    std = statistics.stdev(fp32) if len(fp32) > 1 else None
    result = {
        "benchmark": "claim_ademamix_low_memory", "mode": mode, "lr": args.lr,
        "settings": {k: s[k] for k in ("steps", "seeds", "batch_size", "block_size", "warmup_frac", "final_lr_frac",
                                       "eval_every", "eval_last", "val_blocks")},
        "metric": f"validation loss at {s['steps']} steps (mean of the last {s['eval_last']} evaluations), "
                  "as the AdEMAMix claim",
        "final_loss": losses,
        "state_bytes_per_param": {state: runs[state][0]["state_bytes_per_param"] for state in STATES},
        "mean": {state: statistics.fmean(v) for state, v in losses.items()},
        "paired_difference_low_memory_minus_float32": [b - a for a, b in zip(fp32, low)],
        "float32_seed_range": [min(fp32), max(fp32)],
        "float32_seed_std": std,
        "low_memory_mean_within_float32_range": min(fp32) <= low_mean <= max(fp32),
        "low_memory_mean_within_float32_mean_pm_std": None if std is None else
        abs(low_mean - statistics.fmean(fp32)) <= std,
        "curves": {state: [r["curve"] for r in runs[state]] for state in STATES},
        "seconds": time.perf_counter() - start,
    }
    if args.json:
        write_record(result, pathlib.Path(args.json), "benchmarks.claim_ademamix_low_memory",
                     sys.argv[1:] if argv is None else argv)
    print(json.dumps({k: v for k, v in result.items() if k != "curves"}))
    return result


if __name__ == "__main__":
    main()
