"""Return-alignment table: DT, RADT and the two RADT ablations on the built-in datasets, several seeds.

    python -m benchmarks.radt_table [--device cpu|cuda] [--quick] [--envs halfcheetah swimmer] [--seeds 0 1 2]
                                    [--variants DT RADT "RADT (SeqRA only)" "RADT (StepRA only)"]
                                    [--steps 800] [--embed-dim 64] [--n-layers 2] [--batch-size 32] [--threads N]
                                    [--episodes 10] [--out docs/results/radt_table.json] [--note TEXT]

Each run trains one model with the same recipe (AdamW, wd 1e-4, linear warm-up then constant lr, grad clip
0.25, dropout 0.1, K and RTG scale as below) on the built-in scripted dataset, then evaluates it with
``ReturnAlignmentEval`` (7 targets from the 5th to the 95th return percentile, ``episodes`` episodes each —
10 by default, the paper's evaluation during training; it tests with 100 — the same seeded episodes for every
model). The CPU defaults shrink the paper's recipe (embed 128, 3 layers,
batch 64, 100k steps at lr 1e-4): say so when quoting.
Every finished run is cached as JSON under ``$LITPAPERS_CACHE/radt_table/`` (keyed by all settings), so an
interrupted table resumes where it stopped (or is built seed by seed, variant by variant; the table lists the
variants asked for, so the last invocation names them all). The anchor is DT, trained and evaluated
in the same run. ``--out`` also writes the JSON there, with the command, date and machine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
import numpy as np
import torch

from benchmarks.common import apply_threads, benchmark_parser
from callbacks import ReturnAlignmentEval
from datamodules import OfflineRLDataModule
from datamodules.common import cache_dir
from lit_modules import RADT, DecisionTransformer

ENVS = {"halfcheetah": ("litpapers/halfcheetah/scripted-v0", 1000.0), "swimmer": ("litpapers/swimmer/scripted-v0", 20.0)}
VARIANTS = {"DT": (DecisionTransformer, {}), "RADT": (RADT, {}), "RADT (SeqRA only)": (RADT, {"stepra": False}),
            "RADT (StepRA only)": (RADT, {"seqra": False})}


CODE = ("lit_modules/radt.py", "lit_modules/return_conditioned.py", "lit_modules/decision_transformer.py",
        "callbacks/return_alignment.py")


def code_digest() -> str:
    """sha1 of the modules a run depends on, so a cached run of older code is never reused."""
    root = Path(__file__).resolve().parents[1]
    return hashlib.sha1(b"".join((root / f).read_bytes() for f in CODE)).hexdigest()[:12]


def run_one(env: str, variant: str, seed: int, settings: dict, device: str) -> dict:
    """Train one model and evaluate its return alignment; cached by all settings and the code's digest."""
    key = json.dumps({"env": env, "variant": variant, "seed": seed, "code": code_digest(), **settings},
                     sort_keys=True)
    path = cache_dir("radt_table") / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
    if path.exists():
        return json.loads(path.read_text())
    dataset, rtg_scale = ENVS[env]
    dm = OfflineRLDataModule(dataset=dataset, context_len=settings["context_len"], batch_size=settings["batch_size"],
                             val_fraction=0.0)
    cls, kw = VARIANTS[variant]
    L.seed_everything(seed, verbose=False)
    model = cls(embed_dim=settings["embed_dim"], n_layers=settings["n_layers"], n_heads=1, dropout=0.1,
                context_len=settings["context_len"], rtg_scale=rtg_scale, lr=settings["lr"], weight_decay=1e-4,
                warmup_steps=settings["warmup_steps"], lr_decay="constant", **kw)
    trainer = L.Trainer(max_steps=settings["steps"], gradient_clip_val=0.25, accelerator=device, devices=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    result = ReturnAlignmentEval(episodes_per_target=settings["episodes"]).evaluate(model, dm)
    out = {"env": env, "variant": variant, "seed": seed, "train_s": round(train_s, 1),
           "eval_s": round(time.perf_counter() - start, 1), **result}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, path)  # a killed run leaves no half-written cache entry
    return out


def main() -> None:
    parser = benchmark_parser(__doc__, quick_help="1 seed, 100 steps, 2 episodes per target")
    parser.add_argument("--envs", nargs="+", default=["halfcheetah"], choices=sorted(ENVS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--warmup-steps", type=int, default=80)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--context-len", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--episodes", type=int, default=10, help="evaluation episodes per target (paper: 10)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON to this file")
    parser.add_argument("--note", default="", help="free-text machine/context note stored in the JSON")
    args = parser.parse_args()
    apply_threads(args)
    if args.quick:
        args.seeds, args.steps, args.warmup_steps, args.episodes = args.seeds[:1], 100, 10, 2
    settings = {k: getattr(args, k) for k in ("steps", "warmup_steps", "lr", "embed_dim", "n_layers", "context_len",
                                               "batch_size", "episodes")}
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    start, load_before = time.perf_counter(), os.getloadavg()
    runs = [run_one(env, variant, seed, settings, args.device)
            for env in args.envs for seed in args.seeds for variant in args.variants]
    table = {}
    for env in args.envs:
        for variant in args.variants:
            errs = [r["mean_error"] for r in runs if r["env"] == env and r["variant"] == variant]
            table[f"{env} / {variant}"] = {
                "mean_alignment_error": round(statistics.mean(errs), 2),
                "std_over_seeds": round(statistics.stdev(errs), 2) if len(errs) > 1 else 0.0,
                "per_seed": [round(e, 2) for e in errs]}
        if "DT" in args.variants:
            dt = table[f"{env} / DT"]["mean_alignment_error"]
            for variant in args.variants:
                row = table[f"{env} / {variant}"]
                row["ratio_vs_DT"] = round(row["mean_alignment_error"] / dt, 3)
    per_target = {f"{r['env']} / {r['variant']} / seed {r['seed']}":
                  {"targets": [round(t, 1) for t in r["targets"]],
                   "actual_mean": [round(float(np.mean(a)), 1) for a in r["actual"]],
                   "train_s": r["train_s"], "eval_s": r["eval_s"]} for r in runs}
    report = {"command": "python -m benchmarks.radt_table " + " ".join(sys.argv[1:]),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "device": args.device,
                          "load_average_1min_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
                          "note": args.note},
              "settings": settings, "envs": args.envs, "seeds": args.seeds,
              "wall_s_this_invocation": round(time.perf_counter() - start, 1),
              "train_s_total": round(sum(r["train_s"] for r in runs), 1),
              "eval_s_total": round(sum(r["eval_s"] for r in runs), 1),
              "table": table, "per_target": per_target}
    print(json.dumps(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
