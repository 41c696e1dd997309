"""Final validation loss of AdEMAMix vs AdamW on the same tiny Llama, corpus, steps and seed.

    python -m benchmarks.ademamix_vs_adamw [--device cpu|cuda] [--quick] [--steps N] [--seeds 0 1]

Both runs go through the real CLI (``training.cli.build_cli``) with ``configs/ademamix/quick_adamw.yaml`` and
``configs/ademamix/quick.yaml``: same model (hidden 64, 2 layers, byte-level vocabulary), built-in corpus
(``pydoc_data.topics``), block 128, batch 16, lr 3e-3 with 30 warm-up steps and cosine decay to 10%, weight decay
0.1 on matrices, gradient clipping 1.0, fp32. Only the optimizer differs: AdamW β = (0.9, 0.999) vs AdEMAMix
β = (0.9, 0.999, 0.999), α = 5, α and β3 warmed up over the whole run (t_alpha = t_beta3 = steps). The
validation loss (mean token cross-entropy on the held-out 5% of documents) is measured once, after the last step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from training.cli import build_cli

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "ademamix"


def train(config: str, steps: int, seed: int, accelerator: str, extra: list[str]) -> dict:
    """One ``litpapers fit`` run; returns its final validation/training loss and wall time."""
    with tempfile.TemporaryDirectory() as logs:
        args = ["fit", "--config", str(CONFIGS / config), "--seed_everything", str(seed),
                "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
                "--trainer.accelerator", accelerator, "--trainer.devices", "1",
                "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]",
                "--trainer.logger.init_args.save_dir", logs, *extra]
        start = time.perf_counter()
        run = build_cli(args)
        seconds = time.perf_counter() - start
    metrics = run.trainer.callback_metrics
    return {"val_loss": float(metrics["val/loss"]), "train_loss": float(metrics["train/loss"]),
            "optimizer": type(run.trainer.optimizers[0]).__name__, "steps": run.trainer.global_step,
            "wall_s": seconds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="100 steps, one seed (~1-2 min on 2 CPU cores)")
    parser.add_argument("--steps", type=int, default=None, help="training steps of each run (default 300)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 (quick) or 0 1")
    args = parser.parse_args(argv)
    steps = args.steps or (100 if args.quick else 300)
    seeds = args.seeds or ([0] if args.quick else [0, 1])
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    warmup = ["--model.init_args.optimizer.init_args.t_alpha", str(steps),
              "--model.init_args.optimizer.init_args.t_beta3", str(steps)]

    runs = []
    for seed in seeds:
        adamw = train("quick_adamw.yaml", steps, seed, accelerator, [])
        ademamix = train("quick.yaml", steps, seed, accelerator, warmup)
        runs.append({"seed": seed, "AdamW": adamw, "AdEMAMix": ademamix,
                     "val_loss_ratio_ademamix_over_adamw": ademamix["val_loss"] / adamw["val_loss"]})
        print(f"seed {seed}: val loss AdamW {adamw['val_loss']:.4f}  AdEMAMix {ademamix['val_loss']:.4f}  "
              f"ratio {runs[-1]['val_loss_ratio_ademamix_over_adamw']:.4f}")
    report = {
        "benchmark": "ademamix_vs_adamw",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "steps": steps, "seeds": seeds,
        "settings": {"model": "Llama hidden 64, 2 layers, 4 heads, intermediate 192, byte-level vocab",
                     "data": "built-in pydoc_data.topics, block 128, batch 16, 5% validation documents",
                     "schedule": "lr 3e-3, 30 warm-up steps, cosine to 10%, weight decay 0.1, clip 1.0, fp32",
                     "AdamW": {"betas": [0.9, 0.999]},
                     "AdEMAMix": {"betas": [0.9, 0.999, 0.999], "alpha": 5.0, "t_alpha": steps, "t_beta3": steps}},
        "runs": runs,
        "median_val_loss": {name: statistics.median(r[name]["val_loss"] for r in runs)
                            for name in ("AdamW", "AdEMAMix")},
        "median_val_loss_ratio_ademamix_over_adamw": statistics.median(
            r["val_loss_ratio_ademamix_over_adamw"] for r in runs),
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
