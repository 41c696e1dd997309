"""Every `litpapers` command in README.md's bash blocks, as written, from a fresh working directory that has only the
repository's `configs/`: Lightning subcommands resolve their whole config (`--print_config`: every file, class and
flag is checked against the code's signatures), `reproduce` and `discover` parse their arguments and configs.
Placeholders the user fills in (`/path/to/hf_model`, `my_corpus/`) are parsed like any value."""

import re
import shlex
import sys
from pathlib import Path

import pytest

import cli
from benchmarks import reproduce
from discovery.loop import build_parser

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[list[str]]:
    """The argument lists of the ``litpapers ...`` lines of README.md's bash blocks (continuations joined,
    comments and environment assignments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
                words.pop(0)
            if words and words[0] == "litpapers":
                commands.append(words[1:])
    return commands


COMMANDS = readme_commands()


def test_the_readme_has_commands_of_every_kind():
    assert {c[0] for c in COMMANDS} >= {"fit", "validate", "reproduce", "discover"}


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(c)[:80] for c in COMMANDS])
def test_readme_command_parses_as_written(args, tmp_path, monkeypatch, capsys):
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # a fresh working directory: the configs, nothing else
    monkeypatch.chdir(tmp_path)
    if args[0] == "reproduce":
        parsed = reproduce.parse_args(args[1:])
        assert parsed.keys and parsed.mode in ("quick", "full")
    elif args[0] == "discover":
        assert build_parser().parse_args(args[1:]).run_dir
    else:
        monkeypatch.setattr(sys, "argv", ["litpapers", *args, "--print_config"])
        with pytest.raises(SystemExit) as done:
            cli.main()
        assert done.value.code in (0, None), capsys.readouterr().err[-2000:]
        assert "class_path:" in capsys.readouterr().out  # the whole resolved config was printed
    assert not any(p.name != "configs" for p in tmp_path.iterdir())  # parsing wrote nothing
