"""MiniLLM claims (``litpapers reproduce``): reverse-KL distillation vs word-level KD and SeqKD, and mode seeking.

    python -m benchmarks.claim_minillm [--full] [--seeds N] [--out DIR]

Paper claims (Gu et al., ICLR 2024, docs/papers.md §1): (1) a student distilled from a much stronger teacher with
MiniLLM answers better than one distilled with word-level KD or SeqKD, or trained by SFT alone (paper §3.2, Table 1),
(2) with less exposure bias (§3.3, ExAccErr), and (3) minimising the reverse KL is mode seeking: a student that
cannot represent the teacher puts little mass where the teacher has little (§2.1, Fig. 2).

Design (the paper's regime, §3.1: an SFT'd teacher far above an SFT'd student of smaller capacity; every
distillation method starts from that SFT'd student). Steps, all on the built-in instruction tasks
(``InstructionDataModule``, the data of ``configs/minillm``):

1. Teacher and student are trained by SFT from scratch (:func:`sft`; the two recipes are :data:`TEACHER` and
   :data:`STUDENT`, overridable per mode) into ``out_dir/models/`` (reused on a rerun when the recipe matches).
   The student every method starts from is SFT'd for ``student.steps``; a second run of ``1/plateau_factor`` as
   many steps (its own cosine schedule) shows how much the last part of the SFT still added (the plateau
   evidence: both rates reported in ``settings["check"]``).
2. The teacher-above-student check (:func:`check_teacher_above_student`): valid-answer rate on the held-out prompts,
   sampling at temperature 1; the teacher must beat the *better* of the two student runs by ``margin``, else the
   benchmark stops with an error instead of giving a verdict on a regime the paper does not study.
3. KD (word-level), SeqKD and MiniLLM (``configs/minillm/base.yaml`` composed with ``kd.yaml`` / ``seqkd.yaml``
   through ``build_cli``, teacher and student paths overridden) each start from the same plateaued student and
   run the same number of optimizer steps. Each method's learning rate is chosen on a grid fixed in advance
   (``lr_grid``), by valid-answer rate on a *development* set of prompts (the task generator with another seed),
   training with ``tune_seed``, which is not one of the evaluation training seeds 0 .. seeds−1.
4. Every evaluation-seed export is scored on the held-out prompts (``num_val`` prompts, sampling at temperature 1,
   ``eval_seeds`` sampling seeds averaged; ``minillm_table._evaluate``): valid-answer rate (the task's checker),
   Rouge-L against the references and ExAccErr at l = 4 against the teacher (§3.3). The plateaued SFT student is
   the "SFT w/o KD" baseline (paper Table 1).
5. The toy (``benchmarks.minillm_toy``): a factorised student fitted to a correlated 2-token teacher by exact forward
   KL and by MiniLLM's sampled reverse-KL estimator; their mass off the teacher's mode.

Sizes (chosen by a pilot on the shared 2-core CPU, one thread, SFT with warm-up + cosine, valid-answer rate on the
200 held-out prompts, one sampling seed): the teacher is the Llama of ``configs/minillm/teacher_sft.yaml`` (hidden
128, 3 layers), trained 3000 steps (full) / 1200 (quick); the student is a Llama of hidden 8, 1 layer, 2 heads.
Why so small: the tasks are easy, and wider students kept improving with SFT steps up to the teacher's level (pilot:
hidden 32 × 1 layer 0.80 after 4000 steps, hidden 16 × 1 layer 0.67 after 3000 and still rising, against a
teacher at 0.80 after a 1200-step run and 0.85 half-way through a 3000-step one), while hidden 8 levelled off
(0.21 / 0.26 / 0.29 at 2000 / 3000 / 4000 of a 4000-step run). SFT of the student: lr 1e-2, 6000 steps (full) /
3000 (quick), plateau-evidence run half as long; margin of the check: 0.15. Distillation: 400 steps (full) / 100 (quick),
batch 32, the rest as ``configs/minillm/base.yaml`` (MiniLLM: teacher-mixed sampling α 0.2, PPO clip 0.2 over 4 inner
epochs, length normalisation, single-step term, L_PT on the pretraining corpus, paper §2.2–2.3).
Learning-rate grid: {1e-3, 3e-3, 1e-2} (full), {3e-3, 1e-2} (quick): up to the student's own SFT lr (1e-2; the
quick pilot's KD winner, 3e-3, sat on the edge of the first grid {1e-3, 3e-3}), fixed before the final runs.

Cost (CPU seconds of one core from nothing, teacher and student SFT included; reported in ``settings["cpu_seconds"]``
of every run): quick about 4.5 min (measured: ``python -m benchmarks.claim_minillm``, 2026-12-07, machine shared with
three other jobs); full: see ``cpu_seconds`` in the committed full report (``docs/results/full``).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.claim_common import claim, claim_parser, mode_settings, run_and_record

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "minillm"
EXPOSURE_BIAS_LENGTH = 4
#: ``sft`` is the compute-matched SFT continuation of ``benchmarks.claim_real``; ``sft_start`` is this benchmark's
#: "SFT w/o KD" baseline, the plateaued SFT student every method starts from
NAMES = {"kd": "word-level KD", "seqkd": "SeqKD", "sft": "SFT (compute-matched)",
         "sft_start": "SFT w/o KD (the plateaued student)", "minillm": "MiniLLM"}
METHODS = ("minillm", "kd", "seqkd")  # every distillation method; each starts from the SFT student
METRICS = (("valid_rate", "valid-answer rate", True), ("rougeL", "Rouge-L vs the reference answers", True),
           ("ex_acc_err", f"ExAccErr % at l = {EXPOSURE_BIAS_LENGTH} vs the teacher", False))
#: the data of configs/minillm (held-out prompts = its validation split); the development prompts for the lr choice
#: come from the same generator with another seed
DATA = {"num_examples": 6000, "batch_size": 32, "max_response_length": 16, "seed": 0, "template": "Q: {instruction}\nA: "}
DEV_DATA_SEED = 1


def llama(hidden: int, layers: int, heads: int) -> dict:
    return {"model_type": "llama", "hidden_size": hidden, "intermediate_size": 3 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": heads}


#: SFT recipes (CE on the responses, AdamW, warm-up then cosine); the teacher is configs/minillm/teacher_sft.yaml's model
TEACHER = {"model": llama(128, 3, 4), "steps": 3000, "lr": 2e-3, "warmup_steps": 50}
STUDENT = {"model": llama(8, 1, 2), "steps": 6000, "lr": 1e-2, "warmup_steps": 50}
SETTINGS = {
    "quick": {"seeds": 2, "tune_seed": 100, "methods": ["minillm", "kd"], "steps": 100, "lr_grid": [3e-3, 1e-2],
              "teacher": TEACHER | {"steps": 1200}, "student": STUDENT | {"steps": 3000}, "plateau_factor": 2,
              "margin": 0.15, "num_val": 200, "eval_seeds": 1, "toy_seeds": 3, "toy_steps": 200},
    "full": {"seeds": 3, "tune_seed": 100, "methods": list(METHODS), "steps": 400, "lr_grid": [1e-3, 3e-3, 1e-2],
             "teacher": TEACHER, "student": STUDENT, "plateau_factor": 2, "margin": 0.15,
             "num_val": 200, "eval_seeds": 2, "toy_seeds": 7, "toy_steps": 600},
}
DESIGN = ("Teacher (Llama {t}) SFT'd {tsteps} steps, checked to beat the SFT student (Llama {s}, {ssteps} steps, "
          "near its plateau) by >= {margin} valid-answer rate; MiniLLM, word-level KD and SeqKD each start from that "
          "student and run {steps} "
          "equal steps, each at its best lr on a fixed grid (chosen on a separate tuning seed and dev prompts); "
          "{seeds} evaluation seeds, temperature-1 sampling on held-out prompts.")


class TeacherNotAboveStudent(RuntimeError):
    """The teacher is not clearly better than the converged student: the paper's premise fails."""


