"""The prompt format travels with the model: written into the export's chat template by the instruction data it
was trained on, read back by every consumer as its default, a differing explicit template warned about, and a hub
chat template used unchanged."""

import json
import warnings
from types import SimpleNamespace

import lightning as L
import pytest
from transformers import AutoTokenizer

from datamodules import InstructionDataModule
from datamodules.instruction import load_instruction_records
from lit_modules import CausalLM
from lm.tokenizers import (byte_tokenizer, check_prompt_template, chat_template_for, load_tokenizer,
                           model_prompt_template, resolve_prompt_template, set_prompt_template)
from tiny_models import TINY

Q = "Q: {instruction}\nA: "
# a hub-style (ChatML) chat template, as instruct models such as SmolLM2 ship
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _instruction_data(module, **kwargs) -> InstructionDataModule:
    dm = InstructionDataModule(**({"num_examples": 24, "num_val": 4, "batch_size": 4, "max_response_length": 8}
                                  | kwargs))
    dm.trainer = SimpleNamespace(lightning_module=module)
    return dm


def test_template_round_trips_through_training_export_and_load(tmp_path):
    module = CausalLM(model=TINY, export_dir=str(tmp_path / "sft"))
    data = InstructionDataModule(template=Q, num_examples=24, num_val=4, batch_size=4, max_response_length=8)
    L.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(module, data)
    # plain Hugging Face sees the format as the export's chat template (prompt, then answer + EOS)
    hf = AutoTokenizer.from_pretrained(tmp_path / "sft")
    chat = [{"role": "user", "content": "Name a colour."}]
    assert hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == "Q: Name a colour.\nA: "
    assert hf.apply_chat_template(chat + [{"role": "assistant", "content": "red"}], tokenize=False) == \
        "Q: Name a colour.\nA: red</s>"
    # and the next consumer of the export prompts it in that format without being told
    loaded = CausalLM(model=str(tmp_path / "sft"))
    dm = _instruction_data(loaded)
    dm.setup("fit")
    records = dm.train_set.records + dm.val_set.records
    assert all(r["prompt"] == f"Q: {r['instruction']}\nA: " for r in records)
    assert model_prompt_template(load_tokenizer(None, str(tmp_path / "sft"))) == Q


def test_explicit_template_equal_to_the_models_is_silent_a_different_one_warns_once():
    module = CausalLM(model=TINY)
    set_prompt_template(module.tokenizer, Q)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _instruction_data(module, template=Q).setup("fit")
    other = "### Instruction:\n{instruction}\n### Response:\n"
    with pytest.warns(UserWarning, match="differs from the model's own prompt format") as caught:
        dm = _instruction_data(module, template=other)
        dm.setup("fit")
    assert len([w for w in caught if "prompt format" in str(w.message)]) == 1
    assert dm.val_set.records[0]["prompt"].startswith("### Instruction:\n")  # used as asked


def test_a_model_without_a_format_gets_the_default_and_keeps_the_one_it_is_trained_with():
    tok = byte_tokenizer()
    assert model_prompt_template(tok) is None
    assert resolve_prompt_template(tok) == "### Instruction:\n{instruction}\n{context_block}### Response:\n"
    module = CausalLM(model=TINY)
    _instruction_data(module, template=Q).setup("fit")
    assert model_prompt_template(module.tokenizer) == Q  # what an export of this module will carry


def test_hub_chat_template_is_used_unchanged(tmp_path):
    module = CausalLM(model=TINY)
    module.tokenizer.chat_template = CHATML
    path = tmp_path / "dolly.jsonl"
    path.write_text(json.dumps({"instruction": "Summarise.", "context": "Cats sleep.", "response": "Sleepy."}) + "\n"
                    + json.dumps({"instruction": "Say {hi}.", "response": "hi"}) + "\n")
    assert model_prompt_template(module.tokenizer) == "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    dm = _instruction_data(module, path=str(path), num_val=1)
    dm.setup("fit")
    prompts = sorted(r["prompt"] for r in dm.train_set.records + dm.val_set.records)
    assert prompts == ["<|im_start|>user\nSay {hi}.<|im_end|>\n<|im_start|>assistant\n",
                       "<|im_start|>user\nSummarise.\n\nCats sleep.<|im_end|>\n<|im_start|>assistant\n"]
    assert module.tokenizer.chat_template == CHATML  # the hub template is kept, not replaced by ours


@pytest.mark.parametrize("template", [Q, "### Instruction:\n{instruction}\n{context_block}### Response:\n",
                                      'é "x" \\ {{lit}} #}} {user}\t-#}}\n'])
def test_our_chat_template_renders_the_format_and_gives_it_back_exactly(template):
    tok = byte_tokenizer()
    tok.chat_template = chat_template_for(template)
    assert model_prompt_template(tok) == template
    expected = template.replace("{instruction}", "hi").replace("{user}", "hi").replace("{context_block}", "")
    expected = expected.replace("{{", "{").replace("}}", "}")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == expected
    records = load_instruction_records(None, 3, seed=0, template=model_prompt_template(tok))
    assert [r["prompt"] for r in records] == [
        tok.apply_chat_template([{"role": "user", "content": r["instruction"]}], tokenize=False) for r in records]


def test_bad_templates_are_clear_errors():
    with pytest.raises(ValueError, match=r"InstructionDataModule.template: unknown field\(s\) \['question'\]"):
        InstructionDataModule(template="{question}")
    with pytest.raises(ValueError, match="template must contain"):
        check_prompt_template("no field")
    with pytest.raises(ValueError, match="not a valid format string"):
        check_prompt_template("{instruction} }")
    tok = byte_tokenizer()
    tok.chat_template = "{{ 'fixed prompt' }}"  # never shows the user's message
    with pytest.raises(ValueError, match="does not show a user message"):
        model_prompt_template(tok)


def test_builtin_preference_pairs_use_the_models_format():
    from datamodules import PreferenceDataModule

    module = CausalLM(model=TINY)
    set_prompt_template(module.tokenizer, Q)
    dm = PreferenceDataModule(num_examples=12, val_fraction=0.25)
    dm.trainer = SimpleNamespace(lightning_module=module)
    dm.setup("fit")
    assert all(p["row"]["prompt"] == f"Q: {p['row']['example']['instruction']}\nA: " for p in dm.pairs)
