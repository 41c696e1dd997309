"""Everything a documented command writes lands under an output folder git ignores (issue 27 item 7): the
discovery runs, a bare Lightning ``Trainer`` in the README's snippet, and ``.gitignore`` itself. (The built-in
checkpoints' training logs and the probe figures are checked where they are made:
``tests/lit_modules/test_builtin_checkpoints.py``, ``tests/callbacks/test_oversquashing.py``.)"""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def ignored_folders() -> set[str]:
    """The folder patterns (``name/``) of the repository's ``.gitignore``."""
    lines = (ROOT / ".gitignore").read_text().splitlines()
    return {line.strip() for line in lines if line.strip().endswith("/") and not line.startswith("#")}


def test_gitignore_covers_every_output_folder():
    assert {"logs/", "runs/", "checkpoints/", "reports/", "lightning_logs/"} <= ignored_folders()


def test_discover_configs_keep_their_runs_under_logs():
    configs = sorted((ROOT / "configs" / "discopop").glob("discover*.yaml"))
    assert configs
    for config in configs:
        run_dir = yaml.safe_load(config.read_text())["run_dir"]
        assert run_dir.startswith("logs/"), f"{config.name}: run_dir {run_dir!r} is outside logs/"
    import inspect

    from discovery import DiscoveryLoop

    default = inspect.signature(DiscoveryLoop).parameters["run_dir"].default
    assert default.startswith("logs/"), f"DiscoveryLoop's default run_dir {default!r} is outside logs/"


def test_readme_trainers_name_where_they_log():
    """A ``Trainer(...)`` without ``default_root_dir``/``logger`` writes ``lightning_logs/`` into the working
    directory."""
    readme = (ROOT / "README.md").read_text()
    code = "\n".join(re.findall(r"```python\n(.*?)```", readme, flags=re.S))
    calls = re.findall(r"Trainer\((.*?)\)", code)
    assert calls, "the README has no Trainer snippet any more: drop this test"
    for args in calls:
        assert "default_root_dir=" in args or "logger=" in args, f"Trainer({args}) logs to ./lightning_logs"