def check_teacher_above_student(teacher_rate: float, student_rates: dict[str, float], margin: float) -> float:
    """Return teacher_rate − max(student_rates); raise :class:`TeacherNotAboveStudent` if that is below ``margin``.

    The paper distils a teacher far above the student (§3.1: e.g. GPT-2 1.5B into 120M); when the student alone gets
    as good as the teacher, KD and SFT gain from ground-truth supervision MiniLLM lacks and the comparison says
    nothing about the method."""
    best = max(student_rates, key=student_rates.get)
    gap = teacher_rate - student_rates[best]
    if gap < margin:
        raise TeacherNotAboveStudent(
            f"teacher valid-answer rate {teacher_rate:.3f} is not above the converged student's ({best}: "
            f"{student_rates[best]:.3f}) by the margin {margin} (gap {gap:.3f}): train the teacher longer or make "
            "the student smaller (SETTINGS['teacher'/'student'])")
    return gap


# ------------------------------------------------------------------------------------------------- training
def _finished(export: Path, recipe: dict) -> bool:
    from lit_modules.builtin_checkpoints import is_finished_export

    tag = export / "recipe.json"
    return is_finished_export(export) and tag.is_file() and json.loads(tag.read_text()) == recipe


def sft(recipe: dict, export: Path, seed: int = 0) -> float:
    """SFT a model from scratch as ``recipe`` says (``lit_modules.MiniLLM`` objective ``sft``: cross-entropy on the
    responses; warm-up then cosine decay) and ``save_pretrained`` it to ``export``; returns the CPU seconds it took
    (0 when a finished export of the same recipe is already there)."""
    if _finished(export, recipe):
        return 0.0
    import lightning as L

    from datamodules import InstructionDataModule
    from lit_modules import MiniLLM

    start = time.process_time()
    L.seed_everything(seed, verbose=False)
    module = MiniLLM(student=recipe["model"], teacher=None, objective="sft", lr=recipe["lr"],
                     warmup_steps=recipe["warmup_steps"], max_new_tokens=16, export_dir=str(export), init_seed=seed)
    trainer = L.Trainer(max_steps=recipe["steps"], accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=1.0, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, InstructionDataModule(**DATA, num_val=200))
    (export / "recipe.json").write_text(json.dumps(recipe))
    return time.process_time() - start


