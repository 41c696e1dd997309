import math

import pytest
import torch

from lit_modules import CausalLM
from lm.hf import check_same_vocabulary, load_causal_lm
from tiny_models import TINY, materialized



def test_loss_is_mean_next_token_nll_over_non_padding_targets():
    module = CausalLM(model=TINY)
    module.configure_model()
    ids = torch.tensor([[10, 11, 12, 13], [20, 21, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    loss, logits, _ = module._loss_and_logits({"input_ids": ids, "attention_mask": mask})
    logp = torch.log_softmax(logits.double(), dim=-1)
    # targets: row 0 predicts 11,12,13 from positions 0..2; row 1 predicts 21 from position 0 only
    terms = [logp[0, 0, 11], logp[0, 1, 12], logp[0, 2, 13], logp[1, 0, 21]]
    expected = -sum(t.item() for t in terms) / 4
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)


def test_export_round_trip_gives_identical_logits(tmp_path):
    module = CausalLM(model=TINY, init_seed=7)
    module.configure_model()
    module.export(tmp_path / "m")
    again = CausalLM(model=str(tmp_path / "m"))
    again.configure_model()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(module(ids).logits, again(ids).logits, atol=1e-6)
    assert len(again.tokenizer) == len(module.tokenizer) == 259


def test_init_seed_makes_random_init_reproducible():
    a, b, c = (materialized(CausalLM(model=TINY, init_seed=seed)) for seed in (1, 1, 2))
    wa, wb, wc = (m.model.lm_head.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_bad_model_specs_raise_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_causal_lm(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="vocab_size"):
        load_causal_lm({"hidden_size": 32})
    with pytest.raises(ValueError, match="dtype"):
        load_causal_lm(TINY | {"vocab_size": 10}, dtype="int3")
    small, big = load_causal_lm(TINY | {"vocab_size": 10}), load_causal_lm(TINY | {"vocab_size": 12})
    with pytest.raises(ValueError, match="vocabulary size 10 != teacher vocabulary size 12"):
        check_same_vocabulary(small, big)


def test_weight_decay_groups_exclude_vectors():
    module = CausalLM(model=TINY, weight_decay=0.1)
    module.configure_model()
    decayed, plain = module.parameter_groups()
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    n = sum(p.numel() for g in (decayed, plain) for p in g["params"])
    assert n == sum(p.numel() for p in module.parameters())
