"""A quiet console: ``litpapers fit --config configs/ademamix/quick.yaml`` and ``import cli`` print no warning or
traceback-looking line, and the progress bar counts optimizer steps out of ``max_steps`` without ``v_num``."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOISE = re.compile(r"warn|deprecat|failed to load|traceback|\.so\b", re.IGNORECASE)


def _run(code_or_args: list[str], cwd: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", COLUMNS="120")
    env.pop("PYTHONWARNINGS", None)
    done = subprocess.run([sys.executable, *code_or_args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def _noise(output: str) -> list[str]:
    return [line for line in output.splitlines() if NOISE.search(line)]


def test_import_cli_is_silent(tmp_path):
    assert _run(["-c", "import cli"], tmp_path).strip() == ""


def test_quick_config_console_has_no_warning_and_counts_steps(tmp_path):
    output = _run(["-m", "cli", "fit", "--config", str(ROOT / "configs" / "ademamix" / "quick.yaml"),
                   "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
                   "--data.init_args.max_documents", "40", "--data.init_args.batch_size", "4"], tmp_path)
    assert _noise(output) == [], output[-3000:]
    assert "LlamaForCausalLM" in output  # the model summary is still shown
    assert re.search(r"^Step\b.* 3/3 ", output, re.MULTILINE), output[-3000:]  # steps of max_steps
    assert "Epoch" not in output and "v_num" not in output and "train/loss" in output
    assert "Logs, config and checkpoints: logs/quick/version_0" in output  # where the logs went
    # config summary, bar, metrics and the log path only: none of Lightning's start/stop chatter
    for chatter in ("GPU available", "TPU available", "Seed set to", "`Trainer.fit` stopped", "Loading weights"):
        assert chatter not in output, output
    assert len(output.strip().splitlines()) <= 18, output


def test_a_module_with_frozen_networks_trains_without_warnings(tmp_path):
    """DPO keeps its reference in eval mode on purpose: Lightning's "module(s) in eval mode" warning is not shown
    (a fit with a validation and a checkpoint, the run's whole console)."""
    output = _run(["-m", "cli", "fit", "--config", str(ROOT / "configs" / "dpo" / "dpo.yaml"),
                   "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                   "--data.num_examples", "40"], tmp_path)
    assert _noise(output) == [], output[-3000:]
    assert "Logs, config and checkpoints: logs/dpo/version_0" in output


def test_build_cli_with_args_ignores_the_process_command_line(monkeypatch, recwarn):
    """`litpapers reproduce ...` runs configs in-process through build_cli(args): LightningCLI must see only those
    args (it warns when it also finds sys.argv[1:]), and the process's argv is left as it was."""
    from cli import build_cli

    argv = ["litpapers", "reproduce", "--full", "--only", "minillm"]
    monkeypatch.setattr(sys, "argv", list(argv))
    cli = build_cli(["--config", str(ROOT / "configs" / "ademamix" / "quick.yaml")], run=False)
    assert cli.model is not None and sys.argv == argv
    assert not [w for w in recwarn if "args parameter is intended" in str(w.message)]
