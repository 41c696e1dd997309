"""benchmarks.speed.quantized_export on a tiny model: the JSON's fields, the exact export, and the weight bytes of the
quantized layers against a hand count of the export format (int8 code per weight, fp32 scale + int8 zero point per
group) and of fp32."""

import json

import pytest

pytest.importorskip("torchao")

# hidden 32, MLP 64, one decoder layer, untied lm_head (left in fp32)
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 2}


def test_quantized_export_tiny(tmp_path):
    from benchmarks.speed.quantized_export import DOC_BEGIN, DOC_END, main, update_docs

    out = tmp_path / "quantized_export.json"
    result = main(["--model", json.dumps(TINY), "--quantizers", "rtn,gptq", "--bits", "4", "--group-size", "32",
                   "--calibration-size", "2", "--batch", "2", "--prompt-tokens", "12", "--new-tokens", "3",
                   "--repeats", "3", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    for key in ("command", "date", "machine", "threads", "settings", "variants"):
        assert key in result
    assert result["threads"] == 1
    assert set(result["variants"]) == {"fp32", "rtn-int4-g32", "gptq-int4-g32"}

    # by hand: q/k/v/o 32x32, gate/up 64x32, down 32x64 -> 4*1024 + 2*2048 + 2048 weights; groups of 32 inputs:
    # one per row of q/k/v/o (4*32) and gate/up (2*64), two per row of down (32*2)
    weights = 4 * 32 * 32 + 2 * 64 * 32 + 32 * 64
    groups = 4 * 32 + 2 * 64 + 32 * 2
    assert (weights, groups) == (10240, 320)
    fp32_bytes = 4 * weights
    int4_bytes = 1 * weights + (4 + 1) * groups          # int8 codes + (fp32 scale, int8 zero point) per group
    fp = result["variants"]["fp32"]
    assert fp["quantized_layers_tensor_bytes"] == fp32_bytes
    for tag in ("rtn-int4-g32", "gptq-int4-g32"):
        row = result["variants"][tag]
        assert row["quantized_layers_tensor_bytes"] == int4_bytes
        assert row["quantized_layers_bytes_vs_fp"] == pytest.approx(11840 / 40960)  # ~3.46x smaller
        assert row["packed_ideal_quantized_layers_bytes"] == weights // 2 + 4 * groups
        # embeddings, norms and lm_head are fp32 in both files; the difference on disk is the layers' (± header)
        assert row["other_tensor_bytes"] == fp["other_tensor_bytes"]
        assert row["tensor_bytes"] == fp["tensor_bytes"] - (fp32_bytes - int4_bytes)
        assert row["disk_bytes"] < fp["disk_bytes"]
        assert row["reload_max_abs_logit_diff"] == 0.0
        assert len(row["decode_s"]) == len(row["prefill_s"]) == 3
        assert row["decode_tokens_per_s"] > 0 and row["decode_speed_vs_fp"] > 0
        assert 0.0 <= row["greedy_token_match_vs_fp"] <= 1.0
    assert fp["reload_max_abs_logit_diff"] == 0.0 and fp["decode_speed_vs_fp"] == 1.0

    doc = tmp_path / "doc.md"
    doc.write_text(f"before\n{DOC_BEGIN}\nold\n{DOC_END}\nafter\n")
    update_docs(out, doc)
    text = doc.read_text()
    assert "old" not in text and text.startswith("before\n") and text.endswith("after\n")
    assert "| rtn-int4-g32 |" in text and "one per byte" in text
