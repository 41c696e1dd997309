"""The error is the last line: a bad argument found while a module is built prints its own message last and once
(not jsonargparse's "Does not validate against any of the Union subtypes", no traceback); a path-like model name
that does not exist fails at once, naming it; LITPAPERS_DEBUG=1 keeps the traceback."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cli

ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "configs" / "ademamix" / "quick_adamw.yaml")
TINY = "{hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 2"


def _main(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """``litpapers fit ARGS`` in this process (fast); returns (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["litpapers", "fit", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, capsys.readouterr().err


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **env)
    return subprocess.run([sys.executable, "-m", "cli", "fit", *args], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=300)


CASES = {
    "radt_context_len_0": (["--config", str(ROOT / "configs/radt/halfcheetah.yaml"), "--data.init_args.context_len",
                            "0"], "error: context_len must be >= 1, got 0"),
    "radt_model_context_len_0": (["--config", str(ROOT / "configs/radt/halfcheetah.yaml"),
                                  "--model.init_args.context_len", "0"], "error: context_len must be >= 1, got 0"),
    "minillm_vocabulary_mismatch": (["--model", "lit_modules.MiniLLM", "--model.student", TINY + ", vocab_size: 300}",
                                     "--model.teacher", TINY + ", vocab_size: 400}", "--model.objective", "kd",
                                     "--data", "datamodules.InstructionDataModule"],
                                    "error: student vocabulary size 300 != teacher vocabulary size 400: both models "
                                    "must share one tokenizer/vocabulary"),
    "model_dir_without_config": (["--config", QUICK, "--model.init_args.model", "./empty_model"],
                                 "error: model directory './empty_model' has no config.json (expected a "
                                 "save_pretrained export)"),
}


def _assert_last_line_once(stderr: str, expected: str) -> None:
    assert stderr.strip().splitlines()[-1] == expected, stderr[-3000:]
    assert stderr.count(expected.removeprefix("error: ")) == 1 and "Traceback" not in stderr
    assert "Does not validate against any of the Union subtypes" not in stderr


def test_a_bad_argument_in_a_real_process_ends_the_output(tmp_path):
    args, expected = CASES["radt_context_len_0"]
    done = _run(args, tmp_path)
    assert done.returncode == 1
    _assert_last_line_once(done.stderr, expected)


@pytest.mark.parametrize("case", CASES)
def test_a_bad_argument_ends_the_output_once_without_a_traceback(case, tmp_path, monkeypatch, capsys):
    (tmp_path / "empty_model").mkdir()
    args, expected = CASES[case]
    code, err = _main(args, monkeypatch, capsys)
    assert code == 1
    _assert_last_line_once(err, expected)


def test_debug_variable_keeps_the_traceback(monkeypatch, capsys):
    monkeypatch.setenv("LITPAPERS_DEBUG", "1")
    monkeypatch.setattr(sys, "argv", ["litpapers", "fit", "--config", QUICK, "--model.init_args.model", "./nope"])
    with pytest.raises(ValueError) as error:  # the original exception propagates (Python prints its traceback)
        cli.main()
    assert "./nope" in str(error.value.__cause__)


def test_missing_path_like_model_fails_at_once_naming_it(monkeypatch, capsys):
    start = time.time()
    code, err = _main(["--config", QUICK, "--model.init_args.model", "my_models/sft"], monkeypatch, capsys)
    assert code == 1 and time.time() - start < 30
    assert err.strip().splitlines()[-1].startswith("error: model 'my_models/sft' is neither a local directory")


def test_check_model_source_tells_paths_from_hub_ids(tmp_path, monkeypatch):
    from lm.model_aliases import check_model_source

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "my_models").mkdir()
    (tmp_path / "exported").mkdir()
    check_model_source("exported")  # an existing directory
    check_model_source("byte")  # the built-in byte-level tokenizer
    for path_like in ("./nothing", "~/nothing_here_xyz", "a/b/c", "my_models/sft"):  # my_models/ exists here
        with pytest.raises(FileNotFoundError, match=f"model path '{path_like}' does not exist"):
            check_model_source(path_like)
    with pytest.raises(FileNotFoundError, match="'org/name' is neither .* HF_HUB_OFFLINE is set"):
        check_model_source("org/name")  # a hub id, not cached, offline: no network wait
