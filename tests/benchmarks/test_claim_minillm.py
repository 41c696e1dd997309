"""benchmarks/claim_minillm.py: the design of the MiniLLM claim test (a teacher clearly above the converged student,
every method from the same student for equal steps, lr chosen on a tuning seed apart from the evaluation seeds),
with fake training and evaluation; and the real training/distillation calls for a few steps of tiny models."""

from pathlib import Path

import pytest

from benchmarks import claim_minillm as cm
from benchmarks.claim_common import claim

TINY = {"steps": 2, "toy_seeds": 2, "toy_steps": 2, "num_val": 4, "eval_seeds": 1}


def fake_toy(s):
    return claim("toy", "m", [0.1] * s["toy_seeds"], [0.5] * s["toy_seeds"], "fwd", False), {}


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.fixture
def fakes(monkeypatch):
    """Fake SFT, distillation and evaluation; ``rates`` sets the valid-answer rate by model folder name (a dev-set
    distillation export gets 0.1 + its lr × 100, so the grid's largest lr wins). Returns the recorded fit args."""
    calls: list[list[str]] = []
    rates = {"teacher": 0.9, "student_sft": 0.35, "student_sft_short": 0.3}

    def fake_sft(recipe, export, seed=0):
        export.mkdir(parents=True, exist_ok=True)
        return 0.0

    def fake_fit(args):
        calls.append(args)
        Path(option(args, "--model.init_args.export_dir")).mkdir(parents=True, exist_ok=True)

    def fake_evaluate(model, s, teacher=None, dev=False):
        name = Path(model).name
        rate = rates.get(name, 0.1 + 100 * float(option(calls[-1], "--model.init_args.lr")) if dev else 0.5)
        if not dev and name.startswith("eval_minillm"):
            rate = 0.6
        return {"valid_rate": rate, "rougeL": rate / 2, "ex_acc_err": 1.0, "response_length": 3.0, "loss": 1.0}

    monkeypatch.setattr(cm, "sft", fake_sft)
    monkeypatch.setattr(cm, "_fit", fake_fit)
    monkeypatch.setattr(cm, "evaluate", fake_evaluate)
    monkeypatch.setattr(cm, "toy_claim", fake_toy)
    return calls, rates


def test_check_needs_the_teacher_above_the_best_student_run():
    # the numbers: teacher 0.75, student 0.27 at the start but 0.88 after longer SFT -> refused
    with pytest.raises(cm.TeacherNotAboveStudent, match="0.880"):
        cm.check_teacher_above_student(0.75, {"start": 0.27, "longer SFT": 0.88}, margin=0.15)
    with pytest.raises(cm.TeacherNotAboveStudent):  # above, but by less than the margin
        cm.check_teacher_above_student(0.6, {"a": 0.5}, margin=0.15)
    assert cm.check_teacher_above_student(0.9, {"a": 0.5, "b": 0.6}, margin=0.15) == pytest.approx(0.3)


def test_run_refuses_before_distilling_when_the_teacher_is_not_better(fakes, tmp_path):
    calls, rates = fakes
    rates["student_sft_short"] = 0.85  # a student run near the teacher: refused, whichever run it is
    with pytest.raises(cm.TeacherNotAboveStudent):
        cm.run("quick", None, tmp_path, print, TINY)
    assert calls == []


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_methods_start_from_one_student_for_equal_steps_with_lr_tuned_apart(fakes, tmp_path, mode):
    calls, _ = fakes
    out = cm.run(mode, None, tmp_path, print, TINY)
    s = cm.SETTINGS[mode]
    methods = s["methods"]
    assert methods[0] == "minillm" and "kd" in methods and (mode == "quick" or "seqkd" in methods)
    # every distillation run: same student and teacher checkpoints, same number of optimizer steps
    assert {option(a, "--model.init_args.student") for a in calls} == {str(tmp_path / "models" / "student_sft")}
    assert {option(a, "--model.init_args.teacher") for a in calls} == {str(tmp_path / "models" / "teacher")}
    assert {option(a, "--trainer.max_steps") for a in calls} == {str(TINY["steps"])}
    assert len(s["lr_grid"]) >= 2
    tune = [a for a in calls if Path(option(a, "--model.init_args.export_dir")).name.startswith("tune_")]
    final = [a for a in calls if a not in tune]
    # the grid once per method on the tuning seed, then the evaluation seeds only at the chosen lr
    assert len(tune) == len(methods) * len(s["lr_grid"]) and len(final) == len(methods) * s["seeds"]
    tune_seeds = {int(option(a, "--seed_everything")) for a in tune}
    eval_seeds = {int(option(a, "--seed_everything")) for a in final}
    assert tune_seeds == {s["tune_seed"]} and eval_seeds == set(range(s["seeds"])) and not tune_seeds & eval_seeds
    assert {float(option(a, "--model.init_args.lr")) for a in final} == {max(s["lr_grid"])}
    settings = out["settings"]
    assert settings["lr_tuning"]["grid"] == s["lr_grid"]
    assert settings["lr_tuning"]["chosen"] == {m: max(s["lr_grid"]) for m in methods}
    assert settings["check"]["teacher_valid_rate"] == 0.9 and settings["check"]["gap"] == pytest.approx(0.55)
    assert "design" in settings and settings["teacher"]["model"]["hidden_size"] > settings["student"]["model"][
        "hidden_size"]
    # claims: MiniLLM vs each baseline and vs the SFT student, on three metrics, then the toy
    baselines = [m for m in methods if m != "minillm"] + ["sft_start"]
    assert [c["baseline_name"] for c in out["claims"][:-1]] == [cm.NAMES[b] for b in baselines for _ in range(3)]
    assert out["claims"][0]["ours"] == pytest.approx(0.6) and out["claims"][0]["baseline"] == pytest.approx(0.5)
    assert (tmp_path / out["figures"][0]).stat().st_size > 0


def test_tuning_seed_must_not_be_an_evaluation_seed(fakes, tmp_path):
    with pytest.raises(ValueError, match="tune_seed"):
        cm.run("quick", 3, tmp_path, print, TINY | {"tune_seed": 2})


def test_sft_and_each_method_run_for_real_on_tiny_models(tmp_path):
    """A few real steps: SFT of a tiny teacher and student, then one distillation step of every method."""
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    recipe = {"model": cm.llama(32, 1, 2), "steps": 2, "lr": 1e-3, "warmup_steps": 0}
    assert cm.sft(recipe, teacher) > 0
    assert cm.sft(recipe, teacher) == 0.0  # a finished export of the same recipe is reused
    cm.sft(recipe | {"model": cm.llama(16, 1, 2)}, student)
    for method in cm.METHODS:
        export = cm.distill(method, 1e-4, 0, 1, student, teacher, tmp_path / f"x_{method}", tmp_path / "tb")
        assert (export / "config.json").is_file()
