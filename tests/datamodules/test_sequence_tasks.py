"""The sequence-task generator and datamodule: formats, answers, separators, tokenization, seeding, files."""

import json
import random

import pytest

from datamodules import SequenceTasksDataModule
from datamodules.sequence_tasks import TASKS, encode_example, format_digits, generate_examples, make_example
from lm.tokenizers import byte_tokenizer


def _body(ex: dict) -> str:
    return ex["prompt"].split(":", 1)[1].rstrip("=")


def test_format_digits_inserts_separator_every_k():
    assert format_digits("1111111", ",", 3) == "111,111,1"
    assert format_digits("123456", ",", 3) == "123,456"
    assert format_digits("1234", ",", 1) == "1,2,3,4"
    assert format_digits("1234", "", 3) == "1234"


@pytest.mark.parametrize("n", [1, 2, 7, 30])
def test_answers_are_correct_for_every_task(n):
    rng = random.Random(n)
    first = make_example("copy_first", n, rng)
    assert first["prompt"].startswith("first:") and first["prompt"].endswith("=")
    assert first["answer"] == _body(first)[0] and len(_body(first)) == n and first["position"] == 0.0
    last = make_example("copy_last", n, rng)
    assert last["answer"] == _body(last)[-1] and last["position"] == 1.0
    count = make_example("count_ones", n, rng)
    assert _body(count) == "1" * n and count["answer"] == str(n) and count["position"] is None
    total = make_example("sum_ones", n, rng)
    assert _body(total).split("+") == ["1"] * n and total["answer"] == str(n)


def test_find_odd_has_exactly_one_differing_digit_at_its_position():
    rng = random.Random(0)
    positions = set()
    for _ in range(200):
        ex = make_example("find_odd", 9, rng)
        body = _body(ex)
        counts = {c: body.count(c) for c in set(body)}
        assert sorted(counts.values()) == [1, 8]
        (odd,) = [c for c, k in counts.items() if k == 1]
        assert ex["answer"] == odd and body.index(odd) == round(ex["position"] * 8)
        positions.add(body.index(odd))
    assert positions == set(range(9))  # every position gets used


def test_separator_applies_to_digits_but_not_to_sum():
    rng = random.Random(0)
    ex = make_example("count_ones", 7, rng, separator=",", separator_every=3)
    assert ex["prompt"] == "count:111,111,1=" and ex["answer"] == "7"
    assert make_example("sum_ones", 3, rng, separator=",")["prompt"] == "sum:1+1+1="


def test_generation_is_seeded_and_respects_length_range():
    a = generate_examples(300, min_length=4, max_length=9, seed=3)
    assert a == generate_examples(300, min_length=4, max_length=9, seed=3)
    assert a != generate_examples(300, min_length=4, max_length=9, seed=4)
    assert {ex["task"] for ex in a} == set(TASKS)
    assert {ex["length"] for ex in a} == set(range(4, 10))
    short = generate_examples(200, min_length=1, max_length=4)
    assert all(ex["length"] >= 3 for ex in short if ex["task"] == "find_odd")


def test_byte_tokenizer_makes_digits_single_tokens_and_labels_cover_answer_only():
    tok = byte_tokenizer()
    ex = {"prompt": "count:12,3=", "answer": "17"}
    ids, labels = encode_example(tok, ex)
    assert len(ids) == len("count:12,3=") + 2 + 1  # one token per character, answer, EOS
    assert labels[: len("count:12,3=")] == [-100] * len("count:12,3=")
    assert labels[-3:] == ids[-3:] and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[-3:-1]) == "17"


def test_datamodule_batches_pad_and_mask():
    dm = SequenceTasksDataModule(num_train=40, num_val=10, batch_size=8, max_length=12)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.shape[0] == 8
    assert (labels[mask == 0] == -100).all() and (ids[mask == 0] == dm.tokenizer.pad_token_id).all()
    # every row has a supervised answer ending in EOS at its last real position
    last = mask.sum(1) - 1
    assert (labels[range(8), last] == dm.tokenizer.eos_token_id).all()
    assert len(dm.val_dataloader().dataset) == 10


def test_datamodule_reads_jsonl_and_names_bad_lines(tmp_path):
    good = tmp_path / "tasks.jsonl"
    good.write_text("\n".join(json.dumps({"prompt": f"count:{'1' * k}=", "answer": str(k)}) for k in range(1, 21)))
    dm = SequenceTasksDataModule(path=str(good), val_fraction=0.1, batch_size=4)
    dm.setup("fit")
    assert len(dm.train_examples) == 18 and len(dm.val_examples) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a=", "answer": "1"}\n{"prompt": "b="}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'answer'"):
        SequenceTasksDataModule(path=str(bad)).setup("fit")


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown"):
        SequenceTasksDataModule(tasks=["copy_middle"])
    with pytest.raises(ValueError, match="min_length"):
        SequenceTasksDataModule(min_length=5, max_length=3)
    with pytest.raises(ValueError, match="find_odd"):
        make_example("find_odd", 2, random.Random(0))
