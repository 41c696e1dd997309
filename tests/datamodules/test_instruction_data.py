import json

import pytest
import torch

from datamodules.instruction import InstructionDataModule, load_instruction_records
from datamodules.instruction_tasks import check_answer
from lm.tokenizers import byte_tokenizer


def _ids(text: str) -> list[int]:
    return [b + 3 for b in text.encode()]  # byte-level tokenizer: byte + 3


def test_builtin_records_are_checkable_and_seeded():
    recs = load_instruction_records(None, num_examples=30, seed=1)
    assert recs == load_instruction_records(None, num_examples=30, seed=1)
    assert recs != load_instruction_records(None, num_examples=30, seed=2)
    for r in recs:
        assert r["prompt"].startswith("### Instruction:\n" + r["instruction"])
        assert r["response"] in r["references"] and len(r["references"]) >= 2
        assert check_answer(r, r["response"]) and all(check_answer(r, a) for a in r["references"])


def test_sft_batch_masks_prompt_and_left_pads_prompts(tmp_path):
    rows = [{"instruction": "Say hi.", "response": "hi"},
            {"instruction": "Add.", "context": "1 2", "response": "three"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dm = InstructionDataModule(path=str(tmp_path / "d.jsonl"), batch_size=2, num_val=0,
                               template="Q:{instruction}{context}\nA:")
    dm.setup("fit")
    batch = next(iter(dm._loader(dm.train_set, shuffle=False)))
    by_prompt = {ex["instruction"]: i for i, ex in enumerate(batch["examples"])}
    i, j = by_prompt["Say hi."], by_prompt["Add."]
    p_hi, p_add = _ids("Q:Say hi.\nA:"), _ids("Q:Add.1 2\nA:")
    # row i: prompt, "hi", EOS(1), then right padding (pad=0) up to the longest row
    full_hi = p_hi + _ids("hi") + [1]
    full_add = p_add + _ids("three") + [1]
    width = max(len(full_hi), len(full_add))
    assert batch["input_ids"][i].tolist() == full_hi + [0] * (width - len(full_hi))
    assert batch["attention_mask"][i].tolist() == [1] * len(full_hi) + [0] * (width - len(full_hi))
    assert batch["labels"][i].tolist() == [-100] * len(p_hi) + _ids("hi") + [1] + [-100] * (width - len(full_hi))
    assert batch["labels"][j].tolist() == [-100] * len(p_add) + _ids("three") + [1]
    pw = max(len(p_hi), len(p_add))
    assert batch["prompt_input_ids"][i].tolist() == [0] * (pw - len(p_hi)) + p_hi
    assert batch["prompt_attention_mask"][i].tolist() == [0] * (pw - len(p_hi)) + [1] * len(p_hi)
    assert batch["examples"][i]["references"] == ["hi"]


def test_truncation_keeps_prompt_tail_and_response_head():
    dm = InstructionDataModule(path=None, num_examples=4, max_prompt_length=5, max_response_length=3, num_val=1)
    tok = byte_tokenizer()
    prompts, responses = dm.encode(tok, [{"prompt": "abcdefgh", "response": "wxyz"}])
    assert prompts == [_ids("defgh")]
    assert responses == [_ids("wx") + [tok.eos_token_id]]


def test_prompt_response_format_and_saved_hf_dataset(tmp_path):
    rows = [{"prompt": "raw prompt: ", "response": "r1"}, {"prompt": "other", "response": "r2"}]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    recs = load_instruction_records(str(tmp_path / "p.json"))
    assert [r["prompt"] for r in recs] == ["raw prompt: ", "other"]  # verbatim, no template
    from datasets import Dataset

    Dataset.from_list([{"instruction": "I", "context": "", "response": "R", "category": "qa"}]).save_to_disk(
        str(tmp_path / "hf"))
    (rec,) = load_instruction_records(str(tmp_path / "hf"))
    assert rec["prompt"] == "### Instruction:\nI\n### Response:\n" and rec["category"] == "qa"


def test_bad_records_name_file_line_and_field(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"instruction": "ok", "response": "x"}) + "\n" + json.dumps({"instruction": "no resp"}))
    with pytest.raises(KeyError, match=r"bad.jsonl:2: record has no 'response'"):
        load_instruction_records(str(f))
    assert load_instruction_records(str(f), require_response=False)[1]["response"] == ""
    f.write_text(json.dumps({"question": "q", "response": "x"}))
    with pytest.raises(KeyError, match=r"bad.jsonl:1: record has neither 'instruction' nor 'prompt'"):
        load_instruction_records(str(f))
    with pytest.raises(ValueError, match="template must contain"):
        InstructionDataModule(template="no field")


def test_pretraining_stream_rides_along():
    dm = InstructionDataModule(num_examples=20, batch_size=4, pretrain=True, pretrain_block_size=16, num_val=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pt_input_ids"].shape == (4, 16) and batch["pt_input_ids"].dtype == torch.long
    assert "pt_input_ids" not in next(iter(dm.val_dataloader()))
    assert len(dm.train_set) == 16 and len(dm.val_set) == 4
