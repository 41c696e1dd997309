"""DPO module: response-only log-probs (hand-computed), the frozen reference, precomputed reference log-probs
and their cache, a toy run that raises chosen and lowers rejected, and the shipped configs through the CLI."""

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from cli import build_cli
from datamodules import PreferenceDataModule
from lit_modules import DPO, CausalLM
from lit_modules.dpo import response_logits_to_keep, sequence_logps
from tiny_models import TINY, materialized

# the real-model config needs the SmolLM2 weights (`make real`): its run is the slow test in test_claim_real.py
CONFIGS = sorted(c for c in (Path(__file__).resolve().parents[2] / "configs" / "dpo").glob("*.yaml")
                 if not c.name.startswith("smollm2"))
PAIRS = [{"prompt": "ab", "chosen": "c", "rejected": "de"}, {"prompt": "abcd", "chosen": "xyz", "rejected": "w"}]


def hand_batch():
    """Vocab 3, T = 4. Row 0: prompt [2, 1], response [0, 2]; row 1: prompt [2], response [0, 1], then padding."""
    ln2, ln3 = math.log(2), math.log(3)
    logits = torch.tensor([[[0.0, ln2, 0.0],    # predicts x1 (prompt): p = [1/4, 1/2, 1/4]
                            [ln3, 0.0, 0.0],    # predicts x2 = 0:       p = [3/5, 1/5, 1/5]
                            [0.0, 0.0, 0.0],    # predicts x3 = 2:       p = 1/3
                            [9.0, -9.0, 5.0]],  # after the last token: unused
                           [[0.0, ln2, 0.0],    # predicts x1 = 0: 1/4
                            [ln3, 0.0, 0.0],    # predicts x2 = 1: 1/5
                            [7.0, 1.0, 3.0],    # predicts the pad: unused
                            [1.0, 2.0, 3.0]]], dtype=torch.float64)
    input_ids = torch.tensor([[2, 1, 0, 2], [2, 0, 1, 0]])
    response_mask = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 0]])
    return logits, input_ids, response_mask


def test_sequence_logps_hand_computed():
    logits, ids, mask = hand_batch()
    expected = [math.log(3 / 5) + math.log(1 / 3), math.log(1 / 4) + math.log(1 / 5)]
    assert sequence_logps(logits, ids, mask).tolist() == pytest.approx(expected, rel=1e-12)
    assert sequence_logps(logits, ids, mask, length_normalize=True).tolist() == pytest.approx(
        [e / 2 for e in expected], rel=1e-12)
    # prompt tokens and the padded position do not count: changing them changes nothing
    ids2 = ids.clone()
    ids2[0, 1], ids2[1, 3] = 0, 2
    assert sequence_logps(logits, ids2, mask).tolist() == pytest.approx(expected, rel=1e-12)


def test_sequence_logps_on_last_k_logits():
    logits, ids, mask = hand_batch()
    assert response_logits_to_keep(mask) == 4
    row0 = (logits[:1, 1:], ids[:1], mask[:1])  # row 0's response starts at position 2: K = 3 suffices
    assert response_logits_to_keep(mask[:1]) == 3
    assert sequence_logps(*row0).item() == pytest.approx(math.log(3 / 5) + math.log(1 / 3), rel=1e-12)
    with pytest.raises(ValueError, match="response tokens start earlier"):
        sequence_logps(logits[:1, 2:], ids[:1], mask[:1])


def make_batch(pairs=PAIRS):
    dm = PreferenceDataModule.from_records(pairs, val_fraction=0.0, batch_size=len(pairs))
    dm.setup("fit")
    return dm, next(iter(dm.all_dataloader()))


def test_module_logps_match_unpadded_per_sequence_computation():
    module = DPO(model=TINY, init_seed=3)
    module.configure_model()
    _, batch = make_batch()
    chosen, rejected = module.concatenated_logps(module.policy, batch)
    tok = lambda s: [b + 3 for b in s.encode()]  # noqa: E731
    for i, pair in enumerate(PAIRS):
        for got, answer in ((chosen[i], pair["chosen"]), (rejected[i], pair["rejected"])):
            prompt, response = tok(pair["prompt"]), tok(answer) + [1]
            ids = torch.tensor([prompt + response])
            with torch.no_grad():
                logp = torch.log_softmax(module.policy(ids).logits[0].double(), -1)
            want = sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(response))
            assert got.item() == pytest.approx(want, abs=1e-4)


def test_reference_is_frozen_copy_loss_starts_at_log2_and_only_policy_trains():
    module = DPO(model=TINY, loss="sigmoid", beta=0.1)
    module.configure_model()
    _, batch = make_batch()
    loss, metrics = module.compute_loss(batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["reward_margin"].item() == pytest.approx(0.0, abs=1e-7)
    names = {n for n, _ in module.trainable_parameters()}
    assert names and all(n.startswith("policy.") for n in names)
    ref_before = [p.clone() for p in module.ref_model.parameters()]
    module.train()
    assert not module.ref_model.training
    opt = torch.optim.SGD([p for _, p in module.trainable_parameters()], lr=0.1)
    module.compute_loss(batch)[0].backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ref_before, module.ref_model.parameters()))
    assert module.compute_loss(batch)[0].item() < math.log(2)


