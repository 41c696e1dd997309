"""The optimizer is the module's own argument (``lit_modules/base.py``): built once, on the module's parameter groups
(weight decay on matrices only, frozen sub-models excluded) whichever way it and a scheduler are chosen, the learning
rate set in one place, and AdEMAMix's α/β3 schedules continuing after a resume."""

import functools
import json
from pathlib import Path

import pytest
import torch

import cli
from lit_modules import CausalLM
from optimizers import AdEMAMix

ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "configs" / "ademamix" / "quick.yaml")
QUICK_ADAMW = str(ROOT / "configs" / "ademamix" / "quick_adamw.yaml")
TINY = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2}
TINY_YAML = json.dumps(TINY)
FAST = ["--model.init_args.model", TINY_YAML, "--data.init_args.max_documents", "40", "--data.init_args.block_size",
        "32", "--data.init_args.batch_size", "4", "--trainer.limit_val_batches", "1", "--trainer.val_check_interval",
        "2", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def _assert_module_groups(module: torch.nn.Module, optimizer: torch.optim.Optimizer, decay: float) -> None:
    """Two groups: every ≥2-D weight with weight decay ``decay``, every bias/norm vector with none, all trained."""
    matrices, vectors = optimizer.param_groups
    assert matrices["weight_decay"] == decay and vectors["weight_decay"] == 0.0
    assert matrices["params"] and all(p.ndim >= 2 for p in matrices["params"])
    assert vectors["params"] and all(p.ndim == 1 for p in vectors["params"])
    grouped = {id(p) for g in (matrices, vectors) for p in g["params"]}
    assert grouped == {id(p) for p in module.parameters()}


# (args after --config, optimizer class, matrices' weight decay, scheduler class or None = the module's LambdaLR)
NO_WARMUP = ["--model.warmup_steps", "0"]  # a given scheduler replaces the module's warm-up (see base.py)
STEP_LR = ["StepLR", "--lr_scheduler.step_size", "1", "--lr_scheduler.gamma", "0.5"]
MODEL_STEP_LR = ["StepLR", "--model.lr_scheduler.step_size", "1", "--model.lr_scheduler.gamma", "0.5"]
WAYS = {
    "config_model_optimizer": ([QUICK], AdEMAMix, 0.1, None),
    "model_optimizer_flag": ([QUICK_ADAMW, "--model.optimizer", "AdEMAMix", "--model.optimizer.alpha", "8",
                              "--model.optimizer.weight_decay", "0.05"], AdEMAMix, 0.05, None),
    "top_level_optimizer_flag": ([QUICK_ADAMW, "--optimizer", "AdEMAMix", "--optimizer.weight_decay", "0.2"],
                                 AdEMAMix, 0.2, None),
    "top_level_scheduler": ([QUICK, *NO_WARMUP, "--lr_scheduler", *STEP_LR], AdEMAMix, 0.1,
                            torch.optim.lr_scheduler.StepLR),
    "model_scheduler": ([QUICK_ADAMW, *NO_WARMUP, "--model.lr_scheduler", *MODEL_STEP_LR], torch.optim.AdamW, 0.1,
                        torch.optim.lr_scheduler.StepLR),
    "both_top_level": ([QUICK_ADAMW, *NO_WARMUP, "--optimizer", "AdEMAMix", "--lr_scheduler", *STEP_LR], AdEMAMix,
                       0.0, torch.optim.lr_scheduler.StepLR),
}


@pytest.mark.parametrize("way", WAYS)
def test_parameter_groups_hold_however_optimizer_and_scheduler_are_chosen(way):
    args, optimizer_class, decay, scheduler_class = WAYS[way]
    run = cli.build_cli(["--config", *args, "--trainer.max_steps", "4"], run=False)
    config = run.model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]
    assert type(optimizer) is optimizer_class
    _assert_module_groups(run.model, optimizer, decay)
    expected = scheduler_class or torch.optim.lr_scheduler.LambdaLR
    assert type(scheduler["scheduler"]) is expected and scheduler["interval"] == "step"
    if way == "model_optimizer_flag":
        assert optimizer.defaults["alpha"] == 8.0 and optimizer.defaults["lr"] == 3e-3  # lr kept from the config


