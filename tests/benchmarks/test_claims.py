"""The claim experiments of ``litpapers reproduce`` (benchmarks/claim_*.py): the result schema on tiny settings,
and the pure pieces against hand-computed values."""

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import claim_ademamix, claim_oversquashing
from benchmarks.claim_common import claim, claim_parser, log_scalars, mode_settings, paired_spread, run_and_record
from lm.tokenizers import byte_tokenizer

CLAIM_KEYS = {"claim", "metric", "ours", "baseline", "baseline_name", "higher_is_better", "spread"}


def check_schema(result: dict, out_dir, n_claims: int, seeds: int) -> None:
    assert set(result) >= {"claims", "figures", "settings"}
    assert len(result["claims"]) == n_claims
    for row in result["claims"]:
        assert set(row) == CLAIM_KEYS and "verdict" not in row
        assert isinstance(row["claim"], str) and isinstance(row["baseline_name"], str)
        assert math.isfinite(row["ours"]) and math.isfinite(row["baseline"])
        assert (row["spread"] is None) == (seeds == 1)
    assert result["figures"] and all((out_dir / f).stat().st_size > 0 for f in result["figures"])
    assert all(f.endswith(".png") and not f.startswith("/") for f in result["figures"])
    assert result["settings"]["seeds"] == seeds


def test_paired_spread_by_hand():
    # differences 1, 2, 4: mean 7/3, sample variance ((4/3)² + (1/3)² + (5/3)²)/2 = 7/3
    assert paired_spread([1.0, 3.0, 5.0], [0.0, 1.0, 1.0]) == pytest.approx(math.sqrt(7 / 3))
    assert paired_spread([0.7], [0.6]) is None
    with pytest.raises(ValueError, match="paired_spread"):
        paired_spread([1.0, 2.0], [1.0])


def test_claim_row_means_and_paired_spread():
    # ours 1, 3; baseline 0, 0 -> means 2, 0; differences 1, 3 -> sample std sqrt(((1-2)^2 + (3-2)^2)/1) = sqrt 2
    row = claim("c", "m", [1.0, 3.0], [0.0, 0.0], "b", higher_is_better=True)
    assert (row["ours"], row["baseline"]) == (2.0, 0.0)
    assert row["spread"] == pytest.approx(math.sqrt(2))
    assert claim("c", "m", [1.0], [0.5], "b", False)["spread"] is None
    with pytest.raises(ValueError, match="one baseline value per seed"):
        claim("c", "m", [1.0, 2.0], [0.5], "b", False)


def test_beta3_timescale_is_a_fifth_of_the_run():
    assert claim_ademamix.beta3_for(500) == pytest.approx(0.99)
    assert 1 / (1 - claim_ademamix.beta3_for(3000)) == pytest.approx(600)


def test_token_stream_reads_each_document_once_and_holds_out_every_twentieth(monkeypatch, tmp_path):
    # 60 distinct documents (40 built-in texts + 20 files), 12 byte tokens + EOS each: 60 * 13 = 780 tokens.
    texts = [f"<doc {i:03d}>" + "x" * 3 for i in range(40)]
    files = []
    for i in range(40, 60):
        files.append(tmp_path / f"m{i}.py")
        files[-1].write_text(f"<doc {i:03d}>" + "x" * 3)
    monkeypatch.setattr(claim_ademamix, "builtin_documents", lambda: [(f"t{i}", t) for i, t in enumerate(texts)])
    monkeypatch.setattr(claim_ademamix, "stdlib_paths", lambda: files)
    tok = byte_tokenizer()
    train, heldout = claim_ademamix.token_stream(tok, 30, 3, 13)  # whole documents: one per block
    train_docs = [tok.decode(row, skip_special_tokens=True) for row in train.tolist()]
    held_docs = [tok.decode(row, skip_special_tokens=True) for row in heldout.tolist()]
    assert len(set(train_docs)) == 30 and not set(train_docs) & set(held_docs)  # no document twice
    assert all(d.startswith("<doc ") for d in train_docs + held_docs)
    assert len({d[5:8] for d in train_docs} | {d[5:8] for d in held_docs}) == 33
    assert any(int(d[5:8]) >= 40 for d in train_docs) and any(int(d[5:8]) < 40 for d in train_docs)  # mixed
    with pytest.raises(ValueError, match="held-out blocks"):  # fails before reading any file
        claim_ademamix.token_stream(tok, 10 ** 6, 1, 13)


