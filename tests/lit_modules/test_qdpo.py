"""QDPO module (policy = fake-quantized copy, reference = initial quantized model, real-quantized export), its
evaluation metrics against the full-precision model, and the shipped config through the real CLI."""

from pathlib import Path

import pytest
import torch
import yaml

from callbacks.quantization_eval import evaluate_against_full_precision, heldout_text, perplexity, token_flip_stats
from cli import build_cli
from datamodules.instruction import load_instruction_records
from lit_modules import QDPO
from lm.hf import load_causal_lm
from lm.quantization import QuantizerConfig, quantize, quantize_rtn
from lm.tokenizers import byte_tokenizer, resolve_prompt_template
from tiny_models import TINY, materialized



def test_token_flip_stats_hand_computed():
    # Position 0: FP prefers token 0 by log 2 (probs 2/3, 1/3); quantized prefers token 1 -> a flip.
    # Position 1: both prefer token 1.
    fp = torch.log(torch.tensor([[2.0, 1.0, 1e-9], [1.0, 3.0, 1e-9]]))
    q = torch.log(torch.tensor([[1.0, 3.0, 1e-9], [1.0, 4.0, 1e-9]]))
    s = token_flip_stats(fp, q)
    assert s["flipped"].tolist() == [True, False]
    assert torch.allclose(s["fp_margin"], torch.log(torch.tensor([2.0, 3.0])), atol=1e-5)
    # quantized margin of FP's top-1 token: log(1/3) at position 0, log(4/1) at position 1
    assert torch.allclose(s["quant_margin"], torch.log(torch.tensor([1 / 3, 4.0])), atol=1e-5)


def test_policy_starts_as_rtn_and_only_it_trains():
    module = QDPO(model=TINY, bits=4, group_size=16)
    module.configure_model()
    ids = torch.randint(3, 259, (2, 10))
    with torch.no_grad():
        rtn = quantize_rtn(module.full_precision, bits=4, group_size=16)
        assert torch.equal(module.policy.eval()(ids).logits, rtn(ids).logits)
    assert not any(p.requires_grad for p in module.full_precision.parameters())
    trainable = {id(p) for _, p in module.trainable_parameters()}
    quantized = [m.weight for m in module.policy.modules() if type(m).__name__ == "FakeQuantizedLinear"]
    assert len(quantized) == 7 and trainable == {id(p) for p in quantized}  # q,k,v,o,gate,up,down; not lm_head
    everything = QDPO(model=TINY, bits=4, group_size=16, train_quantized_only=False)
    everything.configure_model()
    assert {id(p) for _, p in everything.trainable_parameters()} == {id(p) for p in everything.policy.parameters()}
    assert module.ref_model is None and module.precompute_ref_logps  # reference = precomputed initial policy


def test_evaluating_the_full_precision_model_against_itself():
    tok = byte_tokenizer()
    fp = load_causal_lm(TINY, vocab_size=len(tok), seed=0)
    records = load_instruction_records(None, 6, seed=3, require_response=False)
    m = evaluate_against_full_precision(fp, fp, tok, records, max_new_tokens=4, batch_size=4)
    assert m["flip_rate"] == 0.0 and m["same_answer"] == 1.0 and m["fp_margin_at_flips"] is None
    assert m["quant_margin"] == pytest.approx(m["fp_margin"])
    assert m["fp_loglik"] < 0 and 0.0 <= m["check_score"] <= 1.0 and m["num_prompts"] == 6


def test_bad_arguments_are_clear(tmp_path):
    with pytest.raises(ValueError, match="group_size=48 does not divide the input width 32"):
        QDPO(model=TINY, bits=4, group_size=48)
    with pytest.raises(ValueError, match="bits=12 is not supported"):
        QDPO(model=TINY, bits=12)
    with pytest.raises(FileNotFoundError, match="configs/minillm/teacher_sft.yaml"):
        QDPO(model=str(tmp_path / "missing_export"))


@pytest.mark.parametrize("kwargs,message", [
    ({"quantizer": "gguf"}, "quantizer name 'gguf' is unknown"),
    ({"quantizer": "hqq", "bits": 1}, "quantizer bits=1 is not supported by 'hqq'"),
    ({"group_size": 0}, "quantizer group_size must be an integer >= 2"),
    ({"quantizer": "gptq", "quantizer_options": {"calibration_prompts": 8}}, "quantizer_options has unknown key"),
    ({"train_scales": True}, "train_scales=True needs a fixed-grid quantizer .* 'rtn' recomputes its scales"),
])
def test_bad_quantizer_options_fail_before_any_model_is_loaded(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):  # not the FileNotFoundError of the missing model
        QDPO(model=str(tmp_path / "missing_export"), **kwargs)


@pytest.mark.parametrize("name", ["hqq", "gptq", "awq"])
def test_policy_starts_as_the_quantizers_ptq_model_and_exports_it(name, tmp_path):
    module = materialized(QDPO(model=TINY, quantizer=name, bits=3, group_size=16,
                               quantizer_options={"calibration_size": 4}))
    config = QuantizerConfig(name, 3, 16, calibration_size=4)
    assert module.quantizer == config and len(module.calibration_prompts()) == (4 if config.calibrated else 0)
    ids = torch.randint(3, 259, (2, 10))
    ptq = quantize(module.full_precision, config, module.calibration_ids(module.full_precision))
    with torch.no_grad():
        policy = module.policy.eval()(ids).logits
        assert torch.equal(policy, ptq(ids).logits)
        assert torch.equal(module.quantized_model()(ids).logits, policy)
        assert torch.equal(load_causal_lm(str(module.export(tmp_path / name)))(ids).logits, policy)


