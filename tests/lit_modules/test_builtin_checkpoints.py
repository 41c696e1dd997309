"""Built-in checkpoints trained on first use: the real `litpapers fit` subprocess, the wiring in MiniLLM/QDPO,
finished-export detection and a clear error when training fails."""

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lit_modules import MiniLLM
from lit_modules import builtin_checkpoints as builtin
from lm.hf import load_causal_lm, save_pretrained_with_tokenizer
from lm.tokenizers import byte_tokenizer
from tiny_models import TINY

QUICK = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
         "--data.init_args.num_examples", "64", "--data.init_args.num_val", "4", "--data.init_args.batch_size", "4"]


def test_missing_teacher_is_trained_by_its_config_once_then_loaded(monkeypatch):
    builtin.ensure_built_in("checkpoints/minillm_teacher", *QUICK)  # a real `litpapers fit` in a subprocess
    assert builtin.is_finished_export("checkpoints/minillm_teacher")
    # the training run's logs stay beside the checkpoints: no `logs/` in the working directory (issue 27 item 7)
    assert not Path("logs").exists() and not Path("lightning_logs").exists()
    assert list(Path("checkpoints/logs/teacher_sft").glob("version_*/config.yaml"))
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

    def run(command, check, **kwargs):
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


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int) -> bool:
    try:
        return " Z " not in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:4]
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_training_child_holds_the_lock_and_dies_with_its_killed_parent(root):
    # The parent runs ensure_built_in (module loaded by file: no heavy package import); its child is the real
    # `litpapers fit` of the teacher. SIGKILL the parent: the child must not go on training as an orphan.
    code = ("import importlib.util, sys; sys.path.insert(0, sys.argv[1]); "
            "spec = importlib.util.spec_from_file_location('b', sys.argv[1] + '/lit_modules/builtin_checkpoints.py');"
            " b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b); "
            "b.ensure_built_in('checkpoints/minillm_teacher', '--trainer.max_steps', '100000')")
    parent = subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(root)))
    child = None
    try:
        deadline = time.time() + 30
        while not _children(parent.pid) and time.time() < deadline:
            time.sleep(0.1)
        (child,) = _children(parent.pid)
        lock = Path("checkpoints/minillm_teacher.lock").resolve()
        deadline = time.time() + 10
        while time.time() < deadline and not any(Path(f"/proc/{child}/fd/{fd}").resolve() == lock
                                                 for fd in os.listdir(f"/proc/{child}/fd")):
            time.sleep(0.1)
        assert any(Path(f"/proc/{child}/fd/{fd}").resolve() == lock for fd in os.listdir(f"/proc/{child}/fd")), \
            "the training process must hold the lock itself"
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.time() + 10
        while _alive(child) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(child), "the training process outlived its killed parent"
        with open(lock) as f:  # nobody holds the lock now: a rerun may train it
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        parent.kill()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)


def test_an_interrupted_built_in_training_resumes_from_its_last_checkpoint(monkeypatch):
    """A killed run left ``last.ckpt`` in its log folder: the next start continues from it (``--ckpt_path``), and
    once the export is complete the training checkpoints are removed (the logs stay)."""
    spec, config = "checkpoints/minillm_teacher", builtin.BUILT_IN["checkpoints/minillm_teacher"]
    runs = builtin.training_log_dir(spec) / Path(config).stem
    older, newer = (runs / f"version_{i}" / "checkpoints" / "last.ckpt" for i in (0, 1))
    for i, path in enumerate((older, newer)):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
    commands: list[list[str]] = []
    monkeypatch.setattr(builtin.subprocess, "run", _fake_fit(commands))
    builtin.ensure_built_in(spec)
    (command,) = commands
    assert command[command.index("--ckpt_path") + 1] == str(newer)
    assert command[command.index("--trainer.enable_checkpointing") + 1] == "true"
    assert not older.exists() and not newer.exists() and runs.is_dir()
    builtin.ensure_built_in(spec)  # finished: nothing to resume, nothing trained
    assert len(commands) == 1
