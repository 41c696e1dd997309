"""MiniLLM against the paper and LMOps ``minillm/``: which stream L_PT reads and how it is composed, the tempered
distribution used everywhere (PPO ratio exactly 1 on the first inner epoch), the importance weight's and the
whitening's effect on the loss (hand-computed), and resuming in the middle of a rollout's inner epochs."""

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from datamodules import InstructionDataModule
from lit_modules import MiniLLM
from lit_modules.minillm import gather_logprobs, minillm_loss, whiten
from lm.sampling import response_logits
from tiny_models import TINY, materialized

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "minillm"


def _module(**kw) -> MiniLLM:
    return materialized(MiniLLM(student=TINY, teacher=TINY | {"hidden_size": 48}, **({"max_new_tokens": 4} | kw)))


def _batch(pretrain: bool) -> dict:
    """A training batch of the built-in tasks (byte-level tokenizer, as the tiny modules'), with or without the
    built-in pretraining corpus's blocks."""
    data = InstructionDataModule(num_examples=16, num_val=4, batch_size=4, max_response_length=4, pretrain=pretrain,
                                 pretrain_block_size=16)
    data.setup("fit")
    torch.manual_seed(0)
    return next(iter(data.train_dataloader()))


def _step_stats(module: MiniLLM, batch: dict) -> tuple[torch.Tensor, dict]:
    """One ``training_step`` outside a Trainer; returns its loss and the stats it logs."""
    logged = {}
    module.log = lambda *a, **k: None
    module.log_dict = lambda d, **k: logged.update({key.removeprefix("train/"): v for key, v in d.items()})
    torch.manual_seed(0)
    return module.training_step(batch, 0), logged


def _ce_and_forward_kl(student, teacher, ids: torch.Tensor) -> tuple[float, float]:
    """Mean next-token cross-entropy of the student and mean KL(teacher ‖ student) over every position of ``ids``,
    written out with plain loops over the vocabulary (the reference for L_PT)."""
    with torch.no_grad():
        s, t = student(input_ids=ids).logits[:, :-1].double(), teacher(input_ids=ids).logits[:, :-1].double()
    ce = kl = 0.0
    n = 0
    for b in range(ids.shape[0]):
        for i in range(ids.shape[1] - 1):
            ls = s[b, i] - torch.logsumexp(s[b, i], 0)
            lt = t[b, i] - torch.logsumexp(t[b, i], 0)
            ce -= float(ls[ids[b, i + 1]])
            kl += float((lt.exp() * (lt - ls)).sum())
            n += 1
    return ce / n, kl / n


# ---------------------------------------------------------------------------------------------- §2: the PT stream
def test_pt_loss_reads_the_pretraining_stream_and_is_half_lm_half_kd():
    module = _module(lm_coef=0.7)
    batch = _batch(pretrain=True)
    loss, stats = _step_stats(module, batch)
    ce, kl = _ce_and_forward_kl(module.model, module.teacher, batch["pt_input_ids"])
    # LMOps losses.pt_loss: (1 − kd_ratio)·LM + kd_ratio·KD, kd_ratio 0.5, on the pretraining batch
    assert float(stats["pt_loss"]) == pytest.approx(0.5 * ce + 0.5 * kl, rel=1e-4)
    # LMOps trainer.train: loss = rl_loss + lm_coef·pt_loss
    assert float(loss) == pytest.approx(float(stats["rl_loss"]) + 0.7 * float(stats["pt_loss"]), rel=1e-6)
    sft_ce, _ = _ce_and_forward_kl(module.model, module.teacher, batch["input_ids"])
    assert abs(float(stats["pt_loss"]) - 0.5 * sft_ce) > 1e-3  # not the SFT batch


def test_without_a_pretraining_stream_the_pt_loss_is_an_error_unless_sft_is_asked_for():
    module = _module()
    batch = _batch(pretrain=False)
    with pytest.raises(ValueError, match="data.init_args.pretrain: true"):
        _step_stats(module, batch)
    # explicit pt_source: sft = the KD objective on the SFT batch; lm_coef 0 needs no stream at all
    sft = _module(pt_source="sft")
    _, stats = _step_stats(sft, batch)
    kd = _module(objective="kd")
    kd.model.load_state_dict(sft.model.state_dict())
    kd.teacher.load_state_dict(sft.teacher.state_dict())
    assert float(stats["pt_loss"]) == pytest.approx(float(_step_stats(kd, batch)[0]), rel=1e-6)
    _, stats = _step_stats(_module(lm_coef=0.0), batch)
    assert "pt_loss" not in stats
    with pytest.raises(ValueError, match="pt_source='owt'"):
        _module(pt_source="owt")


def test_minillm_configs_read_the_built_in_pretraining_corpus():
    base = yaml.safe_load((CONFIGS / "base.yaml").read_text())
    assert base["model"]["init_args"]["objective"] == "minillm"
    assert base["data"]["init_args"]["pretrain"] is True and base["model"]["init_args"]["pt_source"] == "pretrain"
    for row in CONFIGS.glob("*.yaml"):
        cfg = yaml.safe_load(row.read_text())
        if "class_path" in cfg.get("model", {}):
            continue  # a standalone config (teacher_sft, sft)
        args = base["model"]["init_args"] | cfg["model"]["init_args"]
        data = base["data"]["init_args"] | cfg.get("data", {}).get("init_args", {})
        if args["objective"] == "minillm" and args["lm_coef"] > 0:
            assert data["pretrain"] or args["pt_source"] == "sft", row.name
    assert yaml.safe_load((CONFIGS / "minillm_no_pt.yaml").read_text())["model"]["init_args"]["lm_coef"] == 0


