"""benchmarks/claim_real.py — the papers' experiments on the real model — with a tiny local Llama in place of
SmolLM2 (``claim_real.MODEL`` points at it), and the real model itself in a slow test."""

import json
import math

import pytest

from benchmarks import claim_real
from callbacks.oversquashing import representational_collapse
from callbacks.quantization_eval import heldout_text, perplexity
from datamodules.sequence_tasks import encode_prompt
from lm.hf import load_causal_lm
from lm.tokenizers import byte_tokenizer

CLAIM_KEYS = {"claim", "metric", "ours", "baseline", "baseline_name", "higher_is_better", "spread"}
TINY_PROBES = dict(seeds=2, lengths=[4, 12], sensitivity_lengths=[8], sensitivity_samples=1, projections=4,
                   task_lengths=[3, 5], task_samples=2)


@pytest.fixture
def tiny_model(local_tiny_model):
    """A 1-layer byte-level Llama saved as a local model directory, used as claim_real.MODEL."""
    return str(local_tiny_model(1))


def rule(c: dict) -> str:
    """The report's verdict rule written out: d = signed gap, reproduced if d > 2s, not if d < -2s."""
    if c["spread"] is None:
        return "inconclusive"
    d = (c["ours"] - c["baseline"]) * (1 if c["higher_is_better"] else -1)
    return "reproduced" if d > 2 * c["spread"] else "not reproduced" if d < -2 * c["spread"] else "inconclusive"


