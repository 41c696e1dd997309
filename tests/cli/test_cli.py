"""The CLI end to end: every shipped YAML parses, the quick config trains/logs/resumes, DDP on 2 CPU processes."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cli import build_cli

ROOT = Path(__file__).resolve().parents[2]
#: `litpapers fit` configs; configs/discopop/discover*.yaml are `litpapers discover` configs, parsed in
#: tests/discovery/test_discovery.py.
CONFIGS = sorted(c for c in (ROOT / "configs").rglob("*.yaml") if not c.name.startswith("discover"))
QUICK = str(ROOT / "configs" / "ademamix" / "quick_adamw.yaml")
FAST = ["--data.init_args.max_documents", "40", "--data.init_args.block_size", "32",
        "--data.init_args.batch_size", "4", "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar",
        "false"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_config_parses(config, capsys):
    # a row file (no model.class_path, e.g. configs/minillm/kd.yaml) composes after its folder's base.yaml
    row = "class_path" not in (yaml.safe_load(config.read_text()).get("model") or {})
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", *(["--config", str(config.parent / "base.yaml")] if row else []), "--config", str(config),
                   "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model:" in printed and "class_path" in printed


def test_quick_config_trains_logs_to_tensorboard_and_resumes(tmp_path):
    cli = build_cli(["fit", "--config", QUICK, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
                     *FAST])
    assert cli.trainer.global_step == 4
    events = list(Path("logs").rglob("events.out.tfevents.*"))
    assert events, "TensorBoard event file missing"
    assert {"train/loss", "val/loss", "val/ppl"} <= set(cli.trainer.callback_metrics)
    ckpt = next(Path("logs").rglob("last.ckpt"))
    resumed = build_cli(["fit", "--config", QUICK, "--trainer.max_steps", "6", *FAST, "--ckpt_path", str(ckpt)])
    assert resumed.trainer.global_step == 6


def test_bad_argument_names_the_field(capsys):
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", QUICK, "--model.init_args.lrr", "1.0"])
    assert "lrr" in capsys.readouterr().err


def _csv_metric(root: Path, name: str) -> float:
    values = []
    for f in root.rglob("metrics.csv"):
        with open(f) as fh:
            values += [float(r[name]) for r in csv.DictReader(fh) if r.get(name)]
    assert values, f"{name} not logged under {root}"
    return values[-1]


def _run_cli(args: list[str], out: Path, timeout: int = 240) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    # DDP re-launches this command line for rank 1, so it must be a real script, not `python -c`.
    entry = Path(sys.executable).parent / "litpapers"
    launcher = [str(entry)] if entry.exists() else [sys.executable, "-m", "cli"]
    cmd = [*launcher, *args,
           "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_ddp_two_cpu_processes_agree_with_single_process(tmp_path):
    # Validation of the untrained (seeded) model: the val metric is synced across ranks, so 2-process DDP must
    # equal one process on the same (even-sized) val set. Then a short DDP fit must finish.
    common = ["--config", QUICK, "--data.init_args.max_documents", "40", "--data.init_args.block_size", "32",
              "--data.init_args.batch_size", "2", "--trainer.limit_val_batches", "4",
              "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu"]
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    _run_cli(["validate", *common, "--trainer.devices", "1"], tmp_path / "single")
    _run_cli(["validate", *common, *ddp, "--trainer.limit_val_batches", "2"], tmp_path / "ddp")
    single, multi = _csv_metric(tmp_path / "single", "val/loss"), _csv_metric(tmp_path / "ddp", "val/loss")
    assert multi == pytest.approx(single, rel=1e-5)
    _run_cli(["fit", *common, *ddp, "--trainer.max_steps", "3", "--trainer.val_check_interval", "3"],
             tmp_path / "ddp_fit")
    assert _csv_metric(tmp_path / "ddp_fit", "val/loss") > 0


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_config_keeps_its_final_model(config):
    # A finished run keeps a checkpoint (last.ckpt); MiniLLM/QDPO runs (LLMs users take elsewhere) also export
    # it with save_pretrained. Only the built-in checkpoints' configs, which are exports, and the probe-only
    # configs (`litpapers validate` on a model they do not train: a checkpoint would be a copy of its input) skip it.
    import yaml

    from lit_modules.builtin_checkpoints import BUILT_IN

    cfg = yaml.safe_load(config.read_text()) or {}
    model = cfg.get("model") or {}
    exported = bool((model.get("init_args") or {}).get("export_dir"))
    built_in = config.relative_to(ROOT).as_posix() in BUILT_IN.values()
    probes_only = config.parent.name == "probes" and "litpapers validate" in config.read_text()
    assert (cfg.get("trainer") or {}).get("enable_checkpointing") is not False or (built_in and exported) or probes_only
    if str(model.get("class_path", "")).endswith(("MiniLLM", "QDPO")):
        assert exported
