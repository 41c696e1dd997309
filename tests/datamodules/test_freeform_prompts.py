"""Built-in free-form instructions (datamodules/freeform_prompts.py) and their use as QDPO's prompt source: seeded
draws, train / held-out separation by topic, the pairs built from them, their evaluation (no checker: None, not 0),
``benchmarks.qdpo_table --prompts freeform`` on a tiny model, and one clear error for a bad source."""

from types import SimpleNamespace

import pytest
import torch

import callbacks.quantization_eval as quantization_eval
from callbacks.quantization_eval import QuantizationEval, evaluate_against_full_precision
from datamodules.freeform_prompts import (TEMPLATES, TOPICS, freeform_instructions, freeform_records,
                                          load_prompt_records, split_pool)
import datamodules.qdpo_pairs as qdpo_pairs
from datamodules.qdpo_pairs import QDPOPairsDataModule
from lit_modules import QDPO
from lm.hf import load_causal_lm
from lm.tokenizers import PROMPT_TEMPLATE, byte_tokenizer
from tiny_models import TINY



def _attach(dm, module):
    dm.trainer = SimpleNamespace(lightning_module=module, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    return dm


def test_pools_are_template_times_topic_split_by_topic():
    # 8 "thing" templates x 40 topics, 4 "activity" templates x 16 topics; topics 0, 4, 8, ... held out:
    # 10 of 40 and 4 of 16 -> held out 8*10 + 4*4 = 96, train 8*30 + 4*12 = 288, all distinct
    assert (len(TEMPLATES["thing"]), len(TOPICS["thing"]), len(TEMPLATES["activity"]), len(TOPICS["activity"])) \
        == (8, 40, 4, 16)
    train, held = split_pool("train"), split_pool("heldout")
    assert (len(train), len(set(train)), len(held), len(set(held))) == (288, 288, 96, 96)
    assert not set(train) & set(held)
    assert "Explain photosynthesis in one sentence." in held  # topic 0 of "thing"
    assert "Explain the moon in one sentence." in train  # topic 1
    assert "Give two tips for learning a language." in held and "Give two tips for sleeping well." in train
    with pytest.raises(ValueError, match="split must be one of"):
        split_pool("test")


def test_draws_are_seeded_and_distinct_until_the_pool_runs_out():
    a, b, c = freeform_instructions(50, seed=3), freeform_instructions(50, seed=3), freeform_instructions(50, seed=4)
    assert a == b and a != c and len(set(a)) == 50 and set(a) <= set(split_pool("train"))
    assert freeform_instructions(20, seed=3) == a[:20]  # a prefix of the same shuffle
    many = freeform_instructions(96 + 10, seed=0, split="heldout")  # a second pass reshuffles the same 96
    assert len(set(many[:96])) == 96 and set(many[96:]) <= set(many[:96])
    records = freeform_records(3, seed=1, template="Q: {instruction}\nA: ")
    assert [r["prompt"] for r in records] == [f"Q: {t}\nA: " for t in freeform_instructions(3, seed=1)]
    assert all("task" not in r and r["response"] == "" and r["references"] == [] for r in records)


@pytest.fixture
def fake_generation(monkeypatch):
    """FP answers "a<i>"; the quantized model agrees on every third prompt."""
    module = QDPO(model=TINY, group_size=16)
    monkeypatch.setattr(qdpo_pairs, "generate_answers", lambda model, tok, prompts, **decoding: [
        f"a{i}" if model is module.full_precision or i % 3 == 0 else f"q{i}" for i in range(len(prompts))])
    return module


def test_pairs_from_free_form_prompts_never_meet_the_held_out_eval_prompts(fake_generation, monkeypatch):
    module = fake_generation
    dm = _attach(QDPOPairsDataModule(prompts="freeform", num_prompts=400, prompt_seed=2, val_fraction=0.0), module)
    dm.setup("fit")
    # 400 draws of a 288-instruction pool: all 288 once; every third pair identical and dropped (96)
    assert len(dm.records()) == 288 and dm.num_dropped_identical == 96 and len(dm.pairs) == 192
    row = dm.pairs[0]["row"]
    assert "task" not in row["example"] and row["prompt"] == PROMPT_TEMPLATE.format(
        instruction=row["example"]["instruction"], context="", context_block="", user="")
    # the callback's held-out prompts (drawn twice over to see them all) share nothing with the pairs
    monkeypatch.setattr(quantization_eval, "generate_answers", lambda model, tok, prompts, **kw: [""] * len(prompts))
    evaluation = QuantizationEval(prompts="freeform", num_prompts=200, exclude_training_prompts=False)
    evaluation._prepare(SimpleNamespace(datamodule=dm), module)
    held = {r["prompt"] for r in evaluation.records}
    assert len(held) == 96 and not held & {r["prompt"] for r in dm.records()}
    assert {r["instruction"] for r in evaluation.records} == set(split_pool("heldout"))
    follows = QuantizationEval(num_prompts=200)  # no prompts of its own: the datamodule's (--data.init_args.prompts)
    follows._prepare(SimpleNamespace(datamodule=dm), module)
    assert follows.records == evaluation.records
    alone = QuantizationEval(num_prompts=20)  # no datamodule to follow: the built-in tasks
    alone._prepare(SimpleNamespace(datamodule=None), module)
    assert all("task" in r for r in alone.records)


def test_free_form_evaluation_has_no_checker_score():
    tok = byte_tokenizer()
    fp = load_causal_lm(TINY, vocab_size=len(tok), seed=0)
    other = load_causal_lm(TINY, vocab_size=len(tok), seed=1)
    records = load_prompt_records("freeform", None, 5, seed=0, template=PROMPT_TEMPLATE, split="heldout")
    m = evaluate_against_full_precision(fp, other, tok, records, max_new_tokens=3, batch_size=5)
    assert m["check_score"] is None and m["num_prompts"] == 5 and 0.0 <= m["flip_rate"] <= 1.0
    tasks = load_prompt_records("tasks", None, 5, seed=0, template=PROMPT_TEMPLATE)
    assert evaluate_against_full_precision(fp, other, tok, tasks, max_new_tokens=3, batch_size=5)["check_score"] \
        is not None


def test_bad_prompt_source_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"QDPOPairsDataModule.prompts must be one of \('tasks', 'freeform'\), "
                                         r"got 'chat'"):
        QDPOPairsDataModule(prompts="chat")
    with pytest.raises(ValueError, match="QuantizationEval.prompts must be one of"):
        QuantizationEval(prompts="free-form")
    with pytest.raises(ValueError, match="QDPOPairsDataModule.prompts='freeform' is a built-in prompt source: it "
                                         "takes no path"):
        QDPOPairsDataModule(prompts="freeform", path=str(tmp_path / "p.jsonl"))
    with pytest.raises(ValueError, match="takes no path .* and no tasks"):
        QDPOPairsDataModule(prompts="freeform", tasks=["even"])


