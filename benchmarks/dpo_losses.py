"""DPO vs DiscoPOP vs the other preference losses on the built-in checkable instruction task.

    python -m benchmarks.dpo_losses [--device cpu|cuda] [--quick] [--losses sigmoid,discopop,...]

1. SFT: a tiny byte-level Llama (``lit_modules.CausalLM``) is trained briefly on the built-in instruction task
   (``datamodules.InstructionDataModule``, seed 0) so that it answers some prompts validly — the starting
   policy and the reference of every preference run.
2. Preference pairs: ``datamodules.PreferenceDataModule`` built-in pairs (seed 1: chosen passes
   ``check_answer``, rejected is a plausible invalid answer); 10 % held out.
3. Each loss trains a copy of the SFT policy for the same steps, batches (same seed), β, lr and schedule,
   with precomputed reference log-probs (computed once, then served from the cache to every loss).
4. Evaluation: held-out reward accuracy (fraction of held-out pairs with r_chosen > r_rejected,
   r = β·(log π − log π_ref)), and on fresh prompts (seed 2) greedy answers are checked with
   ``check_answer``: validity rate, and the win rate vs the starting policy's greedy answers on the same prompts
   (win = only ours valid, loss = only the start's valid, tie = both or neither; win rate = (wins + ½ ties)/n).

Every loss runs at each β of ``--betas`` (default 0.05, the paper's, and 0.1) with each training seed of
``--seeds``. Prints one JSON object last (per β and loss: mean ± std over seeds and the raw runs, and each loss's
differences vs ``sigmoid`` (DPO) paired by seed, measured in the same run); ``--out`` also writes it to a file.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from datamodules import InstructionDataModule, PreferenceDataModule
from datamodules.instruction_tasks import check_answer, format_prompt, generate_examples
from lit_modules import DPO, CausalLM
from lit_modules.preference_losses import PREFERENCE_LOSSES
from lm.tensors import pad_sequences

MODEL = {"hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 4}
ALL_LOSSES = ("sigmoid", "discopop", "hinge", "ipo", "kto_pair", "padll", "cell", "aql", "aqfl", "pfl")


def trainer(args: argparse.Namespace, steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator=args.device, devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                     num_sanity_val_steps=0, **kwargs)


def sft(args: argparse.Namespace, out_dir: str) -> str:
    L.seed_everything(0, verbose=False)
    module = CausalLM(model=MODEL, init_seed=0, lr=args.sft_lr, warmup_steps=20, weight_decay=0.0)
    dm = InstructionDataModule(num_examples=4000, batch_size=32, seed=0, val_fraction=0.05)
    trainer(args, args.sft_steps, limit_val_batches=0).fit(module, datamodule=dm)
    return str(module.export(out_dir))


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, tokenizer, prompts: list[str], device: str, max_new_tokens: int = 12,
                   batch_size: int = 64) -> list[str]:
    """Greedy completions (up to EOS) of ``prompts``, left-padded batches, on ``device``."""
    model.eval().to(device)
    answers = []
    for i in range(0, len(prompts), batch_size):
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[i:i + batch_size]]
        input_ids = pad_sequences(ids, tokenizer.pad_token_id, left=True).to(device)
        mask = pad_sequences([[1] * len(x) for x in ids], 0, left=True).to(device)
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        answers += tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)
    return answers


def validity(examples: list[dict], answers: list[str]) -> list[bool]:
    return [check_answer(ex, a) for ex, a in zip(examples, answers)]


def win_rate(ours: list[bool], start: list[bool]) -> dict:
    wins = sum(o and not s for o, s in zip(ours, start))
    losses = sum(s and not o for o, s in zip(ours, start))
    ties = len(ours) - wins - losses
    return {"win_rate": (wins + 0.5 * ties) / len(ours), "wins": wins, "losses": losses, "ties": ties}


def run_loss(args: argparse.Namespace, loss: str, beta: float, seed: int, sft_dir: str, cache: str,
             eval_examples: list[dict], start_valid: list[bool]) -> dict:
    """Train one loss at one β with training seed ``seed`` (batch order, dropout); same data and split always."""
    L.seed_everything(seed, verbose=False)
    kwargs = {"tau": 0.05} if loss == "discopop" else {}
    module = DPO(model=sft_dir, loss=loss, beta=beta, loss_kwargs=kwargs, lr=args.lr, warmup_steps=10,
                 precompute_ref_logps=True, ref_cache_dir=cache)
    dm = PreferenceDataModule(num_examples=args.pairs, seed=1, batch_size=args.batch, val_fraction=0.1)
    t0 = time.perf_counter()
    tr = trainer(args, args.steps, limit_val_batches=0)
    tr.fit(module, datamodule=dm)
    train_s = time.perf_counter() - t0
    val = trainer(args, args.steps).validate(module, datamodule=dm, verbose=False)[0]
    prompts = [format_prompt(ex["instruction"], ex["context"]) for ex in eval_examples]
    valid = validity(eval_examples, greedy_answers(module.policy, module.tokenizer, prompts, args.device))
    return {"seed": seed, "val_reward_accuracy": val["val/reward_accuracy"],
            "val_reward_margin": val["val/reward_margin"], "val_loss": val["val/loss"],
            "valid_rate": sum(valid) / len(valid),
            **win_rate(valid, start_valid), "train_seconds": train_s}


METRICS = ("val_reward_accuracy", "valid_rate", "win_rate")


def aggregate(runs: list[dict]) -> dict:
    """Mean and sample standard deviation (0 for one seed) over seeds of every metric, plus the raw runs."""
    out: dict = {"per_seed": runs}
    for key in runs[0]:
        if key != "seed" and isinstance(runs[0][key], (int, float)):
            values = torch.tensor([float(r[key]) for r in runs], dtype=torch.float64)
            out[key] = values.mean().item()
            out[f"{key}_std"] = values.std().item() if len(runs) > 1 else 0.0
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="fewer steps/prompts, DPO and DiscoPOP only")
    p.add_argument("--losses", default=None, help=f"comma-separated, default all: {','.join(ALL_LOSSES)}")
    p.add_argument("--sft-steps", type=int, default=None)
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--steps", type=int, default=None, help="preference-optimisation steps per loss")
    p.add_argument("--batch", type=int, default=16, help="pairs per step")
    p.add_argument("--pairs", type=int, default=None,
                   help="built-in preference pairs, 10%% held out (default: one epoch of --steps)")
    p.add_argument("--betas", default="0.05,0.1", help="comma-separated β values (0.05 = the paper's)")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated training seeds (batch order, dropout)")
    p.add_argument("--out", default=None, help="also write the JSON here (e.g. docs/results/dpo_losses.json), "
                   "updated after every loss")
    p.add_argument("--merge", action="store_true",
                   help="keep the results already in --out (other β columns, other losses; same settings required)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eval-prompts", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch default)")
    p.add_argument("--sft-dir", default=None, help="reuse this SFT export if it exists, else write it there")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.sft_steps = args.sft_steps or (60 if args.quick else 400)
    args.steps = args.steps or (20 if args.quick else 150)
    args.eval_prompts = args.eval_prompts or (100 if args.quick else 300)
    args.pairs = args.pairs or max(200, round(args.steps * args.batch / 0.9) + 1)
    losses = args.losses.split(",") if args.losses else (["sigmoid", "discopop"] if args.quick else list(ALL_LOSSES))
    unknown = set(losses) - set(PREFERENCE_LOSSES)
    if unknown:
        raise SystemExit(f"unknown losses {sorted(unknown)}; choose from {sorted(PREFERENCE_LOSSES)}")
    torch.set_float32_matmul_precision("high")

    work = tempfile.mkdtemp(prefix="dpo_losses_")
    sft_dir, sft_s = args.sft_dir or os.path.join(work, "sft"), None  # sft_s stays None for a reused export
    if not os.path.exists(os.path.join(sft_dir, "config.json")):
        t0 = time.perf_counter()
        sft(args, sft_dir)
        sft_s = time.perf_counter() - t0
    eval_examples = generate_examples(args.eval_prompts, seed=2)
    start = CausalLM(model=sft_dir)
    start.configure_model()
    start = start.to(args.device)
    prompts = [format_prompt(ex["instruction"], ex["context"]) for ex in eval_examples]
    start_valid = validity(eval_examples, greedy_answers(start.model, start.tokenizer, prompts, args.device))
    del start

    betas = [float(b) for b in args.betas.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    report = {
        "benchmark": "dpo_losses", "commands": ["python -m benchmarks.dpo_losses " + " ".join(sys.argv[1:])],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": args.device, "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "settings": {"model": MODEL | {"vocab_size": 259}, "sft_steps": args.sft_steps, "sft_lr": args.sft_lr,
                     "po_steps": args.steps, "batch_pairs": args.batch, "pairs": args.pairs, "seeds": seeds,
                     "lr": args.lr, "eval_prompts": args.eval_prompts, "discopop_tau": 0.05,
                     "ipo_logps": "per-token mean (DPO default for ipo)", "other_logps": "summed",
                     "precompute_ref_logps": True, "sft_seconds": sft_s, "torch_threads": args.threads},
        "start_policy": {"valid_rate": sum(start_valid) / len(start_valid)},
        "results": {}, "minus_dpo": {},
    }
    if args.merge and args.out and Path(args.out).exists():
        report = merge_report(json.loads(Path(args.out).read_text()), report)
    for beta in betas:
        per_beta = report["results"].setdefault(f"beta={beta:g}", {})
        for loss in losses:
            by_seed = {run["seed"]: run for run in per_beta.get(loss, {}).get("per_seed", [])}  # from --merge
            by_seed |= {seed: run_loss(args, loss, beta, seed, sft_dir, os.path.join(work, "ref_cache"),
                                       eval_examples, start_valid) for seed in seeds}
            r = per_beta[loss] = aggregate([by_seed[k] for k in sorted(by_seed)])
            print(f"beta {beta:g} {loss:>9}: held-out reward acc {r['val_reward_accuracy']:.3f}"
                  f"±{r['val_reward_accuracy_std']:.3f}  valid {r['valid_rate']:.3f}  win rate vs start "
                  f"{r['win_rate']:.3f}  ({r['train_seconds']:.0f}s/seed)", flush=True)
            anchor = per_beta.get("sigmoid")
            if anchor:  # paired by seed: same batches and dropout draws for every loss
                report["minus_dpo"][f"beta={beta:g}"] = {name: paired_difference(res, anchor)
                                                         for name, res in per_beta.items()}
            report["settings"]["seeds"] = sorted({run["seed"] for per_loss in report["results"].values()
                                                  for res in per_loss.values() for run in res["per_seed"]})
            if args.out:  # written after every loss, so an interrupted run keeps what it measured
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))


def paired_difference(res: dict, anchor: dict) -> dict:
    """Mean ± std over the seeds both have of (metric − anchor's metric), for each of :data:`METRICS`."""
    anchor_runs = {run["seed"]: run for run in anchor["per_seed"]}
    pairs = [(run, anchor_runs[run["seed"]]) for run in res["per_seed"] if run["seed"] in anchor_runs]
    diffs = aggregate([{k: a[k] - b[k] for k in METRICS} for a, b in pairs])
    return {k: v for k, v in diffs.items() if k != "per_seed"} | {"seeds": [a["seed"] for a, _ in pairs]}


def merge_report(old: dict, new: dict) -> dict:
    """``new`` starting from ``old``'s per-β, per-loss, per-seed runs (a run measured again replaces its entry);
    both must have the same settings (but the seeds) and starting policy, so the numbers stay comparable. Runs
    of files written before runs carried their ``seed`` get it from the file's ``settings.seeds``, in order."""
    ignore = {"sft_seconds": None, "seeds": None}
    if old.get("settings", {}) | ignore != new["settings"] | ignore or old.get("start_policy") != new["start_policy"]:
        raise SystemExit("--merge: the existing --out file has other settings or another starting policy")
    merged = dict(new)
    merged["commands"] = old["commands"] + new["commands"]
    merged["results"] = {beta: {loss: res | {"per_seed": [{"seed": seed} | run for seed, run in
                                                         zip(old["settings"]["seeds"], res["per_seed"])]}
                                for loss, res in per_loss.items()} for beta, per_loss in old["results"].items()}
    merged["minus_dpo"] = dict(old["minus_dpo"])
    return merged

if __name__ == "__main__":
    main()