def _fit(args: list[str]) -> None:
    """``litpapers fit`` with ``args`` (one place, so tests can record the runs)."""
    from training.cli import build_cli

    build_cli(["fit", *args])


def row_configs(method: str) -> list[Path]:
    """The ``--config`` files of a method: ``base.yaml`` is MiniLLM, the baselines' row files compose after it."""
    return [CONFIGS / "base.yaml"] + ([] if method == "minillm" else [CONFIGS / f"{method}.yaml"])


def distill(method: str, lr: float, seed: int, steps: int, student: Path, teacher: Path, export: Path,
            log_dir: Path) -> Path:
    """``method``'s shipped configs, from ``student`` with ``teacher``, for ``steps`` optimizer steps at ``lr``."""
    args = [*(a for c in row_configs(method) for a in ("--config", str(c))),
            "--model.init_args.student", str(student), "--model.init_args.teacher", str(teacher),
            "--model.init_args.lr", str(lr), "--model.init_args.export_dir", str(export),
            "--trainer.max_steps", str(steps), "--seed_everything", str(seed),
            "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--trainer.logger.init_args.save_dir", str(log_dir), "--trainer.logger.init_args.name", method,
            "--trainer.logger.init_args.version", export.name]
    _fit(args)
    return export


def evaluate(model: Path, s: dict, teacher: Path | None = None, dev: bool = False) -> dict[str, float]:
    """Valid-answer rate, Rouge-L (and with ``teacher`` ExAccErr) of ``model`` on the held-out prompts (``dev``: the
    development prompts), temperature-1 sampling, ``eval_seeds`` sampling seeds (``minillm_table._evaluate``)."""
    from benchmarks.minillm_table import _evaluate

    data = DATA | {"batch_size": 50} | ({"seed": DEV_DATA_SEED} if dev else {})
    return _evaluate(str(model), "cpu", s["eval_seeds"], s["num_val"],
                     None if teacher is None else EXPOSURE_BIAS_LENGTH, str(teacher or ""), data)