def test_claim_command_line_runs_and_records(tmp_path, capsys):
    calls = []

    def fake_run(mode, seeds, out_dir, progress, overrides):
        progress("working")
        calls.append((mode, seeds, out_dir, overrides))
        return {"claims": [], "figures": [], "settings": {"seeds": seeds}}

    assert claim_parser("Doc line.\nmore", "claim_x").parse_args([]).out == Path("reports/claim_x")
    argv = ["--full", "--seeds", "2", "--out", str(tmp_path / "o"), "--json", str(tmp_path / "r.json")]
    result = run_and_record(fake_run, claim_parser("Doc.", "claim_x").parse_args(argv), {"steps": 5}, "claim_x",
                            argv)
    assert calls == [("full", 2, tmp_path / "o", {"steps": 5})] and result["seconds"] >= 0
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["command"] == "python -m benchmarks.claim_x " + " ".join(argv) and record["settings"] == {"seeds": 2}
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "working" and json.loads(out[1])["seconds"] == result["seconds"]
    quick = claim_parser("Doc.", "claim_x").parse_args([])
    assert run_and_record(fake_run, quick, None, "claim_x", [])["settings"] == {"seeds": None}
    assert calls[-1][:2] == ("quick", None)


def test_log_scalars_writes_a_tensorboard_run(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_scalars(tmp_path / "tb", "halfcheetah_RADT", "seed1", {"a/curve": [3.0, 1.5, 0.25], "a/single": 7})
    (events,) = (tmp_path / "tb" / "halfcheetah_RADT" / "seed1").glob("events.out.tfevents*")
    acc = EventAccumulator(str(events.parent)).Reload()
    assert [(e.step, e.value) for e in acc.Scalars("a/curve")] == [(0, 3.0), (1, 1.5), (2, 0.25)]
    assert [(e.step, e.value) for e in acc.Scalars("a/single")] == [(0, 7.0)]


def test_mode_settings_apply_overrides_then_seeds():
    modes = {"quick": {"seeds": 1, "steps": 10, "lr": 0.1}, "full": {"seeds": 5, "steps": 100, "lr": 0.1}}
    assert mode_settings(modes, "full", None, None) == {"seeds": 5, "steps": 100, "lr": 0.1}
    assert mode_settings(modes, "quick", 3, {"steps": 2, "seeds": 7}) == {"seeds": 3, "steps": 2, "lr": 0.1}
    assert modes["quick"] == {"seeds": 1, "steps": 10, "lr": 0.1}  # the table itself is left alone


def test_bad_mode_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        claim_ademamix.run("medium", None, tmp_path, print)
    with pytest.raises(ValueError, match="seeds"):
        claim_oversquashing.run("quick", 0, tmp_path, print)


TINY = dict(steps=8, batch_size=2, block_size=16, eval_every=4, eval_last=2, val_blocks=4, adamw_horizon=1.5,
            lr_grid=[1e-3, 2e-3], max_extensions=0, pool_factor=2, tune_seed=100)


def test_ademamix_claim_runs_on_tiny_settings(tmp_path):
    lines = []
    result = claim_ademamix.run("quick", 2, tmp_path, lines.append, TINY)
    check_schema(result, tmp_path, 3, 2)
    assert any("adamw" in line for line in lines) and any("ademamix" in line for line in lines)
    s = result["settings"]
    assert s["t_alpha"] == s["t_beta3"] == 8 and s["beta3"] == pytest.approx(1 - 5 / 8) and s["design"]
    runs = result["measurements"]["runs"]
    assert [step for step, _ in runs["adamw"][0]["curve"]] == [4, 8]
    assert [step for step, _ in result["measurements"]["adamw_long_runs"][0]] == [4, 8, 12]  # AdamW to 1.5 T
    # forgetting probe: seen at T/2 = 4; measured right after, one step later and at T
    assert [row[0] for row in runs["ademamix"][0]["forgetting"]] == [4, 5, 8]
    # the headline metric is the mean of the last eval_last evaluations
    curve = runs["ademamix"][1]["curve"]
    assert s["per_seed"]["final_loss"]["ademamix"][1] == pytest.approx((curve[-1][1] + curve[-2][1]) / 2)


def test_ademamix_tuning_seed_must_differ_from_evaluation_seeds(tmp_path):
    with pytest.raises(ValueError, match="tune_seed"):
        claim_ademamix.run("quick", 2, tmp_path, print, {**TINY, "tune_seed": 1})


def test_batch_order_is_a_fresh_permutation_per_seed():
    a, b = claim_ademamix.batch_order(1000, 50, 16, seed=0), claim_ademamix.batch_order(1000, 50, 16, seed=1)
    assert a.shape == (50, 16) and len(set(a.flatten().tolist())) == 800  # no block twice in a run
    assert torch.equal(a, claim_ademamix.batch_order(1000, 50, 16, seed=0)) and not torch.equal(a, b)
    # i.i.d. draws: a batch is not a run of neighbouring blocks of the packed stream (the old design's batches were)
    spans = (a.max(dim=1).values - a.min(dim=1).values).float()
    assert spans.median() > 500
    with pytest.raises(ValueError, match="distinct blocks"):
        claim_ademamix.batch_order(100, 10, 16, seed=0)


def test_training_reads_the_seeds_order_and_the_probe_once(monkeypatch):
    """Spy on the blocks the model is trained on: each seed reads its own random order of the pool, no block
    twice, and the probe batch replaces the drawn one at T/2."""
    seen: dict[int, list[list[int]]] = {}

    class Spy(claim_ademamix.CausalLM):
        def configure_model(self):  # the materialised network is the one trained
            super().configure_model()
            record = seen.setdefault(self.init_seed, [])
            self.model.register_forward_pre_hook(
                lambda mod, args, kwargs: record.append(kwargs["input_ids"][:, 0].tolist()) if mod.training else None,
                with_kwargs=True)

    monkeypatch.setattr(claim_ademamix, "CausalLM", Spy)
    pool = torch.arange(100).repeat_interleave(16).view(100, 16) % 250 + 3  # block i starts with token i + 3
    probe = torch.full((2, 16), 255)
    data = {"pool": pool, "val": pool[:2], "probe": probe, "control": pool[2:4]}
    s = {**TINY, "warmup_frac": 0.1, "final_lr_frac": 0.1}
    for seed in (0, 1):
        claim_ademamix.train_run("ademamix", 1e-3, 8, seed, data, s, lambda m: None)
    orders = {seed: [[t - 3 for t in batch] for batch in seen[seed]] for seed in (0, 1)}
    for seed in (0, 1):
        assert orders[seed][3] == [252, 252]  # the probe at step T/2 = 4
        drawn = [i for k, batch in enumerate(orders[seed]) if k != 3 for i in batch]
        expected = claim_ademamix.batch_order(100, 8, 2, seed)
        assert drawn == [i for k, batch in enumerate(expected.tolist()) if k != 3 for i in batch]
        assert len(set(drawn)) == len(drawn)
    assert orders[0] != orders[1]


def test_lr_factor_warmup_then_cosine_by_hand():
    f = [claim_ademamix.lr_factor(t, steps=5, warmup=1, final_frac=0.2) for t in range(5)]
    assert f == pytest.approx([1.0, 1.0, 0.2 + 0.8 * 0.75, 0.2 + 0.8 * 0.25, 0.2])
    assert claim_ademamix.lr_factor(0, steps=10, warmup=4, final_frac=0.1) == pytest.approx(0.25)


def test_grid_extension_brackets_the_best_lr():
    assert claim_ademamix.grid_extension({1e-3: 3.0, 2e-3: 2.0, 4e-3: 2.5}, 2) is None
    assert claim_ademamix.grid_extension({1e-3: 3.0, 2e-3: 2.5, 4e-3: 2.0}, 2) == pytest.approx(8e-3)
    assert claim_ademamix.grid_extension({1e-3: 1.0, 2e-3: 2.5, 4e-3: 3.0}, 1) == pytest.approx(5e-4)
    assert claim_ademamix.grid_extension({1e-3: 3.0, 2e-3: 2.5, 4e-3: 2.0}, 0) is None


def test_tune_extends_the_grid_until_bracketed(monkeypatch):
    calls = []

    def fake_run(name, lr, steps, seed, data, s, progress, probe=True):
        calls.append((lr, seed, probe))
        return {"final": (math.log2(lr) - 3) ** 2}  # best lr: 8

    monkeypatch.setattr(claim_ademamix, "train_run", fake_run)
    s = {"lr_grid": [1.0, 2.0, 4.0], "max_extensions": 2, "steps": 10, "tune_seed": 7}
    best, losses, bracketed = claim_ademamix.tune("adamw", s, {}, print)
    assert (best, bracketed) == (8.0, True) and sorted(losses) == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert {seed for _, seed, _ in calls} == {7} and not any(probe for _, _, probe in calls)
    best, _, bracketed = claim_ademamix.tune("adamw", {**s, "max_extensions": 1}, {}, print)
    assert (best, bracketed) == (8.0, False)  # still on the edge: reported as not bracketed


def test_steps_to_match_log_linear_by_hand():
    assert claim_ademamix.steps_to_match(1.9, 2.0, 1.8, 2.0) == (pytest.approx(2 ** 0.5), False)
    assert claim_ademamix.steps_to_match(2.0, 2.0, 1.8, 2.0) == (pytest.approx(1.0), False)
    assert claim_ademamix.steps_to_match(2.1, 2.0, 1.8, 2.0) == (pytest.approx(2 ** -0.5), False)
    assert claim_ademamix.steps_to_match(1.7, 2.0, 1.8, 2.0) == (2.0, True)  # beyond AdamW's longer run: a bound
    assert claim_ademamix.steps_to_match(1.9, 2.0, 2.1, 2.0) == (2.0, True)  # longer AdamW run no better


def test_oversquashing_claim_runs_on_tiny_settings(tmp_path):
    tiny = dict(steps=2, lengths=[4, 8], sensitivity_lengths=[8], sensitivity_samples=1)
    result = claim_oversquashing.run("quick", 2, tmp_path, lambda msg: None, tiny)
    check_schema(result, tmp_path, 4, 2)
    delta, noise, commas, sens = result["claims"]
    first = result["measurements"][0]["collapse"]
    assert delta["ours"] == pytest.approx((first["ones/fp32/8"]["delta"]
                                           + result["measurements"][1]["collapse"]["ones/fp32/8"]["delta"]) / 2)
    assert noise["baseline"] > 0 and sens["baseline"] == 1.0
    assert set(result["figures"]) == {"oversquashing_collapse.png", "oversquashing_sensitivity.png"}


def test_qdpo_figure_draws_every_metric(tmp_path):
    from benchmarks import claim_qdpo

    per_metric = {key: {"fp": [0.0, 0.0], "rtn": [0.3, 0.2], "qdpo": [0.1, 0.15]} for key, _, _ in claim_qdpo.METRICS}
    name = claim_qdpo.draw(per_metric, tmp_path)
    assert name.endswith(".png") and (tmp_path / name).stat().st_size > 10_000


def test_qdpo_quantizer_grid_runs_every_cell_once_and_reuses_the_main_rtn_int4_seeds(tmp_path, monkeypatch):
    from benchmarks import claim_qdpo, qdpo_table

    calls = []

    def fake_table(argv):  # flip rates encode (bits, seed, model) so every value's origin is checkable
        bits = int(argv[argv.index("--bits") + 1])
        calls.append((argv[argv.index("--quantizer") + 1], bits, argv[argv.index("--seeds") + 1:][:3]))
        return {"runs": [{"results": {n: {k: bits + seed / 10 + off for k, _, _ in claim_qdpo.GRID_METRICS}
                                      for n, off in (("fp", 0.0), ("rtn", 0.5), ("qdpo", 0.25))}}
                         for seed in range(2)]}

    monkeypatch.setattr(qdpo_table, "main", fake_table)
    main_runs = [{"results": {n: {k: 100 + seed for k, _, _ in claim_qdpo.GRID_METRICS} for n in ("fp", "rtn", "qdpo")}}
                 for seed in range(3)]
    grid = claim_qdpo.quantizer_grid("quick", main_runs, {"num_prompts": 8, "eval_prompts": 8}, tmp_path,
                                     lambda *a: None)
    assert [c[:2] for c in calls] == [("rtn", 3), ("gptq", 4), ("gptq", 3)]
    assert all(c[2] == ["0", "1", "--cache"] for c in calls)  # seeds 0 1 per cell
    assert grid["rtn-int4"]["ptq"]["flip_rate"] == [100, 101]  # the main run's first two seeds
    assert grid["gptq-int3"] == {"fp": {k: [3.0, 3.1] for k, _, _ in claim_qdpo.GRID_METRICS},
                                 "ptq": {k: [3.5, 3.6] for k, _, _ in claim_qdpo.GRID_METRICS},
                                 "qdpo": {k: [3.25, 3.35] for k, _, _ in claim_qdpo.GRID_METRICS}}


def test_qdpo_quantizer_docs_table_verdicts_by_the_report_rule(tmp_path, root):
    from benchmarks import claim_qdpo

    def cell(ptq, qdpo):
        return {"fp": {k: [0.0] * len(ptq) for k, _, _ in claim_qdpo.GRID_METRICS},
                "ptq": {k: ptq for k, _, _ in claim_qdpo.GRID_METRICS},
                "qdpo": {k: qdpo for k, _, _ in claim_qdpo.GRID_METRICS}}

    # PTQ − QDPO flip rate per seed: gptq-int3 [.2, .15, .15] -> d = 1/6, s = stdev = 0.02887 < d/2: reproduced;
    # hqq-int2 [−.1, −.11] -> d = −0.105, s = 0.00707: not reproduced; rtn-int4 [.05, −.1] -> d = −0.025, s = 0.1061
    grid = {"rtn-int4": cell([0.1, 0.2], [0.05, 0.3]), "hqq-int2": cell([0.1, 0.1], [0.2, 0.21]),
            "gptq-int3": cell([0.30, 0.20, 0.25], [0.10, 0.05, 0.10])}
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"papers": {"qdpo": {"settings": {"quantizer_grid": {"per_seed": grid}}}}}))
    doc = tmp_path / "qdpo.md"
    doc.write_text(f"intro\n{claim_qdpo.DOC_BEGIN}\nold\n{claim_qdpo.DOC_END}\noutro\n")
    claim_qdpo.main(["--update-docs", str(results), "--doc", str(doc)])
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    # flips PTQ → +QDPO, d ± s, verdict, FP log-lik, Rouge-L, check, ppl FP, ppl PTQ → +QDPO (means over seeds)
    assert ("| gptq | 3 | 3 | 0.2500 → 0.0833 | 0.1667 ± 0.0289 | reproduced | 0.2500 → 0.0833 | 0.250 → 0.083 | "
            "0.250 → 0.083 | 0.000 | 0.250 → 0.083 |") in text
    assert "| hqq | 2 | 2 | 0.1000 → 0.2050 | -0.1050 ± 0.0071 | not reproduced |" in text
    assert "| rtn | 4 | 2 | 0.1500 → 0.1750 | -0.0250 ± 0.1061 | inconclusive |" in text
    assert "token flips) **reproduced**: gptq int3." in text and "**not reproduced**: hqq int2." in text
    assert "**inconclusive**: rtn int4." in text
    # the SmolLM2 record (claim_real's real_qdpo.json) fills its own block; free-form prompts have no checker
    grid["gptq-int3"]["ptq"]["check_score"] = grid["gptq-int3"]["qdpo"]["check_score"] = [None] * 3
    record = tmp_path / "real_qdpo.json"
    record.write_text(json.dumps({"settings": {"quantizer_grid": {"per_seed": grid}}}))
    doc.write_text(f"{claim_qdpo.DOC_BEGIN}\nbuilt-in\n{claim_qdpo.DOC_END}\n{claim_qdpo.REAL_BEGIN}\nold\n"
                   f"{claim_qdpo.REAL_END}\n")
    claim_qdpo.main(["--update-docs", str(record), "--doc", str(doc)])
    text = doc.read_text()
    assert "built-in" in text and "old" not in text and "CPython's documentation" in text
    assert "| reproduced | 0.2500 → 0.0833 | 0.250 → 0.083 | – → – | 0.000 | 0.250 → 0.083 |" in text
    doc_text = (root / "docs/qdpo.md").read_text()  # the repository's doc has the blocks to fill
    assert all(m in doc_text for m in (claim_qdpo.DOC_BEGIN, claim_qdpo.DOC_END, claim_qdpo.REAL_BEGIN,
                                       claim_qdpo.REAL_END))
