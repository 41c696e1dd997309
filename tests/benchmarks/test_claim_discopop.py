"""benchmarks/claim_discopop.py — the DiscoPOP claim's design (issue 23): on-policy pairs labelled by the task
checker, lr tuned on a seed disjoint from the evaluation seeds, generation metrics, and the DPO-improves-on-SFT
precondition computed and reported."""

import statistics

import pytest

import lm.sampling
from benchmarks import claim_discopop
from datamodules.instruction_tasks import check_answer, format_prompt, generate_examples
from datamodules.preference import corrupt_answer
from lm.hf import load_causal_lm
from lm.tokenizers import byte_tokenizer
from tiny_models import TINY as TINY_LLAMA

TINY = {"seeds": 2, "sft_steps": 2, "prompts": 12, "samples": 4, "pairs_per_prompt": 1, "steps": 2, "eval_prompts": 6,
        "tune_prompts": 4, "betas": [0.05],
        "sweep_losses": ["discopop", "sigmoid"], "other_losses": [], "lr_grid": [1e-4, 1e-3]}


def scripted_sampler(examples, calls):
    """A stand-in for the policy's sampler: per prompt, sample j of a draw is valid for j in {1, 3} and invalid
    for j in {0, 2} (prompt 0 gets only valid answers, prompt 1 only invalid ones); the answers depend on the
    seed, so every seed has its own samples. Records each call's prompts and keywords."""
    import random

    by_prompt = {}
    for i, ex in enumerate(examples):  # a repeated prompt behaves as its first occurrence
        by_prompt.setdefault(format_prompt(ex["instruction"], ex["context"]), (i, ex))

    def sample(model, tokenizer, prompts, **kw):
        calls.append((list(prompts), kw))
        rng, out, seen = random.Random(kw["seed"]), [], {}
        for p in prompts:
            i, ex = by_prompt[p]
            j = seen[p] = seen.get(p, -1) + 1
            valid = (j % 2 == 1 or i == 0) and i != 1
            out.append(rng.choice(ex["references"]) if valid else corrupt_answer(ex, rng))
        return out

    return sample


def distinct(n, seed):
    """``n`` built-in examples with distinct prompts."""
    seen, out = set(), []
    for ex in generate_examples(5 * n, seed=seed):
        if ex["instruction"] not in seen and len(out) < n:
            seen.add(ex["instruction"])
            out.append(ex)
    return out


def test_pairs_are_the_policys_own_samples_labelled_by_the_checker(monkeypatch):
    examples = distinct(10, seed=1)
    calls = []
    monkeypatch.setattr(lm.sampling, "generate_answers", scripted_sampler(examples, calls))
    rows, counts = claim_discopop.on_policy_pairs("the policy", "tok", examples, samples=4, seed=7, max_new_tokens=9)
    ((prompts, kw),) = calls  # one sampling pass of the policy: every prompt repeated `samples` times
    assert prompts == [format_prompt(ex["instruction"], ex["context"]) for ex in examples for _ in range(4)]
    assert kw["do_sample"] is True and kw["seed"] == 7 and kw["max_new_tokens"] == 9 and kw["temperature"] == 1.0
    assert counts == {"prompts": 10, "pairs": 8, "skipped_no_invalid": 1, "skipped_no_valid": 1, "blank_samples": 0,
                      "sample_validity": pytest.approx((4 + 8 * 2) / 40)}
    assert len(rows) == 8
    for row in rows:
        ex = row["example"]
        assert row["prompt"] == format_prompt(ex["instruction"], ex["context"])
        assert check_answer(ex, row["chosen"]) and not check_answer(ex, row["rejected"])
        assert row["chosen"] in row["samples"] and row["rejected"] in row["samples"]
        # the samples of this prompt are exactly the sampler's answers to its 4 copies
        i = examples.index(ex)
        assert row["samples"] == sample_again(examples, i)
    assert {examples.index(r["example"]) for r in rows} == set(range(2, 10))  # prompts 0 and 1 skipped


def sample_again(examples, i):
    calls = []
    sampler = scripted_sampler(examples, calls)
    prompts = [format_prompt(ex["instruction"], ex["context"]) for ex in examples for _ in range(4)]
    return sampler(None, None, prompts, seed=7)[4 * i:4 * i + 4]


def test_two_pairs_per_prompt_use_each_sample_once(monkeypatch):
    examples = distinct(6, seed=1)
    monkeypatch.setattr(lm.sampling, "generate_answers", scripted_sampler(examples, []))
    rows, counts = claim_discopop.on_policy_pairs(None, None, examples, samples=4, seed=0, max_new_tokens=9,
                                                  pairs_per_prompt=2)
    assert counts["pairs"] == len(rows) == 2 * 4
    for i in range(0, 8, 2):  # samples 1, 3 valid and 0, 2 invalid: pairs (1, 0) and (3, 2), no sample twice
        a, b = rows[i], rows[i + 1]
        assert a["example"] is b["example"] and a["samples"] == b["samples"]
        samples = a["samples"]
        assert (a["chosen"], a["rejected"], b["chosen"], b["rejected"]) == (samples[1], samples[0], samples[3],
                                                                           samples[2])


