"""One generation path: ``lm.sampling.generate_answers`` (text in, text out, through the package's sampler)
and its consumers, QDPO's pair generation and ``QuantizationEval``, decode greedily the same tokens as Hugging Face
``model.generate`` (the path they used before) and so give the same pairs and the same evaluation numbers."""

from types import SimpleNamespace

import pytest
import torch

from callbacks.quantization_eval import evaluate_against_full_precision
from datamodules.qdpo_pairs import QDPOPairsDataModule
from lit_modules import QDPO
from lm.hf import load_causal_lm
from lm.sampling import generate_answers
from lm.tensors import pad_sequences
from lm.tokenizers import byte_tokenizer
from tiny_models import TINY

PROMPTS = ["### Instruction:\nName an even number between 4 and 9.\n### Response:\n", "hi", "a longer prompt here",
           "Q: 2+2?\nA: ", "x", "Q: spell cat backwards\nA: "]


def hf_greedy_tokens(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """The reference: one left-padded batch through ``model.generate`` (greedy, HF's own cache and stopping), each
    answer's tokens cut at EOS."""
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    input_ids = pad_sequences(ids, tokenizer.pad_token_id, left=True)
    mask = pad_sequences([[1] * len(i) for i in ids], 0, left=True)
    with torch.no_grad():
        out = model.eval().generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                    do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id)
    eos = tokenizer.eos_token_id
    return [row[: row.index(eos)] if eos in row else row for row in out[:, input_ids.shape[1]:].tolist()]


def hf_greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """:func:`hf_greedy_tokens` decoded."""
    return [tokenizer.decode(t, skip_special_tokens=True) for t in hf_greedy_tokens(model, tokenizer, prompts,
                                                                                    max_new_tokens)]


def _tiny_model_ending_early(tok, seed: int = 0):
    """A tiny random Llama whose greedy answer to PROMPTS[1] ends (EOS) at its 4th token: the EOS row of the output
    projection is moved along that position's final hidden state h just far enough (+0.5 logits) that EOS becomes
    the argmax there, so answers of different lengths share a batch."""
    model = load_causal_lm(TINY, vocab_size=len(tok), seed=seed).eval()
    ids = tok(PROMPTS[1], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        h = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]  # after the final norm
        logits = model.lm_head(h)
        model.lm_head.weight[tok.eos_token_id] += (logits.max() - logits[tok.eos_token_id] + 0.5) * h / h.square().sum()
    return model


def test_greedy_answers_are_hf_generate_tokens_with_mixed_lengths_and_batches():
    tok = byte_tokenizer()
    model = _tiny_model_ending_early(tok)
    lengths = [len(t) for t in hf_greedy_tokens(model, tok, PROMPTS, max_new_tokens=10)]
    assert lengths[1] == 3 and 10 in lengths  # one answer stops at EOS, others run to the cap
    want = hf_greedy_answers(model, tok, PROMPTS, max_new_tokens=10)
    assert generate_answers(model, tok, PROMPTS, max_new_tokens=10, batch_size=4) == want
    assert [generate_answers(model, tok, [p], max_new_tokens=10, batch_size=1)[0] for p in PROMPTS] == want


def test_sampling_is_reproducible_per_seed_and_leaves_global_rng_and_mode_alone():
    tok = byte_tokenizer()
    model = load_causal_lm(TINY, vocab_size=len(tok), seed=0)
    prompts = ["abc", "defg"] * 2
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = generate_answers(model, tok, prompts, max_new_tokens=8, do_sample=True, seed=7)
    assert torch.equal(torch.rand(1), before)  # generation drew from its own generators
    assert a == generate_answers(model, tok, prompts, max_new_tokens=8, do_sample=True, seed=7)
    assert a != generate_answers(model, tok, prompts, max_new_tokens=8, do_sample=True, seed=8)
    assert model.training  # the caller's mode is restored
    with pytest.raises(ValueError, match="temperature must be > 0"):
        generate_answers(model, tok, prompts, do_sample=True, temperature=0.0)


def _forbid_hf_generate(monkeypatch, model):
    def refuse(*args, **kwargs):
        raise AssertionError("HF generate called: not the package's one sampler")

    monkeypatch.setattr(type(model), "generate", refuse)


def test_qdpo_pairs_are_the_hf_generate_greedy_answers_of_both_models(monkeypatch):
    module = QDPO(model=TINY, group_size=16, bits=2)
    module.configure_model()
    dm = QDPOPairsDataModule(num_prompts=24, max_new_tokens=8, generation_batch_size=5, val_fraction=0.0)
    dm.trainer = SimpleNamespace(lightning_module=module, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    _forbid_hf_generate(monkeypatch, module.full_precision)
    rows = dm.records()
    monkeypatch.undo()
    prompts = [r["prompt"] for r in rows]
    assert [r["chosen"] for r in rows] == hf_greedy_answers(module.full_precision, module.tokenizer, prompts, 8)
    assert [r["rejected"] for r in rows] == hf_greedy_answers(module.policy, module.tokenizer, prompts, 8)
    assert any(r["chosen"] != r["rejected"] for r in rows)  # the two models do differ somewhere


def test_quantization_eval_numbers_are_those_of_hf_generate_answers(monkeypatch):
    import callbacks.quantization_eval as quantization_eval
    from datamodules.instruction_tasks import generate_examples

    module = QDPO(model=TINY, group_size=16, bits=2)
    module.configure_model()
    records = [{"prompt": f"Q: {ex['instruction']}\nA: ", **ex} for ex in generate_examples(12, seed=3)]
    _forbid_hf_generate(monkeypatch, module.full_precision)
    ours = evaluate_against_full_precision(module.full_precision, module.policy, module.tokenizer, records,
                                           max_new_tokens=8, batch_size=5)
    monkeypatch.undo()
    monkeypatch.setattr(quantization_eval, "generate_answers",
                        lambda model, tok, prompts, max_new_tokens, **_: hf_greedy_answers(model, tok, prompts,
                                                                                           max_new_tokens))
    reference = evaluate_against_full_precision(module.full_precision, module.policy, module.tokenizer, records,
                                                max_new_tokens=8, batch_size=5)
    assert ours == reference and ours["same_answer"] < 1.0
