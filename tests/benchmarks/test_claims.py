"""The claim experiments of ``litpapers reproduce`` (benchmarks/claim_*.py): the result schema on tiny settings,
and the pure pieces against hand-computed values."""

import json
import math
from pathlib import Path

import pytest

from benchmarks import claim_ademamix, claim_oversquashing
from benchmarks.claim_common import claim, claim_parser, log_scalars, mode_settings, paired_spread, run_and_record
from lit_modules.hf import byte_tokenizer

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


def test_steps_to_reach_interpolates_and_flags_censoring():
    curve = [(10, 3.0), (20, 2.0), (30, 1.5)]
    assert claim_ademamix.steps_to_reach(curve, 2.5) == (15.0, True)  # halfway from 3.0 to 2.0
    assert claim_ademamix.steps_to_reach(curve, 2.0) == (20.0, True)
    assert claim_ademamix.steps_to_reach(curve, 3.5) == (10.0, True)
    assert claim_ademamix.steps_to_reach(curve, 1.0) == (30.0, False)  # never: the horizon, a lower bound


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


def test_ademamix_claim_runs_on_tiny_settings(tmp_path):
    lines = []
    tiny = dict(steps=8, batch_size=2, block_size=16, warmup=2, eval_every=4, val_blocks=4, adamw_horizon=1.5)
    result = claim_ademamix.run("quick", 2, tmp_path, lines.append, tiny)
    check_schema(result, tmp_path, 3, 2)
    assert any("adamw" in line for line in lines) and any("ademamix" in line for line in lines)
    s = result["settings"]
    assert s["t_alpha"] == s["t_beta3"] == 8 and s["beta3"] == pytest.approx(1 - 5 / 8)
    runs = result["measurements"]["runs"]
    assert [step for step, _ in runs["adamw"][0]["curve"]] == [4, 8, 12]  # AdamW continues to 1.5 T
    assert [step for step, _ in runs["ademamix"][0]["curve"]] == [4, 8]
    # forgetting probe: seen at T/2 = 4; measured right after, one step later and at T
    assert [row[0] for row in runs["ademamix"][0]["forgetting"]] == [4, 5, 8]


def test_ademamix_grid_winners_runs_are_seed_zeros(tmp_path, monkeypatch):
    """Full mode: every (optimizer, lr) of the grid is trained once on seed 0 (AdamW to its horizon, its loss at T
    picks the lr); seed 0's comparison reuses the winners' runs, only the other seeds train again."""
    calls = []
    real_train_run = claim_ademamix.train_run

    def counting(name, lr, run_steps, schedule_steps, seed, *rest):
        calls.append((name, lr, run_steps, seed))
        return real_train_run(name, lr, run_steps, schedule_steps, seed, *rest)

    monkeypatch.setattr(claim_ademamix, "train_run", counting)
    tiny = dict(steps=6, batch_size=2, block_size=16, warmup=2, eval_every=3, val_blocks=4, adamw_horizon=1.5,
                lr_grid=[1e-3, 2e-3])
    result = claim_ademamix.run("full", 2, tmp_path, lambda m: None, tiny)
    grid = [(n, lr, {"ademamix": 6, "adamw": 9}[n], 0) for n in ("ademamix", "adamw") for lr in (1e-3, 2e-3)]
    lrs = result["settings"]["lr"]
    assert calls == grid + [("ademamix", lrs["ademamix"], 6, 1), ("adamw", lrs["adamw"], 9, 1)]
    grid_loss = result["measurements"]["lr_grid"]
    for name in ("ademamix", "adamw"):
        assert grid_loss[f"{name}/{lrs[name]:g}"] == min(grid_loss[f"{name}/{lr:g}"] for lr in (1e-3, 2e-3))
    check_schema(result, tmp_path, 3, 2)


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