def test_qdpo_table_on_free_form_prompts_runs_on_a_tiny_model(tmp_path, capsys):
    pytest.importorskip("torchao")
    from benchmarks import qdpo_table

    tok = byte_tokenizer()
    load_causal_lm(TINY, vocab_size=len(tok), seed=0).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    out = qdpo_table.main(["--model", str(tmp_path / "tiny"), "--prompts", "freeform", "--bits", "2",
                           "--group-size", "16", "--num-prompts", "12", "--eval-prompts", "6", "--batch-size", "4",
                           "--lr", "1e-3", "--max-new-tokens", "4", "--generation-batch-size", "8", "--seeds", "0", "1",
                           "--cache", str(tmp_path / "cache")])
    run, other = out["runs"]
    assert out["settings"]["prompts"] == "freeform" and run["eval_prompts"] == 6 and run["pairs_generated"] == 12
    assert all(run["results"][name]["check_score"] is None for name in ("fp", "rtn", "qdpo"))
    assert run["results"]["fp"]["flip_rate"] == 0.0 and run["results"]["fp"]["rouge_l"] == pytest.approx(1.0)
    # held-out prompts are disjoint from every seed's pairs, so both seeds share FP and RTN (evaluated once)
    assert other["results"]["rtn"] == run["results"]["rtn"] and other["results"]["fp"] == run["results"]["fp"]
    assert out["median"]["rtn"]["check_score"] is None
    with pytest.raises(SystemExit):
        qdpo_table.main(["--prompts", "chat"])
    assert "invalid choice: 'chat'" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["tasks", "freeform"])
def test_quantizer_calibration_prompts_never_meet_the_held_out_eval_prompts(source, monkeypatch):
    # calibration drawn with the evaluation's own seed: only the split (freeform) or the exclusion (tasks) keeps
    # them apart
    module = QDPO(model=TINY, quantizer="gptq", group_size=16,
                  quantizer_options={"calibration": source, "calibration_size": 100, "calibration_seed": 12345})
    calibration = set(module.calibration_prompts())
    assert len(calibration) > 20
    monkeypatch.setattr(quantization_eval, "generate_answers", lambda model, tok, prompts, **kw: [""] * len(prompts))
    kept, unfiltered = QuantizationEval(prompts=source, num_prompts=200), QuantizationEval(
        prompts=source, num_prompts=200, exclude_training_prompts=False)
    for evaluation in (kept, unfiltered):
        evaluation._prepare(SimpleNamespace(datamodule=None), module)
    assert kept.records and not calibration & {r["prompt"] for r in kept.records}
    overlap = calibration & {r["prompt"] for r in unfiltered.records}
    assert (not overlap) if source == "freeform" else overlap  # tasks: the exclusion is what keeps them apart
