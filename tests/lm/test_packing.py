"""lm.packing: a hand-built layout (tokens, positions, attention, which logits predict which token), and packed
log-probs equal to each sequence run alone, unpadded (sdpa and eager attention, right- and left-padded batches)."""

import pytest
import torch

from lm.hf import load_causal_lm
from lm.packing import pack_pairs, packed_pair_logps, supports_packed_pairs
from tiny_models import TINY

# (prompt, chosen response, rejected response): prompts and responses of different lengths
PAIRS = [([5, 6, 9, 12, 7], [7, 3], [8, 9, 4, 4]), ([4], [3, 2, 2, 8, 1], [1]), ([10, 11, 3], [2], [6, 6])]


def batch(pairs, left=False):
    """The 2B-row batch of the datamodules: chosen rows, then rejected rows; padding on the right (or left)."""
    seqs = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    masks = [[0] * len(p) + [1] * len(c) for p, c, _ in pairs] + [[0] * len(p) + [1] * len(r) for p, _, r in pairs]
    width = max(map(len, seqs))
    out = {k: torch.zeros(len(seqs), width, dtype=torch.long) for k in ("input_ids", "attention_mask", "response_mask")}
    for i, (s, m) in enumerate(zip(seqs, masks)):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        out["input_ids"][i, cols], out["attention_mask"][i, cols] = torch.tensor(s), 1
        out["response_mask"][i, cols] = torch.tensor(m)
    return out


def test_hand_built_layout():
    """Pair 0: x = [5, 6], y_w = [7], y_l = [8, 9]; pair 1: x = [4], y_w = [3, 2], y_l = [1]. Widths: prompt 2,
    chosen 2, rejected 2. Row 0 = [5 6 | 7 pad | 8 9], row 1 = [pad 4 | 3 2 | 1 pad]."""
    packed = pack_pairs(**batch([([5, 6], [7], [8, 9]), ([4], [3, 2], [1])]))
    assert packed.input_ids.tolist() == [[5, 6, 7, 0, 8, 9], [0, 4, 3, 2, 1, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 2, 3], [0, 0, 1, 2, 1, 0]]
    allowed_row0 = [[1, 0, 0, 0, 0, 0],   # x: causal
                    [1, 1, 0, 0, 0, 0],
                    [1, 1, 1, 0, 0, 0],   # y_w: x + itself
                    [0, 0, 0, 1, 0, 0],   # padding: itself only
                    [1, 1, 0, 0, 1, 0],   # y_l: x + itself, never y_w or padding
                    [1, 1, 0, 0, 1, 1]]
    allowed_row1 = [[1, 0, 0, 0, 0, 0],   # left padding: itself only
                    [0, 1, 0, 0, 0, 0],
                    [0, 1, 1, 0, 0, 0],
                    [0, 1, 1, 1, 0, 0],
                    [0, 1, 0, 0, 1, 0],
                    [0, 0, 0, 0, 0, 1]]
    assert packed.attention[:, 0].int().tolist() == [allowed_row0, allowed_row1]
    # predictors: 7 <- col 1; 8 <- col 1 (last prompt token, shared); 9 <- col 4; 3 <- col 1; 2 <- col 2; 1 <- col 1
    assert packed.predictor_mask.int().tolist() == [[0, 1, 0, 0, 1, 0], [0, 1, 1, 0, 0, 0]]
    kept = [(0, 1), (0, 4), (1, 1), (1, 2)]  # the kept logits, row-major
    got = sorted(zip(packed.sequence.tolist(), packed.targets.tolist(),
                     [kept[i] for i in packed.logits_rows.tolist()]))
    # sequences: 0, 1 = chosen of pairs 0, 1; 2, 3 = rejected
    assert got == [(0, 7, (0, 1)), (1, 2, (1, 2)), (1, 3, (1, 1)), (2, 8, (0, 1)), (2, 9, (0, 4)), (3, 1, (1, 1))]


def sharp_model(attn_implementation):
    """A 2-layer tiny Llama with weights scaled up so attention is far from uniform: a token that attends where it
    should not changes the log-probs by much more than the tolerance."""
    model = load_causal_lm(dict(TINY, num_hidden_layers=2), vocab_size=16, seed=0).eval()
    model.config._attn_implementation = attn_implementation
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(8)
    return model


def per_sequence_logps(model, pairs):
    """Each sequence alone (no padding, no packing): Σ over its response of log_softmax(logits)[next token]."""
    out = []
    for which in (1, 2):
        for pair in pairs:
            prompt, response = pair[0], pair[which]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([prompt + response])).logits[0].double(), -1)
            out.append(sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(response)))
    return torch.stack(out)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("left", [False, True])
def test_packed_logps_equal_each_sequence_alone(attn_implementation, left):
    model = sharp_model(attn_implementation)
    assert supports_packed_pairs(model)
    want = per_sequence_logps(model, PAIRS)
    assert want.std() > 1.0  # a model that tells the sequences apart
    with torch.no_grad():
        got = packed_pair_logps(model, **batch(PAIRS, left=left))
        normalized = packed_pair_logps(model, **batch(PAIRS, left=left), length_normalize=True)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    lengths = torch.tensor([len(c) for _, c, _ in PAIRS] + [len(r) for _, _, r in PAIRS], dtype=torch.float64)
    torch.testing.assert_close(normalized.double(), want / lengths, rtol=1e-5, atol=1e-5)


def test_only_hugging_face_models_with_a_mask_taking_attention_are_supported():
    class Plain(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids

    assert not supports_packed_pairs(Plain())
    assert not supports_packed_pairs(sharp_model("flash_attention_2"))


def test_a_response_token_with_nothing_before_it_is_refused():
    b = batch([([], [3, 4], [5])])
    with pytest.raises(ValueError, match="nothing predicts it"):
        pack_pairs(**b)
