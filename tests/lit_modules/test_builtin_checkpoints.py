"""Built-in checkpoints trained on first use: the real `litpapers fit` subprocess, the wiring in MiniLLM/QDPO,
finished-export detection and a clear error when training fails."""

import subprocess
from pathlib import Path

import pytest
import torch

from lit_modules import MiniLLM
from lit_modules import builtin_checkpoints as builtin
from lit_modules.hf import byte_tokenizer, load_causal_lm, save_pretrained_with_tokenizer

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 2}
QUICK = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
         "--data.init_args.num_examples", "64", "--data.init_args.num_val", "4", "--data.init_args.batch_size", "4"]


def test_missing_teacher_is_trained_by_its_config_once_then_loaded(monkeypatch):
    builtin.ensure_built_in("checkpoints/minillm_teacher", *QUICK)  # a real `litpapers fit` in a subprocess
    assert builtin.is_finished_export("checkpoints/minillm_teacher")
    config = (Path("checkpoints/minillm_teacher") / "config.json").read_text()
    assert '"hidden_size": 128' in config and '"num_hidden_layers": 3' in config  # teacher_sft.yaml's model

    def no_second_run(*args, **kwargs):
        raise AssertionError("an existing export must not be trained again")

    monkeypatch.setattr(builtin.subprocess, "run", no_second_run)
    builtin.ensure_built_in("checkpoints/minillm_teacher")
    module = MiniLLM(student=TINY, teacher="checkpoints/minillm_teacher", objective="kd")
    exported = load_causal_lm("checkpoints/minillm_teacher")
    for k, v in exported.state_dict().items():
        assert torch.equal(module.teacher.state_dict()[k], v)


def _fake_fit(commands: list[list[str]], returncode: int = 0):
    """Stand-in for the training subprocess: records the command and writes a tiny export where the config would."""

    def run(command, check):
        commands.append(command)
        config = Path(command[command.index("--config") + 1]).as_posix()
        target = next(spec for spec, cfg in builtin.BUILT_IN.items() if config.endswith(cfg))
        if returncode == 0:
            save_pretrained_with_tokenizer(load_causal_lm(TINY, vocab_size=259, seed=0), byte_tokenizer(), target)
        return subprocess.CompletedProcess(command, returncode)

    return run


def test_minillm_with_the_default_paths_builds_student_and_teacher_first(monkeypatch):
    commands: list[list[str]] = []
    monkeypatch.setattr(builtin.subprocess, "run", _fake_fit(commands))
    module = MiniLLM(student="checkpoints/minillm_student_sft", teacher="checkpoints/minillm_teacher")
    configs = [Path(c[c.index("--config") + 1]).name for c in commands]
    assert configs == ["sft.yaml", "teacher_sft.yaml"]
    assert all(c[:4] == [builtin.sys.executable, "-m", "cli", "fit"] for c in commands)
    assert module.teacher is not None and not module.teacher.training
    MiniLLM(student="checkpoints/minillm_student_sft", teacher="checkpoints/minillm_teacher")
    assert len(commands) == 2  # both exist now: nothing is trained again
    # other paths are never trained: a missing one is the loader's error
    with pytest.raises(FileNotFoundError, match="make it first"):
        MiniLLM(student=TINY, teacher="elsewhere/minillm_teacher")
    assert len(commands) == 2


def test_unfinished_export_is_retrained_and_a_failed_run_is_a_clear_error(monkeypatch):
    partial = Path("checkpoints/minillm_teacher")
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")  # an interrupted save: config but no weights
    assert not builtin.is_finished_export(partial)
    commands: list[list[str]] = []
    monkeypatch.setattr(builtin.subprocess, "run", _fake_fit(commands, returncode=1))
    with pytest.raises(RuntimeError, match="litpapers fit --config configs/minillm/teacher_sft.yaml"):
        builtin.ensure_built_in("checkpoints/minillm_teacher")
    assert len(commands) == 1


def test_export_is_atomic_and_replaces_an_older_one(tmp_path):
    target = tmp_path / "model"
    save_pretrained_with_tokenizer(load_causal_lm(TINY, vocab_size=259, seed=0), byte_tokenizer(), target)
    newer = load_causal_lm(TINY, vocab_size=259, seed=1)
    save_pretrained_with_tokenizer(newer, byte_tokenizer(), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no .partial / .old left behind
    for k, v in newer.state_dict().items():
        assert torch.equal(load_causal_lm(str(target)).state_dict()[k], v)