@pytest.mark.parametrize("loss", ["sigmoid", "hinge", "ipo"])
def test_toy_training_raises_chosen_lowers_rejected(loss):
    torch.manual_seed(0)
    module = DPO(model=TINY, loss=loss, beta=0.1, init_seed=1)
    module.configure_model()
    _, batch = make_batch()
    opt = torch.optim.Adam([p for _, p in module.trainable_parameters()], lr=3e-3)
    for _ in range(5):
        opt.zero_grad()
        module.compute_loss(batch)[0].backward()
        opt.step()
    _, metrics = module.compute_loss(batch)
    assert metrics["reward_chosen"] > 0 > metrics["reward_rejected"]
    assert metrics["reward_accuracy"] == 1.0


def test_bad_loss_or_kwargs_fail_at_construction():
    with pytest.raises(ValueError, match="unknown preference loss"):
        DPO(model=TINY, loss="dpoo")
    with pytest.raises(TypeError, match="does not accept"):
        DPO(model=TINY, loss="hinge", loss_kwargs={"tau": 0.05})


def test_reference_from_path(tmp_path):
    sft = CausalLM(model=TINY, init_seed=5)
    sft.configure_model()
    sft.export(tmp_path / "sft")
    module = DPO(model=str(tmp_path / "sft"), ref_model=str(tmp_path / "sft"))
    module.configure_model()
    _, batch = make_batch()
    assert module.compute_loss(batch)[0].item() == pytest.approx(math.log(2), abs=1e-6)


def fit(module, dm, steps=2):
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    return trainer


def test_precomputed_reference_matches_live_reference_and_is_cached(tmp_path, monkeypatch):
    dm = PreferenceDataModule(num_examples=24, batch_size=4, val_fraction=0.25)
    module = DPO(model=TINY, init_seed=2, precompute_ref_logps=True, ref_cache_dir=str(tmp_path / "c"))
    module.configure_model()
    assert module.ref_model is None
    live = DPO(model=TINY, init_seed=2)  # same initial policy, reference kept in memory
    live.configure_model()
    fit(module, dm)
    assert module.ref_model is None
    table = module.ref_logps_table
    assert table.shape == (24, 2) and not torch.isnan(table).any()
    batch = next(iter(dm.all_dataloader()))
    chosen, rejected = live.reference_logps(batch)
    assert torch.allclose(table[batch["index"]], torch.stack([chosen, rejected], 1), atol=1e-5)
    assert len(list((tmp_path / "c").glob("*.pt"))) == 1

    again = DPO(model=TINY, init_seed=2, precompute_ref_logps=True, ref_cache_dir=str(tmp_path / "c"))
    again.configure_model()
    monkeypatch.setattr(DPO, "compute_ref_logps_table", lambda *a: pytest.fail("cache not used"))
    fit(again, PreferenceDataModule(num_examples=24, batch_size=4, val_fraction=0.25), steps=1)
    assert torch.equal(again.ref_logps_table, table)
    other = DPO(model=TINY, init_seed=9, precompute_ref_logps=True, ref_cache_dir=str(tmp_path / "c"))
    other.configure_model()
    with pytest.raises(pytest.fail.Exception, match="cache not used"):  # other weights -> other key
        fit(other, PreferenceDataModule(num_examples=24, batch_size=4, val_fraction=0.25), steps=1)
    # the eager path's log-probs differ from the packed path's in the last bits: each has its own table, so a run
    # computes the same numbers whichever path filled the cache first
    eager = DPO(model=TINY, init_seed=2, precompute_ref_logps=True, ref_cache_dir=str(tmp_path / "c"), packed=False)
    eager.configure_model()
    with pytest.raises(pytest.fail.Exception, match="cache not used"):
        fit(eager, PreferenceDataModule(num_examples=24, batch_size=4, val_fraction=0.25), steps=1)


def test_reference_logps_supplied_by_the_batch():
    module = DPO(model=TINY)
    module.configure_model()
    _, batch = make_batch()
    batch["ref_chosen_logps"] = torch.tensor([-1.0, -2.0])
    batch["ref_rejected_logps"] = torch.tensor([-3.0, -4.0])
    chosen, rejected = module.reference_logps(batch)
    assert chosen.tolist() == [-1.0, -2.0] and rejected.tolist() == [-3.0, -4.0]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_runs_two_steps(config):
    assert {"dpo.yaml", "discopop.yaml"} <= {c.name for c in CONFIGS}
    parsed = build_cli(["--config", str(config)], run=False)
    assert isinstance(parsed.model, DPO) and isinstance(parsed.datamodule, PreferenceDataModule)
    cli = build_cli(["fit", "--config", str(config), "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
                     "--trainer.val_check_interval", "2", "--data.num_examples", "64",
                     "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]"])
    assert cli.trainer.global_step == 2
    metrics = cli.trainer.callback_metrics
    assert {"train/loss", "train/reward_accuracy", "val/loss", "val/reward_margin"} <= set(metrics)
    assert all(torch.isfinite(v) for v in metrics.values())