def test_reward_and_kl_is_zero_kl_against_itself_and_counts_valid_samples():
    """KL(π‖π) = 0 exactly (every token scored by the same model); the reward is a fraction of the prompts."""
    tok = byte_tokenizer()
    model = load_causal_lm(TINY_LLAMA, vocab_size=len(tok), seed=0).eval()
    other = load_causal_lm(TINY_LLAMA, vocab_size=len(tok), seed=1).eval()
    examples = generate_examples(5, seed=2)
    point = claim_discopop.reward_and_kl(model, model, tok, examples, seed=0, max_new_tokens=4)
    assert point["kl"] == pytest.approx(0.0, abs=1e-6) and point["reward"] * 5 == round(point["reward"] * 5)
    assert claim_discopop.reward_and_kl(model, other, tok, examples, seed=0, max_new_tokens=4)["kl"] != 0.0


def test_claim_run_tiny_reports_the_design_and_the_dpo_vs_sft_check(tmp_path, monkeypatch):
    """End to end at a tiny size, the pair sampler scripted (a 2-step SFT policy answers nothing validly)."""
    examples = generate_examples(TINY["prompts"], seed=claim_discopop.COMMON["prompt_seed"])
    calls = []
    scripted, real = scripted_sampler(examples, calls), lm.sampling.generate_answers
    monkeypatch.setattr(lm.sampling, "generate_answers",
                        lambda *a, **kw: (scripted if kw.get("do_sample") else real)(*a, **kw))
    monkeypatch.setitem(claim_discopop.SETTINGS, "quick", TINY)
    greedy_seen = []
    greedy = claim_discopop.greedy_validity
    monkeypatch.setattr(claim_discopop, "greedy_validity",
                        lambda model, *a: greedy_seen.append(model) or greedy(model, *a))
    result = claim_discopop.run("quick", None, tmp_path, lambda m, f=None: None)
    s = result["settings"]

    # pairs: one sampling pass per training seed, the tuning seed first and disjoint from the evaluation seeds
    assert [kw["seed"] for _, kw in calls] == [s["tuning_seed"], 0, 1]
    assert s["tuning_seed"] not in s["evaluation_seeds"] == [0, 1]
    skipped = {examples[0]["instruction"], examples[1]["instruction"]}  # all valid / all invalid samples
    assert s["pair_counts"]["0"]["pairs"] == sum(ex["instruction"] not in skipped for ex in examples)
    assert set(s["lr_grid_validity"]) == {"discopop", "sigmoid"}
    for loss, scores in s["lr_grid_validity"].items():
        assert s["lr_chosen"][loss] == max(TINY["lr_grid"], key=lambda lr: scores[f"{lr:g}"])

    # the precondition: SFT's greedy validity measured, DPO's per-seed validity, the verdict and a claim row
    tok = byte_tokenizer()
    sft = load_causal_lm(str(tmp_path / "sft"), vocab_size=len(tok)).eval()
    held_out = generate_examples(TINY["eval_prompts"], seed=claim_discopop.COMMON["eval_seed"])
    sft_validity = statistics.fmean(greedy(sft, tok, held_out, claim_discopop.COMMON["max_new_tokens"]))
    check = s["dpo_vs_sft"]
    assert check["sft_validity"] == pytest.approx(sft_validity)
    assert check["dpo_validity_per_seed"] == [r["validity"] for r in s["per_seed"]["sigmoid"]["0.05"]]
    assert check["dpo_improves_on_sft"] == (statistics.fmean(check["dpo_validity_per_seed"]) > sft_validity)
    gain, std = check["gain"], statistics.stdev(check["dpo_validity_per_seed"])
    assert gain == pytest.approx(statistics.fmean(check["dpo_validity_per_seed"]) - sft_validity)
    assert check["gain_beyond_seed_noise"] == (gain > 2 * std)
    assert ("warning" in s) == (not (check["dpo_improves_on_sft"] and check["gain_beyond_seed_noise"]))
    dpo_margin = statistics.fmean(r["train_margin"] for r in s["per_seed"]["sigmoid"]["0.05"])
    assert s["dpo_margin_beyond_lrml_region"]["0.05"] == (dpo_margin > max(s["lrml_slope_sign_changes_z"]))
    assert ("margin_warning" in s) == (not s["dpo_margin_beyond_lrml_region"]["0.05"])
    rows = {(c["claim"], c["metric"]): c for c in result["claims"]}
    pre = next(c for c in result["claims"] if c["claim"].startswith("DPO improves on the SFT policy"))
    assert pre["baseline"] == pytest.approx(sft_validity) and pre["ours"] == pytest.approx(check["dpo_validity_mean"])

    # headline: generation metrics, not reward accuracy (kept last, as a diagnostic)
    head = result["claims"][0]
    assert head["metric"].startswith("greedy validity") and head["baseline_name"] == "DPO (sigmoid)"
    assert head["ours"] == pytest.approx(statistics.fmean(r["validity"] for r in s["per_seed"]["discopop"]["0.05"]))
    assert result["claims"][1]["metric"].startswith("win rate vs the SFT policy")
    assert "diagnostic" in result["claims"][-1]["metric"] and len(rows) == len(result["claims"])
    assert "on-policy" in s["design"].lower() and "slope" in s["lrml_below_chance"]
    for per_beta in s["per_seed"].values():
        for run in per_beta["0.05"]:
            assert {"validity", "win_rate", "reward", "kl", "margin", "train_margin", "reward_accuracy"} <= set(run)
            assert run["wins"] + run["losses"] + run["ties"] == TINY["eval_prompts"]
    assert result["figures"] == ["discopop_reward_kl.png"] and (tmp_path / "discopop_reward_kl.png").exists()


