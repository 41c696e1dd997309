"""Two runs of one config started together get their own ``version_N`` folders (issue 24 item 5)."""

import threading
from pathlib import Path

from callbacks.loggers import VersionedCSVLogger, VersionedTensorBoardLogger, claim_version_dir
from cli import build_cli

ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "configs" / "ademamix" / "quick_adamw.yaml")


def test_versions_claimed_from_many_threads_at_once_are_distinct(tmp_path):
    loggers = [cls(str(tmp_path), name="run") for cls in (VersionedTensorBoardLogger, VersionedCSVLogger) * 4]
    start, versions = threading.Barrier(len(loggers)), []

    def claim(logger):
        start.wait()
        versions.append(logger.version)

    threads = [threading.Thread(target=claim, args=(lg,)) for lg in loggers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(versions) == list(range(len(loggers)))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(f"version_{v}" for v in versions)


def test_claim_skips_folders_that_exist(tmp_path):
    (tmp_path / "version_0").mkdir()
    (tmp_path / "version_1").mkdir()
    assert claim_version_dir(str(tmp_path)) == 2 and (tmp_path / "version_2").is_dir()


def test_two_runs_of_one_config_started_together_get_their_own_folders():
    # both CLIs are built (trainer, logger) before either writes a file: today's race window
    first = build_cli(["--config", QUICK], run=False)
    second = build_cli(["--config", QUICK, "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
                        "--trainer.logger.save_dir", "logs", "--trainer.logger.name", "quick_adamw"], run=False)
    dirs = {Path(first.trainer.log_dir).resolve(), Path(second.trainer.log_dir).resolve()}
    assert {d.name for d in dirs} == {"version_0", "version_1"} and all(d.is_dir() for d in dirs)