def test_a_given_scheduler_steps_the_module_groups():
    # StepLR(step_size=1, gamma=0.5) on lr 3e-3: after 2 optimizer steps every group is at 3e-3 · 0.5² = 7.5e-4.
    run = cli.build_cli(["fit", "--config", QUICK_ADAMW, *FAST, "--trainer.max_steps", "2", *NO_WARMUP,
                         "--model.lr_scheduler", *MODEL_STEP_LR, "--trainer.logger", "false"])
    optimizer = run.trainer.optimizers[0]
    _assert_module_groups(run.model, optimizer, 0.1)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([7.5e-4, 7.5e-4], rel=1e-12)


def test_the_optimizer_is_built_once(monkeypatch):
    calls = []
    original = AdEMAMix.__init__

    def counting(self, *args, **kwargs):
        calls.append(kwargs.get("alpha"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(AdEMAMix, "__init__", counting)
    for args in ([QUICK], [QUICK_ADAMW, "--optimizer", "AdEMAMix"]):
        calls.clear()
        run = cli.build_cli(["fit", "--config", *args, *FAST, "--trainer.max_steps", "2", "--trainer.logger", "false"])
        assert run.trainer.global_step == 2 and type(run.trainer.optimizers[0]) is AdEMAMix
        assert len(calls) == 1, args


def test_the_learning_rate_is_set_in_one_place():
    injected = functools.partial(AdEMAMix, lr=2e-3, weight_decay=0.1)
    # default AdamW: the module's lr/betas/weight_decay
    adamw = CausalLM(model=TINY, lr=1e-3, weight_decay=0.01).configure_optimizers()["optimizer"]
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["lr"] == 1e-3
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.01, 0.0]
    # an injected optimizer: its own lr; the module's left at its default or equal is fine, different is an error
    for agreeing in ({}, {"lr": 2e-3}, {"weight_decay": 0.1}, {"betas": (0.9, 0.999)}):
        optimizer = CausalLM(model=TINY, optimizer=injected, **agreeing).configure_optimizers()["optimizer"]
        assert [g["lr"] for g in optimizer.param_groups] == [2e-3, 2e-3]
    for name, value in (("lr", 1e-3), ("weight_decay", 0.3), ("betas", (0.8, 0.9))):
        with pytest.raises(ValueError, match=rf"{name}=.* is set on the model and optimizer's {name}="):
            CausalLM(model=TINY, optimizer=injected, **{name: value}).configure_optimizers()
    step = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=1)
    with pytest.raises(ValueError, match="warmup_steps=5 is set on the model for its own learning-rate schedule"):
        CausalLM(model=TINY, warmup_steps=5, lr_scheduler=step).configure_optimizers()


def test_ademamix_schedules_resume_from_a_checkpoint():
    """α and β3 warm up over t_alpha = t_beta3 = 6 steps: resuming the step-2 checkpoint to step 4 continues them
    (the step count lives in the optimizer state, t_alpha/t_beta3 in its param groups) — same weights as 4 steps
    in one run."""
    schedule = ["--model.optimizer.t_alpha", "6", "--model.optimizer.t_beta3", "6", "--trainer.logger", "false"]
    saves = ["--trainer.callbacks+", json.dumps({"class_path": "callbacks.LastCheckpoint", "init_args": {
        "every_n_train_steps": 2, "save_top_k": -1, "filename": "{step}", "dirpath": "ckpt"}})]
    full = cli.build_cli(["fit", "--config", QUICK, *FAST, *schedule, *saves, "--trainer.max_steps", "4"])
    resumed = cli.build_cli(["fit", "--config", QUICK, *FAST, *schedule, "--trainer.max_steps", "4",
                             "--ckpt_path", "ckpt/step=2.ckpt"])
    optimizer = resumed.trainer.optimizers[0]
    assert {g["t_alpha"] for g in optimizer.param_groups} == {6} == {g["t_beta3"] for g in optimizer.param_groups}
    assert {int(s["step"]) for s in optimizer.state.values()} == {4}
    for name, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=0, msg=name)
