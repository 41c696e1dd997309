"""DiscoPOP claim (``litpapers reproduce``): the LRML loss vs DPO at the paper's β = 0.05, held-out reward accuracy.

Paper claim (Chris Lu et al. 2024, docs/papers.md §6): DiscoPOP (LRML, τ = 0.05) beats DPO and the other offline
preference losses. Experiment, on the built-in checkable instruction task (as ``benchmarks.dpo_losses``): a tiny
byte-level Llama is SFT'd once (``benchmarks.dpo_losses.sft``); each loss then trains a copy of it with
``lit_modules.DPO`` (β = 0.05, precomputed reference log-probs) on the built-in ``PreferenceDataModule`` pairs
(seed 1), the same steps/batches/lr for every loss, once per training seed; the metric is the held-out reward
accuracy (fraction of held-out pairs with r_chosen > r_rejected, r = β·(log π − log π_ref)). Quick: LRML vs DPO,
150 SFT steps, 60 steps per loss on 1200 pairs (~70 CPU s); full: LRML vs every other loss, 400 SFT steps, 150 steps
per loss on 3000 pairs (30 trainings, ~12 min of one core); 3 training seeds in both (the spread is over seeds).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.claim_common import claim

SETTINGS = {
    "quick": {"seeds": 3, "sft_steps": 150, "steps": 60, "pairs": 1200, "losses": ["sigmoid"]},
    "full": {"seeds": 3, "sft_steps": 400, "steps": 150, "pairs": 3000,
             "losses": ["sigmoid", "ipo", "hinge", "kto_pair", "padll", "cell", "aql", "aqfl", "pfl"]},
}
COMMON = {"beta": 0.05, "tau": 0.05, "lr": 1e-4, "batch_size": 16, "sft_lr": 3e-3, "val_fraction": 0.1,
          "data_seed": 1}


def train_and_score(loss: str, seed: int, sft_dir: str, s: dict, out_dir: Path) -> tuple[float, int]:
    """Train a copy of the SFT policy with ``loss``; returns (held-out reward accuracy, held-out pairs)."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger

    from datamodules import PreferenceDataModule
    from lit_modules import DPO

    L.seed_everything(seed, verbose=False)
    module = DPO(model=sft_dir, loss=loss, beta=COMMON["beta"],
                 loss_kwargs={"tau": COMMON["tau"]} if loss == "discopop" else {}, lr=COMMON["lr"], warmup_steps=10,
                 precompute_ref_logps=True, ref_cache_dir=str(out_dir / "ref_cache"))
    data = PreferenceDataModule(num_examples=s["pairs"], seed=COMMON["data_seed"], batch_size=COMMON["batch_size"],
                                val_fraction=COMMON["val_fraction"])
    trainer = L.Trainer(max_steps=s["steps"], accelerator="cpu", devices=1, gradient_clip_val=1.0,
                        logger=TensorBoardLogger(out_dir / "tb", name=loss, version=f"seed{seed}"),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        val_check_interval=s["steps"], check_val_every_n_epoch=None, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    accuracy = float(trainer.validate(module, datamodule=data, verbose=False)[0]["val/reward_accuracy"])
    return accuracy, len(data.val_pairs)


def run(mode: str, seeds: int | None, out_dir: Path, progress) -> dict:
    from benchmarks.dpo_losses import sft

    s = SETTINGS[mode]
    n_seeds = seeds or s["seeds"]
    sft_dir = out_dir / "sft"
    if not (sft_dir / "config.json").exists():
        progress(f"SFT of the starting policy ({s['sft_steps']} steps)", 0.0)
        sft(argparse.Namespace(device="cpu", sft_lr=COMMON["sft_lr"], sft_steps=s["sft_steps"]), str(sft_dir))
    losses = ["discopop", *s["losses"]]
    acc: dict[str, list[float]] = {loss: [] for loss in losses}
    n_val = 0
    for seed in range(n_seeds):
        for i, loss in enumerate(losses):
            progress(f"seed {seed}: {loss} ({s['steps']} steps, β {COMMON['beta']})",
                     (seed * len(losses) + i) / (n_seeds * len(losses)))
            a, n_val = train_and_score(loss, seed, str(sft_dir), s, out_dir)
            acc[loss].append(a)
    claims = [claim(f"DiscoPOP (LRML) beats {'DPO' if loss == 'sigmoid' else loss} at β = 0.05",
                    "held-out reward accuracy", acc["discopop"], acc[loss],
                    "DPO (sigmoid)" if loss == "sigmoid" else loss, higher_is_better=True) for loss in s["losses"]]
    return {"claims": claims, "figures": [],
            "settings": {**s, **COMMON, "seeds": n_seeds, "held_out_pairs": n_val, "per_seed_accuracy": acc,
                         "model": "benchmarks.dpo_losses.MODEL (SFT'd once, seed 0)", "precompute_ref_logps": True}}
