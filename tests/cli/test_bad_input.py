"""Bad input and failing disks end the output with one ``error:`` line naming what is wrong (issue 24 items 6,
9-12, issue 27 item 8): no traceback, a non-zero exit, nothing lost. The README's reliability table quotes these
messages; :func:`test_readme_reliability_rows_match_the_tested_messages` keeps it in step."""

import re
import sys
from pathlib import Path

import pytest
import torch

import cli
from tests.callbacks.test_checkpoint_io import file_size_limit

ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "configs" / "ademamix" / "quick_adamw.yaml")
FAST = ["--data.init_args.max_documents", "40", "--data.init_args.block_size", "32", "--data.init_args.batch_size",
        "4", "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false"]


#: Messages the README's reliability table quotes, with ``<placeholders>`` for the parts that vary.
SAMPLES = {"disk_full": "error: could not write <run>/checkpoints/last.ckpt: No space left on device (<free> free "
                        "there); the previous file there is unchanged",
           "corrupt_ckpt": "error: checkpoint file last.ckpt is corrupt or not a Lightning checkpoint (truncated, or "
                           "not written by torch.save)"}


def _main(args: list[str], monkeypatch, capsys, subcommand: str = "fit") -> tuple[int, str]:
    """``litpapers SUBCOMMAND ARGS`` in this process; returns (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["litpapers", subcommand, *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    return exit_info.value.code, capsys.readouterr().err


def _last_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    return stderr.strip().splitlines()[-1]


def test_a_full_disk_ends_with_one_error_naming_the_checkpoint_and_free_space(monkeypatch, capsys):
    with file_size_limit(256 * 1024):  # the checkpoint (~1.7 MB) cannot be written; logs and configs can
        code, err = _main(["--config", QUICK, "--trainer.max_steps", "2", *FAST], monkeypatch, capsys)
    assert code == 1
    line = _last_line(err)
    assert re.fullmatch(r"error: could not write \S+/checkpoints/last\.ckpt: File too large \(.+ free there\)", line)
    assert not list(Path("logs").rglob("*.ckpt")) and not list(Path("logs").rglob(".*.tmp-*"))


def test_a_full_disk_keeps_the_previous_last_ckpt_whole(monkeypatch, capsys):
    import errno
    import os

    same_folder = [*FAST, "--trainer.logger.version", "0"]
    cli.build_cli(["fit", "--config", QUICK, "--trainer.max_steps", "1", *same_folder])
    last = next(Path("logs").rglob("last.ckpt"))
    real_fsync = os.fsync

    def disk_full_for_last_ckpt(fd):  # the next last.ckpt finds the disk full when flushed
        if ".last.ckpt.tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", disk_full_for_last_ckpt)
    code, err = _main(["--config", QUICK, "--trainer.max_steps", "2", *same_folder, "--ckpt_path", str(last)],
                      monkeypatch, capsys)
    assert code == 1
    free = re.search(r"\((.+) free there\)", err).group(1)
    assert _last_line(err) == SAMPLES["disk_full"].replace("<run>", str(last.parent.parent)).replace("<free>", free)
    assert torch.load(last, weights_only=True)["global_step"] == 1  # the previous one, whole
    assert not list(Path("logs").rglob(".*.tmp-*"))


@pytest.mark.parametrize("damage", ["truncated", "text"])
def test_a_corrupt_ckpt_path_is_named_without_suggesting_unsafe_loading(damage, monkeypatch, capsys):
    path = Path("last.ckpt")
    if damage == "truncated":
        torch.save({"state_dict": {"w": torch.ones(1000)}, "hyper_parameters": {}}, path)
        path.write_bytes(path.read_bytes()[:2000])
    else:
        path.write_text("not a checkpoint\n")
    code, err = _main(["--config", QUICK, *FAST, "--ckpt_path", str(path)], monkeypatch, capsys)
    assert code == 1
    assert _last_line(err).startswith(f"error: checkpoint file {path} is corrupt or not a Lightning checkpoint")
    if damage == "truncated":
        assert _last_line(err) == SAMPLES["corrupt_ckpt"]
    assert "weights_only" not in err


MODEL = "{model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 1"
CASES = {
    "batch_size_0": (["--data.init_args.batch_size", "0"],
                     "error: TextDataModule: batch_size must be >= 1, got 0"),
    "heads_vs_default_kv_heads": (["--model.init_args.model", MODEL + ", num_attention_heads: 2}"],
                                  "error: model config: num_attention_heads 2 is not a multiple of num_key_value_heads "
                                  "4 (the default: the dict does not set it); set num_key_value_heads to a divisor "
                                  "of 2"),
    "hidden_vs_heads": (["--model.init_args.model", MODEL + ", num_attention_heads: 6, num_key_value_heads: 6}"],
                        "error: model config: hidden_size 64 is not a multiple of num_attention_heads 6"),
    "tokenizer_beyond_embedding": (["--model.init_args.model", MODEL + ", vocab_size: 100}"],
                                   "error: the tokenizer has 259 tokens but the model (the config dict) embeds only "
                                   "100: use the model's own tokenizer, or a model whose vocab_size is at least 259"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_model_or_data_argument_is_one_error_naming_the_field(case, monkeypatch, capsys):
    args, expected = CASES[case]
    code, err = _main(["--config", QUICK, "--trainer.max_steps", "1", *FAST, *args], monkeypatch, capsys)
    assert code == 1
    assert _last_line(err) == expected


DPO = str(ROOT / "configs" / "dpo" / "dpo.yaml")
PARSE_CASES = {
    "int_given_a_word": (["--config", QUICK, "--trainer.max_steps", "lots"],
                         "error: --trainer.max_steps expects int, got 'lots'"),
    "float_given_a_list": (["--config", DPO, "--model.init_args.beta", "[0.1,0.2]"],
                           "error: --model.init_args.beta expects float, got '[0.1, 0.2]'"),
    "unknown_model_class": (["--config", QUICK, "--model", "NoSuchModel"],
                            "error: --model expects a LightningModule class (a name or an import path), got "
                            "'NoSuchModel': no such class"),
    "unknown_model_argument": (["--config", QUICK, "--model.init_args.lrr", "1.0"],
                               "error: --model.init_args.lrr: CausalLM has no argument 'lrr'"),
    "abbreviated_flag": (["--config", QUICK, "--trainer.max_step", "2"],
                         "error: unrecognized argument --trainer.max_step 2 (did you mean --trainer.max_steps?)"),
    "misspelt_flag": (["--config", QUICK, "--trainer.max_stepz", "2"],
                      "error: unrecognized argument --trainer.max_stepz 2 (did you mean --trainer.max_steps?)"),
}


@pytest.mark.parametrize("case", PARSE_CASES)
def test_a_bad_flag_is_one_line_naming_key_type_and_value_after_a_one_line_hint(case, monkeypatch, capsys):
    args, expected = PARSE_CASES[case]
    code, err = _main(args, monkeypatch, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1] == expected and lines[-2] == "(see `litpapers fit --help` for the accepted options)", err
    assert "usage:" not in err and len(lines) <= 3, err  # no 52-line usage dump


SAMPLES["empty_chosen"] = "error: <file>:3: field 'chosen' is empty"


def test_an_empty_chosen_answer_names_file_line_and_field(tmp_path):
    from datamodules import PreferenceDataModule

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n' * 2 + '{"prompt": "a", "chosen": "", '
                    '"rejected": "c"}\n')
    with pytest.raises(ValueError) as error:
        PreferenceDataModule(path=str(path)).setup("fit")
    assert cli.error_line(error.value) == SAMPLES["empty_chosen"].replace("<file>", str(path))


#: README rows whose messages are checked by other tests (the text there is a pattern, not the whole line).
CHECKED_ELSEWHERE = {"'rewards' has 1 non-finite value(s)": "tests/datamodules/test_offline_rl.py",
                     "training loss is nan at step N": "tests/cli/test_lifecycle.py"}


def _readme_messages() -> list[str]:
    """The ``error: ...`` messages quoted in the README's reliability table."""
    text = (ROOT / "README.md").read_text()
    table = text.split("| input | message (last line) |", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"`(error: [^`]+)`", table)


def _pattern(documented: str) -> re.Pattern:
    """A README message as a regex: ``<placeholder>`` matches any text, ``...`` anything at all."""
    escaped = re.escape(documented).replace(re.escape("..."), ".*")
    return re.compile(re.sub(r"<[^<>]+>", ".+", escaped))


def test_readme_reliability_rows_match_the_tested_messages():
    from tests.cli.test_errors import CASES as ERROR_CASES

    tested = ([e for _, e in ERROR_CASES.values()] + [e for _, e in CASES.values()]
              + [e for _, e in PARSE_CASES.values()] + list(SAMPLES.values()))
    documented = _readme_messages()
    assert len(documented) >= 12
    for message in documented:  # every documented message is what a test gets
        assert any(_pattern(message).fullmatch(t) for t in tested) or any(
            part in message for part in CHECKED_ELSEWHERE), message
    # every tested message is documented (the heads row quotes one of its two messages)
    new = [e for case, (_, e) in CASES.items() if case != "hidden_vs_heads"]
    for expected in [e for _, e in ERROR_CASES.values()] + new + list(SAMPLES.values()):
        assert any(_pattern(m).fullmatch(expected) for m in documented), f"not in the README: {expected}"
