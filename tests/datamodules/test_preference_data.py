"""PreferenceDataModule: built-in pairs are checkably right/wrong, batches are masked as hand-computed, bad rows
fail with their line number, identical pairs are dropped and counted."""

import json

import pytest
import torch

from datamodules import PreferenceDataModule
from datamodules.instruction_tasks import TASKS, check_answer
from datamodules.preference import builtin_preference_records

# Byte-level tokenizer: byte b -> id b + 3, pad = 0, eos = 1.
A, B, C, D, E = (ord(ch) + 3 for ch in "abcde")


def test_builtin_chosen_valid_rejected_invalid_and_plausible():
    rows = builtin_preference_records(300, seed=3)
    assert {r["example"]["task"] for r in rows} == set(TASKS)
    for r in rows:
        ex = r["example"]
        assert check_answer(ex, r["chosen"]), r
        assert not check_answer(ex, r["rejected"]), r
        assert r["prompt"].startswith("### Instruction:\n") and r["prompt"].endswith("### Response:\n")
        # plausible: same surface form as a valid answer
        if ex["task"] in ("even", "multiple"):
            assert r["rejected"].isdigit()
        elif ex["task"] == "sum_to":
            assert "+" in r["rejected"]
        elif ex["task"] == "order":
            assert len(r["rejected"]) == 3 and r["rejected"].isalpha()
    assert builtin_preference_records(50, seed=3) == builtin_preference_records(50, seed=3)


def test_collate_masks_prompt_and_padding_by_hand():
    dm = PreferenceDataModule.from_records([{"prompt": "ab", "chosen": "c", "rejected": "de"}], val_fraction=0.0,
                                           batch_size=1)
    dm.setup("fit")
    batch = next(iter(dm.all_dataloader()))
    assert batch["input_ids"].tolist() == [[A, B, C, 1, 0], [A, B, D, E, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert batch["response_mask"].tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert batch["index"].tolist() == [0]


def test_truncation_keeps_prompt_end_and_response_start():
    rows = [{"prompt": "abcde", "chosen": "abc", "rejected": "d"}]
    dm = PreferenceDataModule.from_records(rows, max_prompt_length=2, max_length=4, val_fraction=0.0)
    dm.setup("fit")
    pair = dm.pairs[0]
    assert pair["prompt_ids"] == [D, E]
    assert pair["chosen_ids"] == [A, B]          # 2-token budget: "ab", EOS cut
    assert pair["rejected_ids"] == [D, 1]
    assert dm.num_truncated == 1


def test_identical_pairs_dropped_and_counted(caplog):
    rows = [{"prompt": "p", "chosen": "x", "rejected": "y"}, {"prompt": "p", "chosen": "z", "rejected": "z"},
            {"prompt": "q", "chosen": "x", "rejected": "w"}]
    dm = PreferenceDataModule.from_records(rows, val_fraction=0.0)
    with caplog.at_level("WARNING"):
        dm.setup("fit")
    assert dm.num_dropped_identical == 1
    assert [p["index"] for p in dm.pairs] == [0, 1]
    assert [p["row"]["prompt"] for p in dm.pairs] == ["p", "q"]
    assert "dropped 1 pair" in caplog.text


def test_split_is_seeded_disjoint_and_complete():
    dm = PreferenceDataModule(num_examples=100, val_fraction=0.2, seed=5)
    dm.setup("fit")
    train, val = {p["index"] for p in dm.train_pairs}, {p["index"] for p in dm.val_pairs}
    assert len(val) == 20 and not train & val and train | val == set(range(100))
    dm2 = PreferenceDataModule(num_examples=100, val_fraction=0.2, seed=5)
    dm2.setup("fit")
    assert val == {p["index"] for p in dm2.val_pairs}
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 2 * dm.batch_size and batch["index"].shape == (dm.batch_size,)


def _write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_jsonl_file_and_custom_fields(tmp_path):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"q": "ab", "good": "c", "bad": "d"}, {"q": "a", "good": "b",
                                                                                         "bad": "e"}])
    dm = PreferenceDataModule(path=path, prompt_field="q", chosen_field="good", rejected_field="bad",
                              val_fraction=0.0)
    dm.setup("fit")
    assert [p["chosen_ids"] for p in dm.pairs] == [[C, 1], [B, 1]]


@pytest.mark.parametrize("bad_row, message", [
    ({"prompt": "a", "chosen": "b"}, r"p.jsonl:3: missing field\(s\) \['rejected'\]"),
    ({"prompt": "a", "chosen": 5, "rejected": "c"}, r"p.jsonl:3: field 'chosen' must be a string or"),
    ('{"prompt": "a", ', r"p.jsonl:3: invalid JSON"),
    ({"prompt": "a", "chosen": "", "rejected": "c"}, r"p.jsonl:3: field 'chosen' is empty"),
    ({"prompt": "a", "chosen": "b", "rejected": "  "}, r"p.jsonl:3: field 'rejected' is empty"),
    ({"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "assistant", "content": ""}],
      "rejected": [{"role": "assistant", "content": "c"}]}, r"p.jsonl:3: field 'chosen' is empty"),
])
def test_malformed_row_names_file_and_line(tmp_path, bad_row, message):
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    path = _write_jsonl(tmp_path / "p.jsonl", [good, good, bad_row])
    dm = PreferenceDataModule(path=path)
    with pytest.raises((KeyError, ValueError), match=message):
        dm.setup("fit")


def test_chosen_equal_to_rejected_in_every_row_names_the_fields_and_first_line(tmp_path):
    same = {"prompt": "a", "chosen": "b", "rejected": "b"}
    dm = PreferenceDataModule(path=_write_jsonl(tmp_path / "p.jsonl", [same, same]))
    with pytest.raises(ValueError, match=r"p.jsonl: no usable preference pairs: every row's 'chosen' equals its "
                                         r"'rejected' \(first: .*p.jsonl:1\)"):
        dm.setup("fit")


def test_saved_hf_dataset(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"prompt": "ab", "chosen": "c", "rejected": "d"}] * 3).save_to_disk(str(tmp_path / "ds"))
    dm = PreferenceDataModule(path=str(tmp_path / "ds"), val_fraction=0.0)
    dm.setup("fit")
    assert len(dm.pairs) == 3 and dm.pairs[2]["rejected_ids"] == [D, 1]


TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}" \
           "{% if add_generation_prompt %}<assistant>{% endif %}"


def test_chat_messages_rendered_with_template():
    row = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "ok"}],
           "rejected": [{"role": "assistant", "content": "no"}]}
    dm = PreferenceDataModule.from_records([row], chat_template=TEMPLATE, val_fraction=0.0)
    dm.setup("fit")
    tok = lambda s: [b + 3 for b in s.encode()]  # noqa: E731
    pair = dm.pairs[0]
    assert pair["prompt_ids"] == tok("<user>hi<assistant>")
    assert pair["chosen_ids"] == tok("ok") + [1] and pair["rejected_ids"] == tok("no") + [1]
    no_template = PreferenceDataModule.from_records([row])
    with pytest.raises(ValueError, match="no chat template"):
        no_template.setup("fit")


def test_subclass_records_hook():
    class Generated(PreferenceDataModule):
        def records(self):
            return [{"prompt": f"{i}", "chosen": "a", "rejected": "b"} for i in range(10)]

    dm = Generated(val_fraction=0.3)
    dm.setup("fit")
    assert len(dm.train_pairs) == 7 and len(dm.val_pairs) == 3
    assert torch.equal(next(iter(dm.val_dataloader()))["index"], torch.tensor(sorted(p["index"] for p in dm.val_pairs)))
