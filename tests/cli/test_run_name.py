"""The logger's run name comes from the config file (the last ``--config``'s stem) instead of being repeated inside
every config; a name a config or the command line gives still wins."""

from pathlib import Path

import pytest

from cli import DEFAULT_RUN_NAME, LitPapersCLI, build_cli, run_name

MINILLM_ROWS = ["kd", "seqkd", "gkd_reverse", "minillm_no_pt", "minillm_no_length_norm", "minillm_no_single_step",
                "minillm_no_teacher_mix", "minillm_pt_sft"]


def _parsed_name(monkeypatch, args: list[str]) -> str:
    """The run name after parsing (and our pre-instantiation edits), without building model or data."""
    monkeypatch.setattr(LitPapersCLI, "instantiate_classes", lambda self: None)
    cli = build_cli(args, run=False)
    return cli.config.trainer.logger.init_args.name


@pytest.mark.parametrize("row", MINILLM_ROWS)
def test_a_composed_minillm_row_is_named_after_its_ablation_file(root, monkeypatch, row):
    base, ablation = root / "configs/minillm/base.yaml", root / f"configs/minillm/{row}.yaml"
    assert _parsed_name(monkeypatch, ["--config", str(base), "--config", str(ablation)]) == row


@pytest.mark.parametrize("config", ["minillm/base.yaml", "minillm/sft.yaml", "minillm/teacher_sft.yaml",
                                    "dpo/dpo.yaml", "dpo/discopop.yaml", "ademamix/quick.yaml",
                                    "ademamix/quick_adamw.yaml", "ademamix/paper_110m.yaml"])
def test_a_standalone_config_is_named_after_itself(root, monkeypatch, config):
    assert _parsed_name(monkeypatch, ["--config", str(root / "configs" / config)]) == Path(config).stem


def test_a_name_given_in_a_config_or_on_the_command_line_wins(root, monkeypatch, tmp_path):
    quick = str(root / "configs/ademamix/quick.yaml")
    named = tmp_path / "overlay.yaml"
    named.write_text("trainer: {logger: {init_args: {name: my_run}}}\n")
    assert _parsed_name(monkeypatch, ["--config", quick, "--config", str(named)]) == "my_run"
    assert _parsed_name(monkeypatch, ["--config", quick, "--trainer.logger.init_args.name", "cli_run"]) == "cli_run"
    unnamed = tmp_path / "short_run.yaml"
    unnamed.write_text("trainer: {max_steps: 3}\n")
    assert _parsed_name(monkeypatch, ["--config", quick, "--config", str(unnamed)]) == "short_run"
    inline = '{"trainer": {"max_steps": 2}}'  # a YAML string, not a file: the last file still names the run
    assert _parsed_name(monkeypatch, ["--config", quick, "--config", inline]) == "quick"


def test_without_a_config_file_the_default_name_stays(monkeypatch):
    assert _parsed_name(monkeypatch, ["--model", "CausalLM", "--data", "TextDataModule"]) == DEFAULT_RUN_NAME
    assert _parsed_name(monkeypatch, ["--config", '{"seed_everything": 1}', "--model", "CausalLM",
                                      "--data", "TextDataModule"]) == DEFAULT_RUN_NAME
    assert run_name(["a/b/c.yaml", Path("x/kd.yaml")]) == "kd"


def test_the_trained_run_logs_under_the_config_stem(root, tmp_path):
    cli = build_cli(["fit", "--config", str(root / "configs/ademamix/quick.yaml"), "--trainer.max_steps", "1",
                     "--trainer.limit_val_batches", "0", "--data.init_args.max_documents", "20",
                     "--data.init_args.batch_size", "2", "--trainer.enable_progress_bar", "false",
                     "--trainer.enable_checkpointing", "false"])
    assert Path(cli.trainer.log_dir) == Path("logs/quick/version_0")
    assert (tmp_path / "logs/quick/version_0/config.yaml").exists()