def test_probe_claims_are_the_pure_collapse_function_on_each_prompt_prefix(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(claim_real.MODES["probes"], "full", TINY_PROBES)
    rows = claim_real.claims("oversquashing", "full", tmp_path / "out", seeds=2)
    assert len(rows) == 6 and all(set(r) == CLAIM_KEYS | {"verdict", "source"} for r in rows)
    assert all(r["verdict"] == rule(r) and r["spread"] is not None for r in rows)
    # claim 1: mean over the two prefixes of ‖Δ‖∞ between prefix+"1"*12 and prefix+"1"*13 (fp32, final layer)
    model, tok = load_causal_lm(tiny_model).eval(), byte_tokenizer()
    deltas = [representational_collapse(model, encode_prompt(tok, p + "1" * 12), encode_prompt(tok, p + "1" * 13))
              for p in claim_real.PREFIXES[:2]]
    assert rows[0]["ours"] == pytest.approx(sum(deltas) / 2, rel=1e-5)
    assert rows[0]["spread"] > 0  # the prefixes differ, so do the gaps
    assert all(0.0 <= r["ours"] <= 1.0 for r in rows[4:])  # accuracies
    with pytest.raises(ValueError, match="seeds: at most 3"):
        claim_real.claims("oversquashing", "full", tmp_path / "out", seeds=4)


def test_task_accuracy_scores_the_leading_integer_after_the_answer_prefix(tiny_model, monkeypatch):
    """An oracle right up to 4 digits; beyond, the right count not leading its answer, and no digit to copy."""
    import lm.sampling

    seen = []

    def oracle(model, tokenizer, prompts, **kwargs):
        seen.extend(prompts)
        out = []
        for p in prompts:
            digits = p.split(" of " if "digit of" in p else " in ")[1].split("?")[0]
            right = str(len(digits)) if "How many" in p else digits[0] if "first" in p else digits[-1]
            out.append(f"{right} ones" if len(digits) <= 4 else f"ones: {right}" if "How many" in p else "x")
        return out

    monkeypatch.setattr(lm.sampling, "generate_answers", oracle)
    acc = claim_real.task_accuracy(None, byte_tokenizer(), [3, 4, 6], samples=20, seed=0)
    assert acc == {f"{t}/{n}": float(n <= 4) for t in ("count_ones", "copy_first", "copy_last") for n in (3, 4, 6)}
    assert len(seen) == 3 + 2 * 3 * 20 and all(p.endswith(claim_real.ANSWER_PREFIX) for p in seen)


def test_dpo_and_qdpo_claims_and_the_json_record(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(claim_real.MODES["dpo"], "quick", dict(seeds=2, steps=2, pairs=40, batch_size=4, lr=1e-3,
                                                               val_fraction=0.25))
    monkeypatch.setitem(claim_real.MODES["qdpo"], "quick", dict(
        seeds=2, prompts=["tasks"], bits=2, num_prompts=24, eval_prompts=16, batch_size=4, lr=1e-3, max_new_tokens=4,
        grid=dict(prompts="freeform", quantizers=["rtn"], bits=[2], seeds=2)))
    out = claim_real.main(["--only", "dpo,qdpo", "--quick", "--out", str(tmp_path / "results"),
                           "--work", str(tmp_path / "work")])
    record = json.loads((tmp_path / "results" / "real_dpo.json").read_text())
    assert record["command"] == "python -m benchmarks.claim_real --only dpo,qdpo --quick --out " \
        f"{tmp_path / 'results'} --work {tmp_path / 'work'}"
    assert {"date", "machine", "settings", "seconds", "claims", "measurements"} <= set(record)
    acc = record["measurements"]["per_seed_accuracy"]
    (row,) = record["claims"]
    assert row["ours"] == pytest.approx(sum(acc["discopop"]) / 2) and row["baseline"] == pytest.approx(
        sum(acc["sigmoid"]) / 2)
    assert record["settings"]["held_out_pairs"] == 10 and all(abs(a * 10 - round(a * 10)) < 1e-6 for a in acc["discopop"])
    qdpo = out["qdpo"]
    flips, loglik = "token-flip rate vs the FP model's answers", "FP model's mean log-likelihood per token of the answers"
    rouge = "Rouge-L F1 of the answers vs the FP model's answers"
    # the tasks: flip rate, FP likelihood, the checker's score, Rouge-L; then one flip-rate claim per grid cell
    assert [c["metric"] for c in qdpo["claims"]] == [flips, loglik, "valid-answer rate (task checker)", rouge, flips]
    assert ["held-out built-in tasks" in c["claim"] for c in qdpo["claims"]] == [True] * 4 + [False]
    assert qdpo["claims"][0]["baseline_name"] == "RTN int2 g32"
    runs = qdpo["measurements"]["tasks"]["runs"]
    assert qdpo["claims"][0]["ours"] == pytest.approx(sum(r["results"]["qdpo"]["flip_rate"] for r in runs) / 2)
    assert all(r["results"]["fp"]["flip_rate"] == 0.0 for r in runs)  # FP never flips against itself
    # the grid cell: free-form prompts (no checker), its own qdpo_table run, resumable from its file
    cell = tmp_path / "work" / "real_qdpo" / "grid" / "rtn-int2.json"
    cell_runs = json.loads(cell.read_text())["runs"]
    grid_claim = qdpo["claims"][4]
    assert "rtn-int2 g32 PTQ alone, held-out free-form prompts" in grid_claim["claim"]
    assert grid_claim["ours"] == pytest.approx(sum(r["results"]["qdpo"]["flip_rate"] for r in cell_runs) / 2)
    assert grid_claim["baseline"] == pytest.approx(sum(r["results"]["rtn"]["flip_rate"] for r in cell_runs) / 2)
    per_seed = qdpo["settings"]["quantizer_grid"]["per_seed"]["rtn-int2"]
    assert per_seed["qdpo"]["check_score"] == [None, None] and len(per_seed["ptq"]["perplexity"]) == 2
    # perplexity on CPython's docs in every run: FP's is the pure function's on that text
    fp_ppl = perplexity(load_causal_lm(tiny_model), byte_tokenizer(), heldout_text("docs", ""))
    assert [r["results"]["fp"]["perplexity"] for r in runs + cell_runs] == pytest.approx([fp_ppl] * 4)
    assert all(math.isfinite(r["results"][m]["perplexity"]) for r in runs + cell_runs for m in ("rtn", "qdpo"))
    # an interrupted experiment resumes: every qdpo_table run left its result file, so a rerun trains nothing
    from benchmarks import qdpo_table

    monkeypatch.setattr(qdpo_table, "main", lambda argv: pytest.fail(f"ran again: {argv}"))
    again = claim_real.run("qdpo", "quick", None, tmp_path / "work" / "real_qdpo", lambda msg: None)
    assert again["claims"] == qdpo["claims"] and again["settings"]["quantizer_grid"]["per_seed"]["rtn-int2"] == per_seed
    stages = sum(sum(r["timings_s"].values()) for r in runs + cell_runs)  # what the runs cost, reused or not
    assert again["runs_seconds"] == pytest.approx(stages) == qdpo["runs_seconds"] and again["seconds"] < stages
    assert (tmp_path / "results" / "real_qdpo.json").is_file()


def test_a_finished_experiment_is_reused_like_the_reproduction_it_belongs_to(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setitem(claim_real.MODES["probes"], "full", TINY_PROBES)
    first = claim_real.claims("oversquashing", "full", tmp_path, seeds=2)
    record = tmp_path / "real_probes.json"
    assert record.is_file() and all(r["source"].startswith(record.as_posix()) for r in first)

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished experiment ran again")

    monkeypatch.setitem(claim_real.RUNNERS, "probes", must_not_run)
    assert claim_real.claims("oversquashing", "full", tmp_path, seeds=2) == first
    assert claim_real.claims("oversquashing", "full", tmp_path, seeds=None) == first
    with pytest.raises(AssertionError, match="ran again"):  # other seeds or mode: a different experiment
        claim_real.claims("oversquashing", "full", tmp_path, seeds=1)
    with pytest.raises(AssertionError, match="ran again"):
        claim_real.claims("oversquashing", "quick", tmp_path, seeds=2)


def test_papers_without_a_real_model_experiment_get_no_claims(tmp_path):
    assert claim_real.claims("radt", "full", tmp_path, seeds=1) == []
    with pytest.raises(ValueError, match="unknown real-model experiment 'x'"):
        claim_real.run("x", "full", None, tmp_path)
    with pytest.raises(SystemExit):
        claim_real.main(["--only", "probes,nope"])


@pytest.mark.slow
def test_real_model_probes_at_small_settings(tmp_path, monkeypatch):
    """SmolLM2-135M-Instruct (needs `make real`): "1" is one token, " 1" two; the probe claims come out finite."""
    pytest.importorskip("gguf")
    from lm.tokenizers import load_tokenizer

    tok = load_tokenizer(None, claim_real.MODEL)
    assert len(tok("1" * 7, add_special_tokens=False)["input_ids"]) == 7
    assert len(tok(" 1", add_special_tokens=False)["input_ids"]) == 2
    monkeypatch.setitem(claim_real.MODES["probes"], "quick", dict(TINY_PROBES, seeds=2, lengths=[8, 32]))
    rows = claim_real.claims("oversquashing", "quick", tmp_path, seeds=2)
    assert len(rows) == 6 and all(math.isfinite(r["ours"]) and r["verdict"] == rule(r) for r in rows)


def test_doc_table_is_generated_from_the_json_records(tmp_path):
    row = {"claim": "c", "metric": "m", "ours": 0.9, "baseline": 0.5, "baseline_name": "b", "higher_is_better": True,
           "spread": 0.1}  # d = 0.4 > 2s = 0.2: reproduced
    record = {"mode": "full", "seconds": 120.0, "date": "2026-11-27", "machine": {"description": "2 cores"},
              "claims": [row, dict(row, spread=0.3)]}  # d = 0.4 < 2s = 0.6: inconclusive
    (tmp_path / "real_dpo.json").write_text(json.dumps(record))
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{claim_real.DOC_BEGIN}\nstale\n{claim_real.DOC_END}\noutro\n")
    claim_real.main(["--update-doc", str(doc), "--out", str(tmp_path)])
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{claim_real.DOC_END}\noutro\n") and "stale" not in text
    assert "| dpo | c | m | 0.9 ± 0.1 | 0.5 (b) | reproduced |" in text
    assert "| dpo | c | m | 0.9 ± 0.3 | 0.5 (b) | inconclusive |" in text
    assert "full mode, 2.0 min wall-clock" in text
    doc.write_text("no block")
    with pytest.raises(ValueError, match="no block between"):
        claim_real.update_doc(doc, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("args", [["fit", "--config", "configs/dpo/smollm2.yaml", "--data.init_args.num_examples", "20"],
                                  ["fit", "--config", "configs/qdpo/smollm2.yaml", "--data.init_args.num_prompts", "12",
                                   "--data.init_args.prompts", "freeform"],
                                  ["validate", "--config", "configs/probes/smollm2.yaml"]])
def test_real_model_configs_run(root, args, monkeypatch):
    """The shipped SmolLM2 configs run end to end (needs `make real`; a few CPU minutes each)."""
    pytest.importorskip("gguf")
    from cli import build_cli

    args = [a if not a.startswith("configs/") else str(root / a) for a in args]
    extra = ["--trainer.max_steps", "1", "--trainer.val_check_interval", "1"] if args[0] == "fit" else []
    cli = build_cli([*args, *extra, "--trainer.enable_progress_bar", "false"])
    assert cli.trainer.state.finished
