"""MiniLLM's results table on the built-in instruction tasks: every ``configs/minillm`` row through the CLI.

    python -m benchmarks.minillm_table [--quick] [--device cpu|cuda] [--workdir outputs/minillm_table]
                                       [--train-seeds 0 1 2] [--exposure-bias]

Pipeline (each step is ``litpapers fit --config configs/minillm/base.yaml --config configs/minillm/<row>.yaml``,
or the standalone ``teacher_sft.yaml`` / ``sft.yaml``, run in ``--workdir``): teacher_sft → sft (the student's SFT,
also the initialisation of every other row) → one run per row (``base`` alone is the MiniLLM row).
"SFT +N" continues the SFT student with SFT for the same number of steps as the distillation rows
(compute-matched baseline). Each model is then evaluated on the same held-out prompts: Rouge-L (best over
the valid answers), the rate of valid answers (the task's checker) and the mean response length, sampling
at temperature 1 (``--eval-seeds`` seeds, averaged). With several ``--train-seeds`` every row (not the teacher and
the SFT initialisation, which are shared) is trained once per seed (``--seed_everything``) and the table shows
mean ± standard deviation over the seeds. ``--exposure-bias`` adds an ExAccErr column (paper §3.3): each student
row's excess accumulated error against the teacher at length ``--exposure-bias-length`` (default 4, the answers'
typical length: beyond it few sequences are alive and single outliers dominate the curve), on the same prompts,
prefixes sampled at temperature 1 (``callbacks.generation_eval.measure_exposure_bias``; all eval seeds × prompts
pooled).
Prints a markdown table, then one JSON object last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "minillm"
BASE_EXPORTS = {"teacher_sft": "checkpoints/minillm_teacher", "sft": "checkpoints/minillm_student_sft"}
ROWS = [("SFT +N (no KD)", "sft", True), ("KD", "kd", False), ("SeqKD", "seqkd", False),
        ("GKD reverse KL", "gkd_reverse", False), ("MiniLLM", "base", False),
        ("MiniLLM w/o PT loss (lm_coef 0)", "minillm_no_pt", False),
        ("MiniLLM, L_PT on the SFT data (= KD + PG)", "minillm_pt_sft", False),
        ("MiniLLM w/o length norm", "minillm_no_length_norm", False),
        ("MiniLLM w/o teacher-mix", "minillm_no_teacher_mix", False),
        ("MiniLLM w/o single-step", "minillm_no_single_step", False)]
STANDALONE = ("teacher_sft", "sft", "base")  # every other config is a row file composed after base.yaml


def config_args(config: str) -> list[str]:
    """The ``--config`` arguments of a shipped MiniLLM config name."""
    row = [] if config in STANDALONE else ["--config", str(CONFIGS / "base.yaml")]
    return row + ["--config", str(CONFIGS / f"{config}.yaml")]


def _fit(config: str, steps: int, extra: list[str], device: str):
    from training.cli import build_cli

    args = ["fit", *config_args(config), "--trainer.max_steps", str(steps),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.accelerator", device, "--trainer.limit_val_batches", "0"] + extra
    t = time.perf_counter()
    cli = build_cli(args)
    return cli, time.perf_counter() - t


def _require_export(config: str, steps: int, extra: list[str], device: str):
    """``--eval-only`` stand-in for :func:`_fit`: the export that run would write must already be there."""
    from lit_modules.builtin_checkpoints import is_finished_export

    flag = "--model.init_args.export_dir"
    path = extra[extra.index(flag) + 1] if flag in extra else BASE_EXPORTS[config]
    if not is_finished_export(path):
        raise SystemExit(f"--eval-only: no finished export at {Path(path).resolve()}; run without --eval-only first")
    return None, 0.0


#: the held-out prompts of the tiny-model table (``InstructionDataModule`` arguments; ``num_val`` comes apart)
EVAL_DATA = {"num_examples": 6000, "batch_size": 50, "max_response_length": 16, "seed": 0,
             "template": "Q: {instruction}\nA: "}


def _evaluate(student_dir: str, device: str, seeds: int, num_val: int, exposure_bias_length: int | None = None,
              teacher: str = "checkpoints/minillm_teacher", data: dict | None = None) -> dict[str, float]:
    """Validate the exported model at ``student_dir`` (as an SFT-objective MiniLLM: no teacher needed) on the
    held-out prompts of ``InstructionDataModule(**data, num_val=num_val)`` (default :data:`EVAL_DATA`); with
    ``exposure_bias_length`` also its ExAccErr against ``teacher``."""
    import lightning as L

    from callbacks import GenerationEval
    from datamodules import InstructionDataModule
    from lit_modules import MiniLLM

    runs = []
    for seed in range(seeds):
        module = MiniLLM(student=student_dir, teacher=None, objective="sft", max_new_tokens=16, eval_seed=1000 * seed)
        trainer = L.Trainer(accelerator=device, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[GenerationEval(exposure_bias=False)])
        runs.append(trainer.validate(module, InstructionDataModule(**(data or EVAL_DATA), num_val=num_val),
                                     verbose=False)[0])
    keys = ("val/rougeL", "val/valid_rate", "val/response_length", "val/loss")
    out = {k.split("/")[1]: statistics.mean(float(r[k]) for r in runs) for k in keys}
    if exposure_bias_length is None:
        return out
    return out | _exposure_bias(student_dir, device, seeds, num_val, exposure_bias_length, teacher, data)


def _exposure_bias(student_dir: str, device: str, seeds: int, num_val: int, length: int,
                   teacher_dir: str = "checkpoints/minillm_teacher", data: dict | None = None) -> dict[str, float]:
    """ExAccErr (%) at ``length`` of the student at ``student_dir`` against ``teacher_dir``: for
    every eval seed and held-out prompt one temperature-1 sample from each model; per-step errors of all of them
    pooled into one curve (:func:`callbacks.generation_eval.excess_accumulated_error`)."""
    from datamodules import InstructionDataModule
    from lm.hf import load_causal_lm
    from lm.tokenizers import load_tokenizer
    from callbacks.generation_eval import excess_accumulated_error, measure_exposure_bias

    tok = load_tokenizer(None, student_dir)
    student = load_causal_lm(student_dir).to(device).eval()
    teacher = load_causal_lm(teacher_dir).to(device).eval()
    data = InstructionDataModule(**(data or EVAL_DATA), num_val=num_val, tokenizer=student_dir)
    data.setup("validate")
    parts = []
    for seed in range(seeds):
        gen = torch.Generator(device).manual_seed(1000 * seed)
        for b in data.val_dataloader():
            parts.append(measure_exposure_bias(student, teacher, b["prompt_input_ids"].to(device),
                                               b["prompt_attention_mask"].to(device), 16, tok.eos_token_id,
                                               tok.pad_token_id, gen))
    fields = ("kl_student_prefixes", "mask_student", "kl_teacher_prefixes", "mask_teacher")
    curve = excess_accumulated_error(*(torch.cat([getattr(p, f) for p in parts]) for f in fields))
    return {"ex_acc_err": float(curve[length - 1])}


def _mean_and_std(runs: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over training seeds, plus ``<metric>_std`` (sample std) when there are several."""
    out = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
    if len(runs) > 1:
        out |= {f"{k}_std": statistics.stdev(r[k] for r in runs) for k in runs[0]}
        out["per_seed"] = runs
    return out


