"""RADT claim (``litpapers reproduce``): RADT aligns the actual return with the target return better than DT.

Paper claim (Tanaka et al. 2024, docs/papers.md §3): RADT's mean absolute error between target and actual return is
lower than Decision Transformer's; removing either of its two components (SeqRA, StepRA) loses part of that.
Experiment: ``benchmarks.radt_table.run_one`` trains each variant with the same recipe on the built-in scripted
dataset and evaluates it with ``callbacks.ReturnAlignmentEval`` (7 targets from the 5th to the 95th return
percentile, 10 episodes each, the same seeded episodes for every model). Quick: RADT vs DT on HalfCheetah, 2
training seeds of 400 steps (~30 CPU s per model); full: HalfCheetah, 3 training seeds of 800 steps, plus both
ablations (12 models, ~10 min of one core); Swimmer (``benchmarks.radt_table --envs swimmer``) is left out of
the 15-minute budget. Each model's alignment (target, mean actual return and error per target) is also written as a
TensorBoard run (``tb/<env>_<variant>/seed<i>``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.claim_common import claim, log_scalars

SETTINGS = {
    "quick": {"seeds": 2, "envs": ["halfcheetah"], "variants": ["DT", "RADT"], "steps": 400, "warmup_steps": 40},
    "full": {"seeds": 3, "envs": ["halfcheetah"],
             "variants": ["DT", "RADT", "RADT (SeqRA only)", "RADT (StepRA only)"], "steps": 800,
             "warmup_steps": 80},
}
RECIPE = {"lr": 1e-3, "embed_dim": 64, "n_layers": 2, "context_len": 20, "batch_size": 32, "episodes": 10}


def _figure(runs: dict, env: str, variants: list[str], path: Path) -> None:
    """Mean actual return vs target (seed 0) for each variant, with the ideal y = x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4))
    for variant in variants:
        r = runs[(env, variant, 0)]
        ax.plot(r["targets"], np.mean(r["actual"], axis=1), "o-", label=variant)
    lo, hi = min(runs[(env, variants[0], 0)]["targets"]), max(runs[(env, variants[0], 0)]["targets"])
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="actual = target")
    ax.set(xlabel="target return", ylabel="mean actual return", title=f"{env}: return alignment (seed 0)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(mode: str, seeds: int | None, out_dir: Path, progress) -> dict:
    from benchmarks.radt_table import run_one

    s = SETTINGS[mode]
    n_seeds = seeds or s["seeds"]
    # out_dir in the settings keys run_one's result cache to this report: an interrupted report resumes per run,
    # a new report never reuses results computed by older code
    settings = {**RECIPE, "steps": s["steps"], "warmup_steps": s["warmup_steps"], "reproduce_out": str(out_dir)}
    jobs = [(env, variant, seed) for env in s["envs"] for seed in range(n_seeds) for variant in s["variants"]]
    runs = {}
    for i, (env, variant, seed) in enumerate(jobs):
        progress(f"{env} / {variant} / seed {seed}: {s['steps']} steps + {RECIPE['episodes']} episodes × 7 targets",
                 i / len(jobs))
        r = runs[(env, variant, seed)] = run_one(env, variant, seed, settings, "cpu")
        log_scalars(out_dir / "tb", f"{env}_{variant}", f"seed{seed}",  # x axis: the target's index
                    {"alignment/target_return": r["targets"], "alignment/actual_return_mean":
                     np.mean(r["actual"], axis=1), "alignment/error": r["errors"], "alignment/mean_error": r["mean_error"]})
    claims, figures = [], []
    for env in s["envs"]:
        err = {v: [runs[(env, v, seed)]["mean_error"] for seed in range(n_seeds)] for v in s["variants"]}
        for base in [v for v in s["variants"] if v != "RADT"]:
            what = "aligns returns better than DT" if base == "DT" else f"beats its ablation {base}"
            claims.append(claim(f"{env}: RADT {what}", "mean abs. error of actual vs target return", err["RADT"],
                                err[base], base, higher_is_better=False))
        figure = f"alignment_{env}.png"
        _figure(runs, env, s["variants"], out_dir / figure)
        figures.append(figure)
    per_run = {f"{e} / {v} / seed {sd}": {"mean_error": r["mean_error"], "train_s": r["train_s"], "eval_s": r["eval_s"]}
               for (e, v, sd), r in runs.items()}
    return {"claims": claims, "figures": figures,
            "settings": {**RECIPE, **{k: s[k] for k in ("envs", "variants", "steps", "warmup_steps")},
                         "seeds": n_seeds, "targets": "7, 5th-95th return percentile", "runs": per_run}}
