"""benchmarks/claim_real.py, experiment ``minillm``: the shipped SmolLM2 MiniLLM configs through the CLI, with a
tiny local Llama in place of SmolLM2 (``claim_real.MODEL`` points at it)."""

import json

import pytest
import torch

from benchmarks import claim_real
from lm.hf import load_causal_lm

TINY_RUN = dict(seeds=2, teacher_steps=2, student_steps=2, steps=2, eval_seeds=1, student_layers=[1])


@pytest.fixture
def two_layer_model(local_tiny_model):
    return local_tiny_model(2)


def test_minillm_claims_come_from_the_configs_run_through_the_cli(two_layer_model, tmp_path, monkeypatch):
    monkeypatch.setitem(claim_real.MODES["minillm"], "quick", TINY_RUN)
    out = claim_real.main(["--only", "minillm", "--quick", "--out", str(tmp_path / "results"),
                           "--work", str(tmp_path / "work")])["minillm"]
    work = tmp_path / "work" / "real_minillm"
    teacher, student = load_causal_lm(str(work / "teacher_sft")), load_causal_lm(str(work / "student_sft"))
    # the teacher is the (tiny) model fine-tuned; the student its layer 1 only, then trained by SFT
    assert teacher.config.num_hidden_layers == 2 and student.config.num_hidden_layers == 1
    original = load_causal_lm(str(two_layer_model))
    assert not torch.equal(teacher.model.layers[0].mlp.up_proj.weight, original.model.layers[0].mlp.up_proj.weight)
    per_seed = out["measurements"]["per_seed"]
    assert set(per_seed) == {"minillm", "kd", "sft"} and all(len(v) == 2 for v in per_seed.values())
    for row in per_seed:
        for seed in (0, 1):
            export = load_causal_lm(str(work / "exports" / f"{row}_seed{seed}"))
            assert export.config.num_hidden_layers == 1
            assert not torch.equal(export.model.layers[0].mlp.up_proj.weight, student.model.layers[0].mlp.up_proj.weight)
    # 6 claims: MiniLLM vs KD and vs SFT, each on valid rate, Rouge-L, ExAccErr; ours/baseline = mean over seeds
    claims = out["claims"]
    assert [c["baseline_name"] for c in claims] == ["word-level KD"] * 3 + ["SFT (compute-matched)"] * 3
    for c, (base, key) in zip(claims, [(b, k) for b in ("kd", "sft") for k in ("valid_rate", "rougeL", "ex_acc_err")]):
        assert c["ours"] == pytest.approx(sum(r[key] for r in per_seed["minillm"]) / 2)
        assert c["baseline"] == pytest.approx(sum(r[key] for r in per_seed[base]) / 2)
    # valid rates are fractions of the held-out prompts (96 in the config, one evaluation seed)
    assert out["settings"]["held_out_prompts"] == 96
    assert all(abs(r["valid_rate"] * 96 - round(r["valid_rate"] * 96)) < 1e-4 for v in per_seed.values() for r in v)
    record = json.loads((tmp_path / "results" / "real_minillm.json").read_text())
    assert record["claims"] == json.loads(json.dumps(claims)) and "teacher_sft_s" in record["measurements"]["timings_s"]


def test_paper_minillm_gets_the_real_model_rows(two_layer_model, tmp_path, monkeypatch):
    """``claims("minillm", ...)`` (the reproduce hook) reuses a finished record instead of training again."""
    saved = {"mode": "full", "date": "d", "settings": {"seeds": 2},
             "claims": [{"claim": "MiniLLM beats word-level KD", "metric": "valid-answer rate", "ours": 0.5,
                         "baseline": 0.4, "baseline_name": "word-level KD", "higher_is_better": True, "spread": 0.01}]}
    (tmp_path / "real_minillm.json").write_text(json.dumps(saved))
    monkeypatch.setitem(claim_real.RUNNERS, "minillm", lambda *a, **k: pytest.fail("ran again"))
    (row,) = claim_real.claims("minillm", "full", tmp_path, seeds=None)
    assert row["claim"] == "[SmolLM2-135M] MiniLLM beats word-level KD" and row["verdict"] == "reproduced"


@pytest.mark.slow
def test_real_model_minillm_configs_run(root):
    """The three SmolLM2 MiniLLM configs, one step each, chained as on a fresh clone (needs `make real`)."""
    pytest.importorskip("gguf")
    from pathlib import Path

    from cli import build_cli

    short = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
             "--data.init_args.num_examples", "120", "--data.init_args.num_val", "8"]
    for name in ("smollm2_teacher_sft", "smollm2_sft", "smollm2"):
        cli = build_cli(["fit", "--config", str(root / "configs" / "minillm" / f"{name}.yaml"), *short])
        assert cli.trainer.state.finished and cli.trainer.global_step == 1
    student = load_causal_lm("checkpoints/smollm2_minillm")
    assert student.config.num_hidden_layers == 10 and Path("checkpoints/smollm2_teacher_sft/config.json").is_file()
