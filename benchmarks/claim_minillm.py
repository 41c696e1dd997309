"""MiniLLM claims (``litpapers reproduce``): reverse-KL distillation vs KD (and SeqKD, SFT), and mode seeking.

Paper claims (Gu et al., ICLR 2024, docs/papers.md §1): (1) a student distilled with MiniLLM answers better than one
distilled with word-level KD, SeqKD or trained by SFT alone, (2) with less exposure bias, and (3) minimising the
reverse KL is mode seeking: a student that cannot represent the teacher puts little mass where the teacher has
little. Experiment, with the shipped configs (``configs/minillm/base.yaml`` composed with each row's file,
through ``cli.build_cli``): the built-in teacher and SFT student (``checkpoints/minillm_teacher``,
``checkpoints/minillm_student_sft``, trained on first use) are distilled for the same number of steps by each
objective, then every export is evaluated on the 200 held-out prompts (sampling at temperature 1): valid-answer rate
(the task's checker), Rouge-L, and ExAccErr at l = 4 against the teacher (``minillm_table._evaluate``). The toy
(``benchmarks.minillm_toy``) fits a factorised student to a correlated 2-token teacher by exact forward KL and by
MiniLLM's sampled reverse-KL estimator and compares their mass off the teacher's mode. Quick: MiniLLM vs KD,
2 training seeds of 150 steps (~0.3 CPU s per MiniLLM step, 0.07 per KD step), 2 evaluation seeds, 3 toy seeds;
with the built-in teacher and SFT student trained on first use (~200 CPU s) it costs ~6 min of one core. Full:
vs KD, SeqKD and the compute-matched SFT continuation, 3 training seeds of 400 steps, 7 toy seeds of 600 steps
(~13 min of one core once the built-in models exist; ``--seeds`` and ``SETTINGS`` make it larger).
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.claim_common import claim

SETTINGS = {
    "quick": {"seeds": 2, "steps": 150, "eval_seeds": 2, "baselines": ["kd"], "toy_seeds": 3, "toy_steps": 200},
    "full": {"seeds": 3, "steps": 400, "eval_seeds": 2, "baselines": ["kd", "seqkd", "sft"], "toy_seeds": 7,
             "toy_steps": 600},
}
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "minillm"
NUM_VAL = 200
EXPOSURE_BIAS_LENGTH = 4
NAMES = {"kd": "word-level KD", "seqkd": "SeqKD", "sft": "SFT (compute-matched)", "minillm": "MiniLLM"}
# the "SFT +N" row continues the SFT student with SFT (as benchmarks.minillm_table does)
SFT_CONTINUATION = ["--model.init_args.student", "checkpoints/minillm_student_sft", "--model.init_args.lr", "5e-4",
                    "--model.init_args.warmup_steps", "0"]
METRICS = (("valid_rate", "valid-answer rate", True), ("rougeL", "Rouge-L vs the reference answers", True),
           ("ex_acc_err", f"ExAccErr % at l = {EXPOSURE_BIAS_LENGTH} vs the teacher", False))


def row_configs(row: str) -> list[Path]:
    """The ``--config`` files of a table row: ``base.yaml`` is the MiniLLM row, the others compose after it;
    ``sft.yaml`` is standalone (continued from the SFT student, see :data:`SFT_CONTINUATION`)."""
    if row == "sft":
        return [CONFIGS / "sft.yaml"]
    return [CONFIGS / "base.yaml"] + ([] if row == "minillm" else [CONFIGS / f"{row}.yaml"])


def train_and_evaluate(row: str, seed: int, s: dict, out_dir: Path) -> dict:
    """``litpapers fit`` of the row's configs for ``s["steps"]`` steps, then evaluate the export."""
    from benchmarks.minillm_table import _evaluate
    from cli import build_cli

    export = out_dir / "exports" / f"{row}_seed{seed}"
    args = ["fit", *(a for c in row_configs(row) for a in ("--config", str(c))), "--trainer.max_steps", str(s["steps"]),
            "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
            "--model.init_args.export_dir", str(export), "--seed_everything", str(seed),
            "--trainer.logger.init_args.save_dir", str(out_dir / "tb"),
            "--trainer.logger.init_args.version", f"seed{seed}"]
    build_cli(args + (SFT_CONTINUATION if row == "sft" else []))
    return _evaluate(str(export), "cpu", s["eval_seeds"], NUM_VAL, EXPOSURE_BIAS_LENGTH)


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


def run(mode: str, seeds: int | None, out_dir: Path, progress) -> dict:
    s = SETTINGS[mode]
    n_seeds = seeds or s["seeds"]
    progress(f"toy mode-seeking fit ({s['toy_seeds']} seeds)", 0.0)
    toy, toy_settings = toy_claim(s)
    rows = ["minillm", *s["baselines"]]
    evals: dict[str, list[dict]] = {row: [] for row in rows}
    for seed in range(n_seeds):
        for i, row in enumerate(rows):
            progress(f"seed {seed}: {row} ({s['steps']} steps; the built-in teacher and SFT student are trained "
                     "first if missing, ~3 min) + evaluation", (seed * len(rows) + i) / (n_seeds * len(rows)))
            evals[row].append(train_and_evaluate(row, seed, s, out_dir))
    claims = []
    for base in s["baselines"]:
        for key, metric, higher in METRICS:
            claims.append(claim(f"MiniLLM beats {NAMES[base]}", metric, [r[key] for r in evals["minillm"]],
                                [r[key] for r in evals[base]], NAMES[base], higher_is_better=higher))
    claims.append(toy)
    return {"claims": claims, "figures": [],
            "settings": {**s, "seeds": n_seeds, "held_out_prompts": NUM_VAL, "sampling": "temperature 1",
                         "configs": {row: [c.relative_to(CONFIGS.parents[1]).as_posix() for c in row_configs(row)]
                                     for row in rows},
                         "per_seed": evals, "toy": toy_settings}}