def prepare_models(s: dict, out_dir: Path, progress: Callable[[str], None]) -> dict:
    """Steps 1–2 of the design: teacher and student (and the student's longer plateau run) trained, evaluated and
    checked. Returns the paths, the measured rates and the CPU seconds of the trainings."""
    models = out_dir / "models"
    student_short = s["student"] | {"steps": s["student"]["steps"] // s["plateau_factor"]}
    paths = {"teacher": models / "teacher", "student": models / "student_sft",
             "student_short": models / "student_sft_short"}
    cpu = {}
    for name, recipe in (("teacher", s["teacher"]), ("student", s["student"]), ("student_short", student_short)):
        progress(f"minillm: SFT of the {name.replace('_', ' ')} ({recipe['steps']} steps)")
        cpu[name] = round(sft(recipe, paths[name]), 1)
    progress("minillm: teacher-above-student check (valid-answer rate on the held-out prompts)")
    scores = {name: evaluate(path, s) for name, path in paths.items()}
    rates = {name: scores[name]["valid_rate"] for name in paths}
    gap = check_teacher_above_student(rates["teacher"], {f"student after {s['student']['steps']} steps":
                                                         rates["student"],
                                                         f"student after {student_short['steps']} steps":
                                                         rates["student_short"]}, s["margin"])
    return {"paths": paths, "scores": scores, "gap": gap, "cpu_seconds": cpu}


# ------------------------------------------------------------------------------------------------- the claims
def toy_claim(s: dict) -> tuple[dict, dict]:
    """Mass off the teacher's mode: MiniLLM's reverse-KL estimator vs exact forward KL, per toy seed."""
    from benchmarks.minillm_toy import fit

    kw = {"vocab": 2, "steps": s["toy_steps"], "batch": 64, "lr": 0.05}
    ours = [fit("reverse_kl_minillm_estimator", seed=i, **kw)["mass_off_mode"] for i in range(s["toy_seeds"])]
    base = [fit("forward_kl_exact", seed=i, **kw)["mass_off_mode"] for i in range(s["toy_seeds"])]
    row = claim("toy: reverse KL (MiniLLM estimator) is mode seeking",
                "student mass on sequences the teacher makes with p = 0.02", ours, base, "forward KL (exact)",
                higher_is_better=False)
    return row, kw | {"seeds": s["toy_seeds"], "per_seed": {"minillm_estimator": ours, "forward_kl": base}}


def run(mode: str, seeds: int | None, out_dir: Path, progress: Callable[[str], None],
        overrides: dict | None = None) -> dict:
    s = mode_settings(SETTINGS, mode, seeds, overrides)
    out_dir, cpu_start = Path(out_dir), time.process_time()
    eval_seeds = list(range(s["seeds"]))
    if s["tune_seed"] in eval_seeds:
        raise ValueError(f"tune_seed {s['tune_seed']} is one of the evaluation seeds {eval_seeds}")
    progress(f"minillm: toy mode-seeking fit ({s['toy_seeds']} seeds)")
    toy, toy_settings = toy_claim(s)
    prep = prepare_models(s, out_dir, progress)
    teacher, student = prep["paths"]["teacher"], prep["paths"]["student"]
    exports = out_dir / "exports"

    def train(method: str, lr: float, seed: int, tag: str) -> Path:
        progress(f"minillm: {method} lr {lr:g} seed {seed} ({tag}, {s['steps']} steps)")
        return distill(method, lr, seed, s["steps"], student, teacher, exports / f"{tag}_{method}_lr{lr:g}_seed{seed}",
                       out_dir / "tb")

    tuning = {m: {f"{lr:g}": evaluate(train(m, lr, s["tune_seed"], "tune"), s, dev=True) for lr in s["lr_grid"]}
              for m in s["methods"]}
    best_lr = {m: max(s["lr_grid"], key=lambda lr: (tuning[m][f"{lr:g}"]["valid_rate"], tuning[m][f"{lr:g}"]["rougeL"]))
               for m in s["methods"]}
    evals = {m: [evaluate(train(m, best_lr[m], seed, "eval"), s, teacher=teacher) for seed in eval_seeds]
             for m in s["methods"]}
    sft_student = evaluate(student, s, teacher=teacher)
    evals["sft_start"] = [sft_student] * len(eval_seeds)  # deterministic: the same start for every seed
    claims = []
    for base in [m for m in s["methods"] if m != "minillm"] + ["sft_start"]:
        for key, metric, higher in METRICS:
            claims.append(claim(f"MiniLLM beats {NAMES[base]}", metric, [r[key] for r in evals["minillm"]],
                                [r[key] for r in evals[base]], NAMES[base], higher_is_better=higher))
    claims.append(toy)
    figures = [draw(evals, prep["scores"], s, out_dir)]
    rates = {k: round(v["valid_rate"], 4) for k, v in prep["scores"].items()}
    check = {"teacher_valid_rate": rates["teacher"],
             f"student_valid_rate_{s['student']['steps']}_steps": rates["student"],
             f"student_valid_rate_{s['student']['steps'] // s['plateau_factor']}_steps": rates["student_short"],
             "gap": round(prep["gap"], 4), "margin": s["margin"], "rule": "teacher − max(student runs) >= margin"}
    size = "hidden {hidden_size} × {num_hidden_layers} layers".format_map
    design = DESIGN.format(t=size(s["teacher"]["model"]), s=size(s["student"]["model"]), tsteps=s["teacher"]["steps"],
                           ssteps=s["student"]["steps"], margin=s["margin"], steps=s["steps"], seeds=s["seeds"])
    if "seqkd" not in s["methods"]:
        design = design.replace(", word-level KD and SeqKD", " and word-level KD")
    return {"claims": claims, "figures": figures,
            "settings": {**s, "design": design, "check": check, "teacher_scores": prep["scores"]["teacher"],
                         "student_scores": {"plateau_evidence_run": prep["scores"]["student_short"], "start": sft_student},
                         "sft_cpu_seconds": prep["cpu_seconds"], "eval_seeds_training": eval_seeds,
                         "lr_tuning": {"grid": s["lr_grid"], "seed": s["tune_seed"], "data_seed": DEV_DATA_SEED,
                                       "criterion": "valid-answer rate on the dev prompts (tie: Rouge-L)",
                                       "results": {m: {lr: r["valid_rate"] for lr, r in t.items()}
                                                   for m, t in tuning.items()},
                                       "chosen": best_lr},
                         "sampling": "temperature 1",
                         "configs": {m: [c.relative_to(CONFIGS.parents[1]).as_posix() for c in row_configs(m)]
                                     for m in s["methods"]},
                         "per_seed": evals, "toy": toy_settings,
                         "cpu_seconds": round(time.process_time() - cpu_start, 1)}}


def draw(evals: dict, scores: dict, s: dict, out_dir: Path) -> str:
    """Valid-answer rate per method (bar = mean, dots = seeds), with the teacher and the SFT student as lines."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6), dpi=72)
    ax = fig.subplots()
    methods = [m for m in s["methods"]]
    for i, m in enumerate(methods):
        vals = [r["valid_rate"] for r in evals[m]]
        ax.bar(i, statistics.fmean(vals), color=f"C{i}", alpha=0.5)
        ax.plot([i] * len(vals), vals, "o", color=f"C{i}")
    ax.axhline(scores["teacher"]["valid_rate"], color="k", linestyle="--", label="teacher")
    ax.axhline(scores["student"]["valid_rate"], color="gray", linestyle=":", label="SFT student (start)")
    ax.axhline(scores["student_short"]["valid_rate"], color="gray", linestyle="-.", alpha=0.6,
               label=f"SFT student, 1/{s['plateau_factor']} of the steps")
    ax.set_xticks(range(len(methods)), [NAMES[m] for m in methods])
    ax.set(ylabel="valid-answer rate (held-out, T = 1)", ylim=(0, 1),
           title=f"{s['steps']} distillation steps from the same student")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "minillm_valid_rate.png"
    fig.savefig(out_dir / name, dpi=90)
    return name


def main(argv: list[str] | None = None) -> dict:
    parser = claim_parser(__doc__, "claim_minillm")
    parser.add_argument("--steps", type=int, default=None, help="distillation steps per method")
    args = parser.parse_args(argv)
    overrides = {"steps": args.steps} if args.steps is not None else None
    return run_and_record(run, args, overrides, "claim_minillm", argv)


if __name__ == "__main__":
    main()
