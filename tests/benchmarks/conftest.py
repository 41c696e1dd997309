"""Shared fixtures of the benchmark tests."""

import pytest

from lm.hf import load_causal_lm
from lm.tokenizers import byte_tokenizer


@pytest.fixture
def local_tiny_model(tmp_path, monkeypatch):
    """``make(layers)``: a byte-level Llama with ``layers`` decoder layers saved as a local model directory (model
    and tokenizer) and set as ``benchmarks.claim_real.MODEL``, the real model's stand-in; returns its path."""
    from benchmarks import claim_real

    def make(layers: int = 1):
        tok = byte_tokenizer()
        path = tmp_path / f"tiny{layers}"
        load_causal_lm({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": layers,
                        "num_attention_heads": 2, "num_key_value_heads": 2}, vocab_size=len(tok),
                       seed=0).save_pretrained(path)
        tok.save_pretrained(path)
        monkeypatch.setattr(claim_real, "MODEL", str(path))
        return path

    return make