def _tiny_fp_export(path: Path) -> str:
    tok = byte_tokenizer()
    load_causal_lm({}, vocab_size=len(tok), seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_int4_config_parses(root, capsys):
    with pytest.raises(SystemExit) as e:
        build_cli(["fit", "--config", str(root / "configs/qdpo/int4.yaml"), "--print_config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "lit_modules.QDPO"
    assert printed["data"]["class_path"] == "datamodules.QDPOPairsDataModule"


def test_int4_config_missing_fp_model_says_what_to_run(root):
    # jsonargparse re-raises instantiation errors as ValueError, keeping QDPO's message
    with pytest.raises((FileNotFoundError, ValueError), match="litpapers fit --config configs/minillm/teacher_sft"):
        build_cli(["--config", str(root / "configs/qdpo/int4.yaml"), "--model.model", "./no_such_dir"],
                  run=False)


@pytest.mark.parametrize("quantizer", ["rtn", "awq"])
def test_int4_config_runs_end_to_end(quantizer, root, tmp_path):
    fp_dir = _tiny_fp_export(tmp_path / "fp")
    small = tmp_path / "small.yaml"
    small.write_text("trainer:\n  callbacks:\n    - class_path: callbacks.QuantizationEval\n"
                     "      init_args: {num_prompts: 24, max_new_tokens: 6, perplexity_text: tasks}\n")
    cli = build_cli(["fit", "--config", str(root / "configs/qdpo/int4.yaml"), "--config", str(small),
                     "--model.model", fp_dir, "--model.export_dir", "exported", "--trainer.max_steps", "2",
                     "--trainer.val_check_interval", "2", "--trainer.enable_progress_bar", "false",
                     "--data.num_prompts", "40", "--data.max_new_tokens", "6", "--data.batch_size", "4",
                     "--model.quantizer", quantizer, "--model.quantizer_options", "{calibration_size: 8}"])
    assert cli.trainer.global_step == 2
    stages = [r["stage"] for r in cli.trainer.callbacks[0].results]
    assert stages[:2] == ["val/fp", "val/quant"] and stages[-1] == "val/quant_final"
    assert (Path(cli.trainer.log_dir) / "quantization_eval.json").exists()
    flip_curve = cli.trainer.callbacks[0].figure().axes[0].lines[0].get_ydata()
    assert list(flip_curve) == [r["flip_rate"] for r in cli.trainer.callbacks[0].results if r["stage"] == "val/quant"]
    assert cli.model.quantizer.name == quantizer
    loaded = load_causal_lm("exported")  # real int4 weights, loadable with torchao installed
    assert type(loaded.model.layers[0].mlp.down_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    ids = torch.randint(3, 259, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, cli.model.policy.eval()(ids).logits)  # the trained model, exactly
    # perplexity of held-out task text, logged at every stage: the final one is the exported model's
    texts = heldout_text("tasks", resolve_prompt_template(byte_tokenizer()))
    results = cli.trainer.callbacks[0].results
    assert results[-1]["perplexity"] == pytest.approx(perplexity(loaded, byte_tokenizer(), texts), rel=1e-5)
    assert all(r["perplexity"] > 1 for r in results)


def test_precomputed_reference_logps_are_the_rtn_models_live_logps(tmp_path):
    """QDPO's reference is the round-to-nearest model: each precomputed [chosen, rejected] log-prob equals
    Σ_t log p_RTN(y_t | x, y_<t) over the answer tokens (EOS included), computed here one unpadded pair at a time."""
    import lightning as L

    from datamodules.qdpo_pairs import QDPOPairsDataModule

    module = QDPO(model={}, bits=3, group_size=32, ref_cache_dir=str(tmp_path / "ref"))
    module.configure_model()
    dm = QDPOPairsDataModule(num_prompts=40, max_new_tokens=6, batch_size=4, val_fraction=0.25)
    L.Trainer(max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, dm)
    rtn = quantize_rtn(module.full_precision, bits=3, group_size=32).eval()
    assert len(dm.pairs) > 4
    for pair in dm.pairs:
        live = []
        for key in ("chosen_ids", "rejected_ids"):
            ids = torch.tensor([pair["prompt_ids"] + pair[key]])
            with torch.no_grad():
                logp = rtn(ids).logits[0].double().log_softmax(-1)
            start = len(pair["prompt_ids"])
            live.append(sum(float(logp[t - 1, ids[0, t]]) for t in range(start, ids.shape[1])))
        assert module.ref_logps_table[pair["index"]].tolist() == pytest.approx(live, abs=2e-4)


def test_trained_scales_are_trainable_and_exported(tmp_path):
    module = materialized(QDPO(model=TINY, quantizer="hqq", bits=3, group_size=16, train_scales=True))
    trainable = dict(module.trainable_parameters())
    assert sum(n.endswith(".scale") for n in trainable) == 7 and len(trainable) == 14
    ids = torch.randint(3, 259, (2, 10))
    opt = torch.optim.SGD(trainable.values(), lr=0.05)
    module.policy(ids, labels=ids).loss.backward()
    opt.step()
    start = quantize(module.full_precision, QuantizerConfig("hqq", 3, 16))
    with torch.no_grad():
        policy = module.policy.eval()(ids).logits
        assert not torch.equal(policy, start(ids).logits)
        assert torch.equal(load_causal_lm(str(module.export(tmp_path / "q")))(ids).logits, policy)
