"""MiniLLM as a LightningModule: frozen teacher bookkeeping, clear errors, inner PPO steps, every config via the CLI."""

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from cli import build_cli
from datamodules import InstructionDataModule
from lit_modules import MiniLLM
from tiny_models import TINY

# the SmolLM2 configs need the real weights (`make real`): their pipeline is run by tests/benchmarks/test_claim_real_minillm.py
# with a tiny stand-in, and by the slow test there with the real model
CONFIGS = sorted(c for c in (Path(__file__).resolve().parents[2] / "configs" / "minillm").glob("*.yaml")
                 if not c.name.startswith("smollm2"))


def _config_args(config: Path) -> list[str]:
    """``--config`` arguments of a shipped config: a row file (no ``model.class_path``) composes after base.yaml."""
    is_row = "class_path" not in (yaml.safe_load(config.read_text()).get("model") or {})
    return (["--config", str(config.parent / "base.yaml")] if is_row else []) + ["--config", str(config)]


def _trainer(**kw) -> L.Trainer:
    return L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     **kw)


def test_vocabulary_mismatch_and_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="vocabulary size 259 != teacher vocabulary size 300"):
        MiniLLM(student=TINY, teacher=TINY | {"vocab_size": 300})
    with pytest.raises(FileNotFoundError, match="configs/minillm/teacher_sft.yaml"):
        MiniLLM(student=TINY, teacher="checkpoints/my_teacher")
    with pytest.raises(ValueError, match="objective='rkl' is not one of"):
        MiniLLM(student=TINY, teacher=TINY, objective="rkl")
    with pytest.raises(ValueError, match="needs a teacher"):
        MiniLLM(student=TINY, teacher=None, objective="kd")
    with pytest.raises(ValueError, match="teacher_mix_alpha"):
        MiniLLM(student=TINY, teacher=TINY, teacher_mix_alpha=1.5)
    assert MiniLLM(student=TINY, teacher=None, objective="sft").teacher is None


def test_teacher_is_frozen_out_of_optimizer_and_checkpoint(tmp_path):
    module = MiniLLM(student=TINY, teacher=TINY | {"hidden_size": 48}, objective="minillm", ppo_epochs=3,
                     max_new_tokens=4, lm_coef=0.5)
    module.configure_model()
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    data = InstructionDataModule(num_examples=24, num_val=4, batch_size=4, max_response_length=4, pretrain=True,
                                 pretrain_block_size=16)
    rollouts = []
    sample = module.rollout
    module.rollout = lambda *a, **k: rollouts.append(1) or sample(*a, **k)
    trainer = _trainer(max_steps=6, limit_val_batches=0, default_root_dir=tmp_path, gradient_clip_val=1.0)
    trainer.fit(module, data)
    assert trainer.global_step == 6 and len(rollouts) == 2  # each rollout serves ppo_epochs = 3 optimizer steps
    assert not module.teacher.training and module.model.training
    optimized = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert optimized == {id(p) for p in module.model.parameters()}
    assert all(torch.equal(teacher_before[k], v) for k, v in module.teacher.state_dict().items())
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    state = torch.load(tmp_path / "m.ckpt", weights_only=False)["state_dict"]
    assert state and not any(k.startswith("teacher.") for k in state)
    del module.rollout
    restored = MiniLLM.load_from_checkpoint(tmp_path / "m.ckpt")
    for k, v in module.model.state_dict().items():
        assert torch.equal(restored.model.state_dict()[k], v)


def test_export_dir_round_trips_as_a_student(tmp_path):
    module = MiniLLM(student=TINY, teacher=None, objective="sft", export_dir=str(tmp_path / "student"))
    module.configure_model()
    _trainer(max_steps=1, limit_val_batches=0).fit(module, InstructionDataModule(num_examples=12, num_val=2,
                                                                                   batch_size=4))
    again = MiniLLM(student=str(tmp_path / "student"), teacher=str(tmp_path / "student"), objective="kd")
    again.configure_model()
    assert again.model.training and not again.teacher.training
    for k, v in module.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[k], v)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", *_config_args(config), "--print_config"])
    assert exit_info.value.code == 0
    assert "class_path" in capsys.readouterr().out


def test_configs_run_end_to_end_through_the_cli():
    """teacher_sft.yaml → sft.yaml → every distillation row, a couple of steps each, in the test's tmp cwd."""
    quick = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1",
             "--trainer.enable_progress_bar", "false", "--data.init_args.num_examples", "64",
             "--data.init_args.num_val", "4", "--data.init_args.batch_size", "4"]
    by_name = {p.stem: p for p in CONFIGS}
    cli = build_cli(["fit", "--config", str(by_name["teacher_sft"])] + quick)
    assert (Path("checkpoints/minillm_teacher") / "config.json").exists() and cli.trainer.global_step == 2
    cli = build_cli(["fit", "--config", str(by_name["sft"])] + quick)
    assert (Path("checkpoints/minillm_student_sft") / "config.json").exists()
    assert "val/valid_rate" in cli.trainer.callback_metrics and "val/rougeL" in cli.trainer.callback_metrics
    rows = sorted(set(by_name) - {"teacher_sft", "sft"})  # base.yaml alone is the MiniLLM row
    assert len(rows) == 9
    for row in rows:
        cli = build_cli(["fit", *_config_args(by_name[row]), "--model.init_args.max_new_tokens", "4",
                         "--data.init_args.pretrain_block_size", "16"] + quick)
        assert cli.trainer.global_step == 2, row
        assert torch.isfinite(cli.trainer.callback_metrics["train/loss"]), row
        assert torch.isfinite(cli.trainer.callback_metrics["val/ex_acc_err"]), row  # every row has a teacher