def _format(row: dict, key: str, digits: int) -> str:
    std = row.get(f"{key}_std")
    return f"{row[key]:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="a few steps per stage (smoke test, meaningless numbers)")
    ap.add_argument("--workdir", default="outputs/minillm_table")
    ap.add_argument("--teacher-steps", type=int, default=None)
    ap.add_argument("--sft-steps", type=int, default=None)
    ap.add_argument("--row-steps", type=int, default=None, help="optimizer steps per distillation row")
    ap.add_argument("--eval-seeds", type=int, default=None)
    ap.add_argument("--num-val", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", nargs="*", default=None, help="subset of row config names")
    ap.add_argument("--reuse", action="store_true",
                    help="keep the teacher, SFT student and row exports already in --workdir (train only what is missing)")
    ap.add_argument("--train-seeds", type=int, nargs="+", default=[0], help="training seeds of the distillation rows")
    ap.add_argument("--exposure-bias", action="store_true", help="add an ExAccErr column (vs the teacher)")
    ap.add_argument("--exposure-bias-length", type=int, default=4, help="l of the ExAccErr(l) column (1..16)")
    ap.add_argument("--out", default=None, help="also write the JSON object to this file")
    ap.add_argument("--eval-only", action="store_true",
                    help="train nothing: evaluate the exports a previous run (same --train-seeds) left in --workdir")
    args = ap.parse_args(argv)
    command = "python -m benchmarks.minillm_table " + " ".join(argv if argv is not None else sys.argv[1:])
    out_file = Path(args.out).resolve() if args.out else None
    teacher_steps = args.teacher_steps or (20 if args.quick else 1000)
    sft_steps = args.sft_steps or (10 if args.quick else 600)
    row_steps = args.row_steps or (8 if args.quick else 200)
    seeds = args.eval_seeds or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)  # the configs write checkpoints/ and logs/ relative to the working directory

    from lit_modules.builtin_checkpoints import is_finished_export

    results, wall = [], {}
    fit = _require_export if args.eval_only else _fit
    eb_length = args.exposure_bias_length if args.exposure_bias else None
    if not (args.reuse and Path("checkpoints/minillm_teacher/config.json").exists()):
        _, wall["teacher_sft"] = fit("teacher_sft", teacher_steps, [], args.device)
    results.append({"row": "Teacher (SFT)", "config": "teacher_sft", "steps": teacher_steps,
                    **_evaluate("checkpoints/minillm_teacher", args.device, seeds, args.num_val)})
    if not (args.reuse and Path("checkpoints/minillm_student_sft/config.json").exists()):
        _, wall["sft_init"] = fit("sft", sft_steps, [], args.device)
    results.append({"row": "SFT (student init)", "config": "sft", "steps": sft_steps,
                    **_evaluate("checkpoints/minillm_student_sft", args.device, seeds, args.num_val,
                                eb_length)})
    for label, config, is_sft in ROWS:
        if args.rows and config not in args.rows:
            continue
        per_seed = []
        for seed in args.train_seeds:
            export = f"checkpoints/minillm_row_{config}" + (f"_seed{seed}" if len(args.train_seeds) > 1 else "")
            extra = ["--model.init_args.export_dir", export, "--seed_everything", str(seed)]
            if is_sft:  # continue the SFT student with SFT for the rows' number of steps
                extra += ["--model.init_args.student", "checkpoints/minillm_student_sft", "--model.init_args.lr",
                          "5e-4", "--model.init_args.warmup_steps", "0"]
            if not (args.reuse and is_finished_export(export)):
                _, wall[f"{config}_seed{seed}"] = fit(config, row_steps, extra, args.device)
            per_seed.append(_evaluate(export, args.device, seeds, args.num_val, eb_length))
        results.append({"row": label, "config": config, "steps": row_steps, "train_seeds": args.train_seeds,
                        **_mean_and_std(per_seed)})

    lines = ["| row | config | optimizer steps | Rouge-L | valid-answer rate | mean response tokens | val CE |"
             + (f" ExAccErr % (l = {args.exposure_bias_length}) |" if args.exposure_bias else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if args.exposure_bias else "")]
    for r in results:
        cells = [_format(r, key, digits) if key in r else "—"
                 for key, digits in (("rougeL", 3), ("valid_rate", 3), ("response_length", 2), ("loss", 3))
                 + ((("ex_acc_err", 1),) if args.exposure_bias else ())]
        lines.append(f"| {r['row']} | {r['config']}.yaml | {r['steps']} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    out = {"benchmark": "minillm_table", "command": command,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores visible (shared with other jobs)",
           "device": args.device, "threads": args.threads, "quick": args.quick,
           "settings": {"teacher_steps": teacher_steps, "sft_steps": sft_steps, "row_steps": row_steps,
                        "train_seeds": args.train_seeds, "configs": "configs/minillm (base.yaml + row files)"},
           "eval": {"num_val": args.num_val, "sampling": "temperature 1", "seeds": seeds},
           "rows": results, "wall_seconds": wall}
    print(json.dumps(out, indent=1))
    if out_file is not None:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