def test_lrml_slope_sign_changes_where_the_finite_difference_slope_does():
    """Independent check: LRML's formula in plain floats, the sign of its central difference either side."""
    import math

    def lrml(z, tau=0.05):
        w = 1 / (1 + math.exp(-z / tau))
        return (1 - w) * math.log1p(math.exp(-z)) + w * math.exp(-z)

    slope = lambda z: lrml(z + 1e-7) - lrml(z - 1e-7)  # noqa: E731
    changes = claim_discopop.lrml_slope_sign_changes()
    assert len(changes) == 2 and changes[0] < 0 < changes[1]
    for c in changes:
        assert slope(c - 1e-4) * slope(c + 1e-4) < 0
    assert slope(0.0) > 0 and slope(-0.5) < 0 and slope(0.5) < 0


def test_tuning_seed_must_not_be_an_evaluation_seed(tmp_path, monkeypatch):
    monkeypatch.setitem(claim_discopop.SETTINGS, "quick", TINY)
    monkeypatch.setitem(claim_discopop.COMMON, "tuning_seed", 1)
    with pytest.raises(ValueError, match="disjoint"):
        claim_discopop.run("quick", None, tmp_path, lambda m, f=None: None)


def test_blank_samples_are_counted_and_never_paired(monkeypatch):
    """The policy may stop at once (a blank answer: invalid, but no row PreferenceDataModule accepts)."""
    examples = distinct(3, seed=1)
    script = {0: ["", "!!", " ", "VALID"], 1: ["", "", "", ""], 2: ["", "", "VALID", ""]}

    def sample(model, tokenizer, prompts, **kw):
        return [ex["references"][0] if a == "VALID" else a for ex in examples for a in script[examples.index(ex)]]

    monkeypatch.setattr(lm.sampling, "generate_answers", sample)
    rows, counts = claim_discopop.on_policy_pairs(None, None, examples, samples=4, seed=0, max_new_tokens=9)
    assert not check_answer(examples[0], "!!")
    assert counts["blank_samples"] == 2 + 4 + 3
    assert (counts["skipped_no_valid"], counts["skipped_no_invalid"], counts["pairs"]) == (1, 1, 1)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [(examples[0]["references"][0], "!!")]


def test_without_a_grid_the_lrs_are_the_recorded_tuning_winners_and_no_tuning_pairs_are_drawn(tmp_path, monkeypatch):
    examples = generate_examples(TINY["prompts"], seed=claim_discopop.COMMON["prompt_seed"])
    calls = []
    scripted, real = scripted_sampler(examples, calls), lm.sampling.generate_answers
    monkeypatch.setattr(lm.sampling, "generate_answers",
                        lambda *a, **kw: (scripted if kw.get("do_sample") else real)(*a, **kw))
    monkeypatch.setitem(claim_discopop.SETTINGS, "quick", dict(TINY, lr_grid=None))
    s = claim_discopop.run("quick", None, tmp_path, lambda m, f=None: None)["settings"]
    assert [kw["seed"] for _, kw in calls] == [0, 1]
    assert s["lr_chosen"] == claim_discopop.QUICK_TUNED["lr"] and s["lr_grid_validity"] == {}
    assert set(claim_discopop.QUICK_TUNED["lr"].values()) <= set(claim_discopop.QUICK_TUNED["grid"])
