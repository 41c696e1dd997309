"""FSDP2 sharding through ``ModelParallelStrategy`` on 2 CPU processes (gloo) vs one process, same seed/data.

All sharded runs happen in one 2-process launch (module fixture, tests/lit_modules/sharding_worker.py) to pay
the start-up once. Tolerances: losses 1e-5 absolute, weights 1e-5 absolute after 4 AdamW steps at lr 1e-2
(fp32; the sharded run reduce-scatters the gradient mean in a different summation order).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import sharding_worker as w  # noqa: E402

SCENARIOS = ["causal_lm", "causal_lm_pretrained", "resume", "dpo", "dpo_precompute", "minillm_kd", "qdpo",
             "qdpo_pairs", "causal_lm_bf16", "start_up_memory"]
TOL = 1e-5


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    w.write_pretrained(out)
    ranks = w.launch(out, SCENARIOS, timeout=400)
    return out, ranks, torch.load(out / "weights.pt")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    w.write_pretrained(out)
    return {kind: w.fit(kind, False, out) for kind in ("causal_lm", "causal_lm_pretrained", "dpo", "minillm_kd")}


def rank_mean_losses(ranks, kind):
    """The global-batch loss of each step: the mean of the two ranks' (equal token/pair counts per rank)."""
    return [sum(r[kind]["losses"][i] for r in ranks) / len(ranks) for i in range(w.STEPS)]


@pytest.mark.parametrize("kind", ["causal_lm", "dpo", "minillm_kd"])
def test_sharded_matches_single_process(sharded, single, kind):
    _, ranks, weights = sharded
    assert rank_mean_losses(ranks, kind) == pytest.approx(single[kind]["losses"], abs=TOL)
    ref = single[kind]["weights"]
    assert set(weights[kind]) == set(ref)
    for name, value in ref.items():
        assert torch.allclose(weights[kind][name], value, atol=TOL, rtol=0), name
    # the weights moved: the comparison is not between two untouched initialisations
    init = w.build(kind)[0]
    init.configure_model()
    net = init.model if kind != "dpo" else init.policy
    moved = max(float((net.state_dict()[n] - v).abs().max()) for n, v in ref.items())
    assert moved > 100 * TOL


@pytest.mark.parametrize("kind", ["causal_lm", "dpo", "minillm_kd"])
def test_each_rank_holds_half(sharded, single, kind):
    """Local shard bytes of parameters, gradients, optimizer state (and the frozen model) ≈ total / 2."""
    _, ranks, _ = sharded
    whole = single[kind]["memory"]
    for key, total in whole.items():
        per_rank = [r[kind]["memory"][key] for r in ranks]
        assert sum(per_rank) == total, key  # dim-0 shards: the pieces add up to the whole tensor
        if total:
            for b in per_rank:  # uneven rows (vocabulary 259) make the split differ from 1/2 by < 1 %
                assert abs(b / total - 0.5) < 0.01, (key, per_rank, total)
    if kind != "causal_lm":
        assert whole["frozen_params"] > 0  # teacher / reference are sharded too


def test_sharded_run_from_a_pretrained_directory_with_tied_embeddings_matches_single_process(sharded, single):
    """Rank 0 reads the directory and sends the shards; the other rank builds the architecture from its config
    alone (meta device). Losses and weights as in one process; the tie survives (one gathered tensor)."""
    from transformers import AutoModelForCausalLM

    out, ranks, weights = sharded
    kind = "causal_lm_pretrained"
    assert rank_mean_losses(ranks, kind) == pytest.approx(single[kind]["losses"], abs=TOL)
    for name, value in single[kind]["weights"].items():
        assert torch.allclose(weights[kind][name], value, atol=TOL, rtol=0), name
    trained = weights[kind]
    assert torch.equal(trained["lm_head.weight"], trained["model.embed_tokens.weight"])  # still tied
    loaded = AutoModelForCausalLM.from_pretrained(out / "pretrained").state_dict()
    assert max(float((trained[n] - loaded[n]).abs().max()) for n in trained) > 100 * TOL  # it trained


def test_dpo_precomputed_reference_under_sharding_matches_single_process(sharded, single):
    """The reference log-probs precomputed by a whole temporary reference on each rank (an FSDP2 policy cannot be
    deep-copied, so it is rebuilt) give the losses and weights of the single process with a live reference."""
    _, ranks, weights = sharded
    assert rank_mean_losses(ranks, "dpo_precompute") == pytest.approx(single["dpo"]["losses"], abs=TOL)
    for name, value in single["dpo"]["weights"].items():
        assert torch.allclose(weights["dpo_precompute"][name], value, atol=TOL, rtol=0), name