# -------------------------------------------------------------------------------------------- §3: temperature
@pytest.mark.parametrize("alpha", [0.0, 0.2])
def test_ppo_ratio_is_exactly_one_on_the_first_inner_epoch_at_temperature_07(alpha):
    module = _module(temperature=0.7, teacher_mix_alpha=alpha, lm_coef=0.0)
    _, stats = _step_stats(module, _batch(pretrain=False))
    if alpha == 0:  # ρ ≡ 1: the surrogate is −mean(Â) = 0, the whitened advantages having mean 0
        assert float(stats["pg_loss"]) == pytest.approx(0.0, abs=1e-6)
    assert float(stats["max_abs_log_ratio"]) < 1e-5  # ρ/w = q_θ(y)/q_θold(y) = 1 at θ = θold
    # the untempered student would differ from the sampler's log q by a lot at τ = 0.7
    rollout = module._rollout
    with torch.no_grad():
        raw = gather_logprobs(response_logits(module.model, rollout), rollout.response_ids)
    assert ((raw - rollout.student_logprobs).abs() * rollout.response_mask).max() > 1e-2


# ---------------------------------------------------------------- §3: importance weight and whitening, by hand
def _two_token_case(mix_old_gap: tuple[float, float], whiten_advantages: bool = False):
    """One sequence of T = 2 tokens over V = 2, sampled token 0 at both positions; student logits zero
    (q = ½ each), teacher logits (log 3, 0) → p(token 0) = ¾. Sampling distribution: log p̃ = log q − gap."""
    s_logits = torch.zeros(1, 2, 2, requires_grad=True)
    t_logits = torch.tensor([[[math.log(3.0), 0.0], [math.log(3.0), 0.0]]])
    tokens, mask = torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2)
    old = torch.full((1, 2), math.log(0.5))
    mix = old - torch.tensor([mix_old_gap])
    loss, _ = minillm_loss(s_logits, t_logits, tokens, mask, old, mix, single_step=False, length_norm=False,
                           gamma=1.0, reward_scaling=1.0, whiten_advantages=whiten_advantages, clip_eps=0.2)
    (grad,) = torch.autograd.grad(loss, s_logits)
    return float(loss), grad[0, :, 0]  # ∂L/∂(logit of the sampled token) at each position


def test_importance_weight_scales_the_surrogate_and_the_clip_stops_its_gradient():
    # r_t = log ¾ − log ½ = log 1.5 at both positions; long-term term with r_t: A_1 = 2·log 1.5, A_2 = log 1.5
    r = math.log(1.5)
    a1, a2 = 2 * r, r
    # w_t = q/p̃ = e^{gap}: w_1 = 1.1 (inside [0.8, 1.2]), w_2 = 1.5 (clipped to 1.2 since A_2 > 0)
    w1, w2 = 1.1, 1.5
    loss, grad = _two_token_case((math.log(w1), math.log(w2)))
    assert loss == pytest.approx(0.5 * (-a1 * w1 + -a2 * 1.2), rel=1e-6)
    # d log q(token 0)/d logit_0 = 1 − q = ½ ; ∂ρ_t/∂log q_t = ρ_t  (unclipped); the clipped position has no gradient
    assert float(grad[0]) == pytest.approx(0.5 * -a1 * w1 * 0.5, rel=1e-6)
    assert float(grad[1]) == pytest.approx(0.0, abs=1e-9)
    loss_w1, _ = _two_token_case((0.0, 0.0))  # no mixing: w = 1
    assert loss_w1 == pytest.approx(0.5 * (-a1 - a2), rel=1e-6)


def test_advantage_whitening_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    s = math.sqrt(2 / 3)  # population std of (1, 2, 3)
    assert whiten(x, mask).tolist()[0] == pytest.approx([-1 / s, 0.0, 1 / s, 0.0], rel=1e-6)
    # in the loss: A = (2 log 1.5, log 1.5) whitens to (1, −1), so with w = 1 the surrogate is ½(−1 + 1) = 0 and
    # the gradient on each sampled logit is −Â_t·½/2
    loss, grad = _two_token_case((0.0, 0.0), whiten_advantages=True)
    assert loss == pytest.approx(0.0, abs=1e-6)
    assert grad.tolist() == pytest.approx([-0.25, 0.25], rel=1e-5)


# --------------------------------------------------------------------------------------- resume mid inner epoch
def test_rollout_and_inner_epoch_counter_survive_a_checkpoint(tmp_path):
    """ppo_epochs 4, lm_coef 0: steps 3–4 reuse the rollout drawn at step 1, so 4 steps uninterrupted and 2 steps +
    resume from the step-2 checkpoint must give the same weights (no new rollout may be drawn after resuming)."""
    def run(steps: int, ckpt: str | None = None) -> tuple[MiniLLM, int]:
        L.seed_everything(0)
        module = _module(ppo_epochs=4, lm_coef=0.0, max_new_tokens=3, lr_decay="constant")  # same LR when halved
        draws = []
        sample = module.rollout
        module.rollout = lambda *a, **k: draws.append(1) or sample(*a, **k)
        data = InstructionDataModule(num_examples=40, num_val=4, batch_size=4, max_response_length=4)
        trainer = L.Trainer(max_steps=steps, limit_val_batches=0, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path, enable_checkpointing=False)
        trainer.fit(module, data, ckpt_path=ckpt)
        if ckpt is None and steps == 2:
            trainer.save_checkpoint(tmp_path / "half.ckpt")
        return module, len(draws)

    full, full_draws = run(4)
    half, _ = run(2)
    assert half._rollout_uses == 2
    resumed, resumed_draws = run(4, str(tmp_path / "half.ckpt"))
    assert full_draws == 1 and resumed_draws == 0
    assert resumed._rollout_uses == 4
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=1e-6)
