"""callbacks.quantization_eval.perplexity / heldout_text: perplexity by hand on a bigram model, and the held-out
text sources."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from callbacks.quantization_eval import QuantizationEval, heldout_text, perplexity
from datamodules.instruction_tasks import PROMPT_TEMPLATE, check_answer, generate_examples
from lm.tokenizers import byte_tokenizer


class Bigram(nn.Module):
    """logits of the next token = a fixed random row per current token (a model whose p(x_t | x_<t) is known)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])


def test_perplexity_is_exp_of_the_mean_next_token_nll_of_each_block():
    tok = byte_tokenizer()
    model = Bigram(len(tok))
    texts = ["the cat", "sat on the mat", "and then", "it left", "never to be seen again"]
    stream = []  # by hand: each text's bytes, then EOS; blocks of 5 tokens; each block's first token is context
    for t in texts:
        stream += [b + 3 for b in t.encode()] + [tok.eos_token_id]
    assert tok("the cat", add_special_tokens=False)["input_ids"] == [b + 3 for b in b"the cat"]  # 3 specials first
    blocks = [stream[i * 5:(i + 1) * 5] for i in range(3)]
    logp = torch.log_softmax(model.table.detach().double(), -1)
    nll = -sum(float(logp[b[j - 1], b[j]]) for b in blocks for j in range(1, 5))
    got = perplexity(model, tok, [("", t) for t in texts], block_size=5, max_blocks=3, batch_size=2)
    assert got == pytest.approx(math.exp(nll / 12), rel=1e-6)
    assert model.training  # mode restored


def test_a_uniform_model_has_the_vocabulary_size_as_perplexity():
    tok = byte_tokenizer()
    model = Bigram(len(tok))
    with torch.no_grad():
        model.table.zero_()
    assert perplexity(model, tok, [("", "abcdefgh" * 10)], block_size=16, max_blocks=4) == pytest.approx(len(tok))
    assert perplexity(model, tok, [("question", "answer")] * 3, batch_size=2) == pytest.approx(len(tok))


def test_with_a_context_only_the_text_and_eos_are_scored_one_row_per_pair():
    tok = byte_tokenizer()
    model = Bigram(len(tok))
    pairs = [("Q: 1+1?", "2"), ("Say hi.", "hello"), ("x", "longer answer")]
    logp = torch.log_softmax(model.table.detach().double(), -1)
    nll, n = 0.0, 0
    for context, text in pairs:  # by hand: ids = context bytes, text bytes, EOS; targets = the text's bytes and EOS
        ids = [b + 3 for b in (context + text).encode()] + [tok.eos_token_id]
        for j in range(len(context.encode()), len(ids)):
            nll -= float(logp[ids[j - 1], ids[j]])
            n += 1
    assert n == 2 + 6 + 14
    got = perplexity(model, tok, pairs, batch_size=2)  # rows of different lengths share a padded batch
    assert got == pytest.approx(math.exp(nll / n), rel=1e-6)


class LowRank(nn.Module):
    """A large vocabulary (49152, SmolLM2's) with large logits (offset 100), the case where float32 loses bits."""

    def __init__(self, vocab: int = 49152):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Parameter(torch.randn(259, 16, generator=g))
        self.out = nn.Parameter(torch.randn(16, vocab, generator=g))

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=self.emb[input_ids] @ self.out + 100.0)


def test_perplexity_matches_float64_on_a_large_vocabulary_with_large_logits():
    tok, model = byte_tokenizer(), LowRank()
    texts = [("", "some held-out text, " * 40)]
    blocks = torch.tensor([[b + 3 for b in ("some held-out text, " * 40).encode()][:128 * 3]]).view(3, 128)
    with torch.no_grad():  # the model's own float32 logits, normalised in float64
        logp = model(blocks).logits.double().log_softmax(-1)[:, :-1]
    nll = -float(logp.gather(-1, blocks[:, 1:, None]).sum())
    got = perplexity(model, tok, texts, block_size=128, max_blocks=3)
    # float32 log-softmax: 3.6e-6 off here; the (B, V, T) cross-entropy layout was 6.3e-5 off
    assert got == pytest.approx(math.exp(nll / (3 * 127)), rel=1e-5)


def test_too_little_text_is_a_clear_error():
    tok = byte_tokenizer()
    with pytest.raises(ValueError, match="no block of 64 tokens"):
        perplexity(Bigram(len(tok)), tok, [("", "short")], block_size=64)


def test_heldout_text_sources():
    tasks = heldout_text("tasks", PROMPT_TEMPLATE, n=20)
    examples = generate_examples(20, 54321)
    assert len(tasks) == 20
    for (context, text), ex in zip(tasks, examples):  # the prompt in the template, then the reference answer
        assert context == PROMPT_TEMPLATE.format(instruction=ex["instruction"], context="", context_block="",
                                                 user=ex["instruction"])
        assert text == ex["response"] and check_answer(ex, text)
    docs = heldout_text("docs", PROMPT_TEMPLATE)
    assert docs == heldout_text("docs", PROMPT_TEMPLATE) != heldout_text("docs", PROMPT_TEMPLATE, seed=1)
    assert len(docs) > 50 and all(context == "" and text.strip() for context, text in docs)
    with pytest.raises(ValueError, match="perplexity text must be one of"):
        heldout_text("wiki", PROMPT_TEMPLATE)
    with pytest.raises(ValueError, match="QuantizationEval.perplexity_text"):
        QuantizationEval(perplexity_text="wiki")