def test_resume_after_checkpoint_gives_same_weights(sharded):
    _, ranks, weights = sharded
    assert all(r["resume"]["is_dir"] for r in ranks)  # a distributed checkpoint: one file per rank
    for r in ranks:
        assert r["resume"]["losses"] == pytest.approx(r["resume"]["uninterrupted_losses"][2:], abs=TOL)
    final, step2 = weights["resume_uninterrupted_weights"], weights["resume_interrupted_weights"]
    for name, value in final.items():
        assert torch.allclose(weights["resume"][name], value, atol=TOL, rtol=0), name
    assert max(float((final[n] - step2[n]).abs().max()) for n in final) > 100 * TOL  # steps 3-4 did train


def test_export_from_sharded_run_loads_with_transformers(sharded):
    from transformers import AutoModelForCausalLM

    out, _, weights = sharded
    model = AutoModelForCausalLM.from_pretrained(out / "causal_lm_export")
    state = model.state_dict()
    for name, value in weights["causal_lm"].items():
        assert torch.equal(state[name], value), name
    ids = w.token_rows(2)
    reference = w.build("causal_lm")[0]
    reference.configure_model()
    reference = reference.model
    reference.load_state_dict(weights["causal_lm"])
    assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-6)


def test_bf16_mixed_precision_with_activation_checkpointing_trains(sharded, single):
    """bf16 params/compute, fp32 reduce: losses within bf16 rounding of the fp32 run, fp32 master weights."""
    _, ranks, weights = sharded
    fp32 = single["causal_lm"]["losses"]
    bf16 = rank_mean_losses(ranks, "causal_lm_bf16")
    assert bf16 == pytest.approx(fp32, abs=0.05)
    assert bf16 != pytest.approx(fp32, abs=1e-6)  # the policy is in effect: the compute is not fp32
    assert all(v.dtype == torch.float32 for v in weights["causal_lm_bf16"].values())


def test_minillm_rollout_on_sharded_models(sharded):
    _, ranks, _ = sharded
    for r in ranks:
        batch, length = r["rollout"]["response_shape"]
        assert batch == 2 and 1 <= length <= 5


def test_qdpo_refuses_sharding_with_one_clear_message(sharded):
    _, ranks, _ = sharded
    for r in ranks:
        assert r["qdpo"]["error"].startswith("ValueError: QDPO does not support ModelParallelStrategy")
        assert "trainer.strategy: ddp" in r["qdpo"]["error"]


def test_qdpo_refuses_sharding_before_generating_any_pair(sharded):
    """With its pair datamodule, which reads the models before the trainer's configure_model: the same one error
    on every rank, and no pair generation has run (the error is at start-up, not after the pairs)."""
    _, ranks, _ = sharded
    for r in ranks:
        assert r["qdpo_pairs"]["error"] == r["qdpo"]["error"]
        assert r["qdpo_pairs"]["generate_answers_calls"] == 0


def test_no_rank_but_0_holds_the_whole_model_at_start_up(sharded):
    """Peak resident memory a rank adds from just before a 218 MB (fp32) CausalLM is constructed until fit starts.
    Rank 1 builds on the meta device and only ever allocates its half (109 MB), the all-gather of one decoder
    layer (14 MB, once) and one tensor of rank 0's weights at a time, plus the trainer's own start-up: under
    0.85 of the whole model. Built whole on every rank (in __init__), it would add at least the whole model.
    Rank 0 loads the whole model to send it: it adds at least that much."""
    _, ranks, _ = sharded
    rank0, rank1 = (r["start_up_memory"] for r in ranks)
    whole = rank1["whole_bytes"]
    assert whole > 200e6
    assert 0.5 * whole < rank1["peak_growth_bytes"] < 0.85 * whole
    assert rank0["peak_growth_bytes"] > whole


def test_single_device_and_ddp_paths_do_not_shard():
    from torch.distributed.fsdp import FSDPModule

    module = w.build("causal_lm")[0]
    module.configure_model()  # no trainer: nothing to shard
    assert not any(isinstance(m, FSDPModule) for m in module.modules())


