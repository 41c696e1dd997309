"""Built-in checkpoints trained by the explicit step of the training floor: the real `python -m training fit`
subprocess, the CLI training the missing ones a config names (MiniLLM, QDPO) before building the model, the lock,
resume, and a clear error when training fails."""

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
from lit_modules.builtin_checkpoints import BUILT_IN, is_finished_export
from lm.hf import load_causal_lm, save_pretrained_with_tokenizer
from lm.tokenizers import byte_tokenizer, model_prompt_template, set_prompt_template
from tiny_models import TINY
from training import builtin_checkpoints as builtin
from training.cli import LitPapersCLI, build_cli

QUICK = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
         "--data.init_args.num_examples", "64", "--data.init_args.num_val", "4", "--data.init_args.batch_size", "4"]


def test_missing_teacher_is_trained_by_its_config_once_then_loaded(monkeypatch):
    builtin.ensure_built_in("checkpoints/minillm_teacher", *QUICK)  # a real `python -m training fit` subprocess
    assert is_finished_export("checkpoints/minillm_teacher")
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
    module.configure_model()
    exported = load_causal_lm("checkpoints/minillm_teacher")
    for k, v in exported.state_dict().items():
        assert torch.equal(module.teacher.state_dict()[k], v)


def _fake_fit(commands: list[list[str]], returncode: int = 0):
    """Stand-in for the training subprocess: records the command and writes a tiny export where the config would.
    Other subprocesses (a library's own, while the CLI builds its classes) run as usual."""
    real_run = subprocess.run

    def run(command, check=False, **kwargs):
        if command[1:3] != ["-m", "training"]:
            return real_run(command, check=check, **kwargs)
        commands.append(command)
        config = Path(command[command.index("--config") + 1]).as_posix()
        target = next(spec for spec, cfg in BUILT_IN.items() if config.endswith(cfg))
        if returncode == 0:
            save_pretrained_with_tokenizer(load_causal_lm(TINY, vocab_size=259, seed=0), byte_tokenizer(), target)
        return subprocess.CompletedProcess(command, returncode)

    return run


MINILLM = Path(__file__).resolve().parents[2] / "configs" / "minillm" / "base.yaml"
QDPO_INT4 = Path(__file__).resolve().parents[2] / "configs" / "qdpo" / "int4.yaml"


def test_minillm_config_with_the_default_paths_trains_student_and_teacher_first(monkeypatch, capsys):
    """``litpapers fit --config configs/minillm/base.yaml`` on a fresh clone: the CLI trains both built-in checkpoints
    the model's arguments name (a line says so), then builds the model from them."""
    commands: list[list[str]] = []
    monkeypatch.setattr(builtin.subprocess, "run", _fake_fit(commands))
    cli = build_cli(["--config", str(MINILLM), "--trainer.logger", "false"], run=False)
    configs = [Path(c[c.index("--config") + 1]).name for c in commands]
    assert configs == ["sft.yaml", "teacher_sft.yaml"]
    assert all(c[:4] == [builtin.sys.executable, "-m", "training", "fit"] for c in commands)
    assert "checkpoints/minillm_teacher not found: training it first" in capsys.readouterr().out
    module = cli.model
    module.configure_model()
    assert module.teacher is not None and not module.teacher.training
    build_cli(["--config", str(MINILLM), "--trainer.logger", "false"], run=False)
    assert len(commands) == 2  # both exist now: nothing is trained again
    # other paths are never trained: a missing one is the loader's error
    with pytest.raises(FileNotFoundError, match="make it first"):
        MiniLLM(student=TINY, teacher="elsewhere/minillm_teacher")
    assert len(commands) == 2


def test_parsing_a_config_trains_nothing_and_an_sft_row_does_not_need_the_teacher(monkeypatch):
    """Only a run that builds its classes trains missing built-in checkpoints: parsing a config (``--help``, the
    run-name tests, a config check) never does; and ``objective: sft`` never reads the default teacher."""
    commands: list[list[str]] = []
    monkeypatch.setattr(builtin.subprocess, "run", _fake_fit(commands))
    monkeypatch.setattr(LitPapersCLI, "instantiate_classes", lambda self: None)
    build_cli(["--config", str(MINILLM), "--trainer.logger", "false"], run=False)
    assert commands == []
    monkeypatch.undo()
    monkeypatch.setattr(builtin.subprocess, "run", _fake_fit(commands))
    build_cli(["--config", str(MINILLM), "--model.init_args.objective", "sft", "--trainer.logger", "false"], run=False)
    assert [Path(c[c.index("--config") + 1]).name for c in commands] == ["sft.yaml"]


def test_qdpo_config_on_a_fresh_clone_trains_the_fp_model_before_its_tokenizer_and_format_are_read(monkeypatch):
    """A fresh clone: ``configs/qdpo/int4.yaml`` (``model: checkpoints/minillm_teacher``) trains the built-in
    checkpoint first (here a fake training run that writes a tiny export with the teacher config's template), then
    QDPO reads its tokenizer from it."""

    def fake_fit(command, check, **kwargs):
        tok = byte_tokenizer()
        set_prompt_template(tok, "Q: {instruction}\nA: ")
        save_pretrained_with_tokenizer(load_causal_lm(TINY, vocab_size=len(tok), seed=0), tok,
                                       "checkpoints/minillm_teacher")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(builtin.subprocess, "run", fake_fit)
    module = build_cli(["--config", str(QDPO_INT4), "--model.init_args.group_size", "16",
                        "--trainer.logger", "false"], run=False).model
    assert model_prompt_template(module.tokenizer) == "Q: {instruction}\nA: "


def test_unfinished_export_is_retrained_and_a_failed_run_is_a_clear_error(monkeypatch):
    partial = Path("checkpoints/minillm_teacher")
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("{}")  # an interrupted save: config but no weights
    assert not is_finished_export(partial)
    commands: list[list[str]] = []
    monkeypatch.setattr(builtin.subprocess, "run", _fake_fit(commands, returncode=1))
    with pytest.raises(RuntimeError, match="litpapers fit --config configs/minillm/teacher_sft.yaml"):
        builtin.ensure_built_in("checkpoints/minillm_teacher")
    assert len(commands) == 1


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _alive(pid: int) -> bool:
    try:
        return " Z " not in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:4]
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_training_child_holds_the_lock_and_dies_with_its_killed_parent(root):
    # The parent runs ensure_built_in; its child is the real `python -m training fit` of the teacher. SIGKILL the
    # parent: the child must not go on training as an orphan.
    code = ("from training.builtin_checkpoints import ensure_built_in; "
            "ensure_built_in('checkpoints/minillm_teacher', '--trainer.max_steps', '100000')")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(root)))
    child = None
    try:
        deadline = time.time() + 60  # the parent imports lit_modules (torch, transformers) first
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
    spec, config = "checkpoints/minillm_teacher", BUILT_IN["checkpoints/minillm_teacher"]
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