def test_custom_loss_by_module_path_with_kwargs(tmp_path, monkeypatch):
    (tmp_path / "my_dpo_losses.py").write_text(
        "import torch.nn.functional as F\n\n"
        "def shifted(pc, pr, rc, rr, beta=0.1, gamma=0.0):\n"
        "    return -F.logsigmoid(beta * ((pc - pr) - (rc - rr)) - gamma)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = DPO(model=TINY, loss="my_dpo_losses:shifted", loss_kwargs={"gamma": 0.3})
    module.configure_model()
    _, batch = make_batch()
    loss, _ = module.compute_loss(batch)  # policy = reference: z = 0, loss = −log σ(−0.3)
    assert loss.item() == pytest.approx(math.log1p(math.exp(0.3)), abs=1e-6)


def test_validate_alone_precomputes_reference(tmp_path):
    module = DPO(model=TINY, precompute_ref_logps=True, ref_cache_dir=str(tmp_path))
    module.configure_model()
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(module, datamodule=PreferenceDataModule(num_examples=20, val_fraction=0.5),
                               verbose=False)[0]
    assert metrics["val/loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference
    assert metrics["val/reward_margin"] == pytest.approx(0.0, abs=1e-5)


def test_left_padded_batches_keep_their_mask_and_give_the_same_logps():
    from lit_modules.dpo import is_right_padded

    module = DPO(model=TINY, init_seed=4)
    module.configure_model()
    _, batch = make_batch()
    assert is_right_padded(batch["attention_mask"])
    right = torch.cat(module.concatenated_logps(module.policy, batch))
    # the same sequences, left-padded: shift each row's real tokens to the end
    left = {k: torch.zeros_like(v) for k, v in batch.items() if k != "index"}
    for row in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][row].sum())
        for key in left:
            left[key][row, -n:] = batch[key][row, :n]
    assert not is_right_padded(left["attention_mask"])
    got = torch.cat(module.concatenated_logps(module.policy, left))
    assert torch.allclose(got, right, atol=1e-4)


def test_ipo_uses_per_token_mean_logps_by_default_summed_as_option():
    """Hand-computed: with ``hand_batch`` as the policy's logits (pair = row 0 chosen, row 1 rejected) the summed
    log-probs are ln(3/5)+ln(1/3) = ln(1/5) and ln(1/4)+ln(1/5) = ln(1/20), both over 2 response tokens, so
    ρ_sum = ln 4 and ρ_mean = ln 2 (reference log-probs 0 from the batch). IPO at β = 0.5: (ρ − 1)²."""
    logits, ids, mask = hand_batch()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": mask,
             "ref_chosen_logps": torch.zeros(1, dtype=torch.float64),
             "ref_rejected_logps": torch.zeros(1, dtype=torch.float64)}
    expected = {None: (math.log(2) - 1) ** 2, True: (math.log(2) - 1) ** 2, False: (math.log(4) - 1) ** 2}
    for length_normalize, want in expected.items():
        module = DPO(model=TINY, loss="ipo", beta=0.5, length_normalize=length_normalize, packed=False)
        module.configure_model()
        module.forward_logits = lambda model, batch: logits
        assert module.compute_loss(batch)[0].item() == pytest.approx(want, rel=1e-12)
    assert DPO(model=TINY, loss="sigmoid").length_normalize is False  # other losses keep summed log-probs


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])  # ipo: per-token mean log-probs
def test_packed_step_has_the_eager_losses_metrics_and_gradients(loss):
    """One pair per row behind a shared prompt (``packed=True``) vs the padded 2B-row forward: the same loss, metrics
    and parameter gradients (≤ 1e-4 relative, fp32) for a policy moved away from the reference."""
    pairs = PAIRS + [{"prompt": "hello", "chosen": "a", "rejected": "bcdefg"}]
    modules = [materialized(DPO(model=dict(TINY, num_hidden_layers=2), loss=loss, init_seed=5, packed=packed))
               for packed in (True, False)]
    with torch.no_grad():
        for p in modules[0].policy.parameters():
            p.mul_(4)
    modules[1].policy.load_state_dict(modules[0].policy.state_dict())
    _, batch = make_batch(pairs)
    results = []
    for module in modules:
        loss_value, metrics = module.compute_loss(batch)
        loss_value.backward()
        results.append((loss_value, metrics, [p.grad for p in module.policy.parameters()]))
    (fast, fast_metrics, fast_grads), (eager, eager_metrics, eager_grads) = results
    assert abs(eager.item() - math.log(2)) > 1e-3  # the policy differs from the reference
    torch.testing.assert_close(fast, eager, rtol=1e-4, atol=0)
    for key in eager_metrics:
        torch.testing.assert_close(fast_metrics[key], eager_metrics[key], rtol=1e-4, atol=1e-6)
    for got, want in zip(fast_grads, eager_grads, strict=True):
        assert ((got - want).norm() / want.norm()).item() <= 1e-4