@pytest.mark.parametrize("kind", ["causal_lm", "dpo", "minillm_kd"])
def test_networks_are_built_by_configure_model_once(kind, tmp_path):
    """The constructor declares every network on the meta device (architecture, no memory); configure_model
    materialises them, and again is a no-op (Lightning calls it at every fit/validate and in
    load_from_checkpoint); a checkpoint loads into the materialised networks. Using a declared network is one
    clear error naming configure_model."""
    module = w.build(kind)[0]
    names = module.trainable_networks + module.frozen_networks
    declared = {n: getattr(module, n) for n in names}
    assert all(isinstance(net, torch.nn.Module) for net in declared.values())
    assert all(p.is_meta for net in declared.values() for p in net.parameters())
    assert not module.networks_materialized
    with pytest.raises(RuntimeError, match=r"call module.configure_model\(\) first"):
        getattr(module, names[0])(torch.zeros(1, 3, dtype=torch.long))
    module.configure_model()
    networks = {n: getattr(module, n) for n in names}
    assert module.networks_materialized and not any(p.is_meta for net in networks.values() for p in net.parameters())
    module.configure_model()
    assert all(module.__dict__["_modules"].get(n) is net for n, net in networks.items())
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, w.Data(w.build(kind)[1](2)))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    restored = type(module).load_from_checkpoint(tmp_path / "m.ckpt")
    name = module.trainable_networks[0]
    for key, value in getattr(module, name).state_dict().items():
        assert torch.equal(getattr(restored, name).state_dict()[key], value), key


@pytest.mark.parametrize("name", ["sharding_memory", "sharding_memory_glibc_default",
                                  "sharding_memory_before_configure_model"])
def test_docs_memory_tables_are_generated_from_the_committed_json(name):
    import json

    from benchmarks.speed.sharding_memory import markers, render_table

    report = json.loads((w.ROOT / "docs" / "results" / f"{name}.json").read_text())
    doc = (w.ROOT / "docs" / "sharding.md").read_text()
    begin, end = markers(name)
    assert doc.split(begin, 1)[1].split(end, 1)[0].strip() == render_table(report)
    # the measured claim: each of 2 ranks holds half of the single process's bytes of every kind of tensor, and
    # all of the frozen reference when it is kept whole
    for run in ("causal_lm/sharded", "dpo/sharded", "dpo/sharded_whole_reference"):
        for share in report["results"][run]["share_of_single"]:
            for key, value in share.items():
                expected = 1.0 if run.endswith("whole_reference") and key == "frozen_params" else 0.5
                assert value is None or abs(value - expected) < 0.01, (run, key, value)


def test_truncate_at_eos_hand_case():
    from lm.sampling import Rollout
    from lm.sharding import truncate_at_eos

    ids = torch.tensor([[5, 1, 7, 1], [5, 6, 1, 8], [1, 2, 3, 4]])
    lp = torch.arange(12.0).reshape(3, 4)
    out = truncate_at_eos(Rollout(ids[:, :1], torch.ones(3, 1), ids, torch.ones_like(ids), lp, None, lp), 1, 0)
    # row 0 ends at t=1, row 1 at t=2, row 2 at t=0: mask keeps the EOS, the last EOS is at t=2 → 3 columns
    assert out.response_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
    assert out.response_ids.tolist() == [[5, 1, 0], [5, 6, 1], [1, 0, 0]]
    assert out.student_logprobs.tolist() == lp[:, :3].tolist() and out.teacher_logprobs is None


def test_fixed_length_sampling_cut_at_eos_equals_early_stopping():
    """What MiniLLM does under sharding (static caches, max_new_tokens steps, then cut) keeps the tokens and
    log-probs the EOS-stopping sampler draws with the same generator."""
    from lm.hf import load_causal_lm
    from lm.sampling import sample_mixed
    from lm.sharding import truncate_at_eos

    small = {"vocab_size": 6, "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
             "num_key_value_heads": 2}
    student, teacher = load_causal_lm(small, seed=0), load_causal_lm(small | {"hidden_size": 24}, seed=1)
    prompts = torch.randint(2, 6, (6, 3), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompts)
    kw = dict(alpha=0.3, pad_id=0, cache="static")
    stop = sample_mixed(student, teacher, prompts, mask, 12, eos_id=1, generator=torch.Generator().manual_seed(3),
                        **kw)
    fixed = sample_mixed(student, teacher, prompts, mask, 12, eos_id=None,
                         generator=torch.Generator().manual_seed(3), **kw)
    cut = truncate_at_eos(fixed, 1, 0)
    assert 0 < stop.response_mask.sum() < stop.response_mask.numel()  # some rows ended early, some did not
    assert torch.equal(cut.response_ids, stop.response_ids) and torch.equal(cut.response_mask, stop.response_mask)
    m = stop.response_mask.bool()
    for name in ("student_logprobs", "teacher_logprobs", "mix_logprobs"):
        assert torch.allclose(getattr(cut, name)[m], getattr(stop, name)[m], atol=1e-6), name
