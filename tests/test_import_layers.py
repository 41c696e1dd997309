"""Imports go down the floors only (DESIGN.md): ``lm/`` (the language-model toolkit's ground floor) imports nothing
from ``datamodules/``, ``lit_modules/``, ``callbacks/``, ``training/``, ``discovery/``, ``benchmarks/`` or ``cli.py``;
``optimizers/`` and ``datamodules/`` nothing from ``lit_modules/`` and above; ``lit_modules/`` nothing from
``callbacks/`` and above; ``callbacks/`` nothing from ``training/`` and above; ``training/`` (the LightningCLI and the
built-in checkpoints' training) nothing from ``discovery/``, ``benchmarks/`` or ``cli.py``; ``discovery/`` and
``benchmarks/`` (the claim code behind ``litpapers reproduce``) nothing from ``cli.py``, the top. Every package may
import ``lm``. Checked on every import statement of every file (those inside functions included), by ast; and no lower
floor reaches a higher one by a side door either: ``importlib.import_module("<higher>...")`` or a ``python -m
<higher>`` subprocess (a subprocess is an import too)."""

import ast
import re
from pathlib import Path

FORBIDDEN = {"lm": {"datamodules", "lit_modules", "callbacks", "training", "discovery", "benchmarks", "cli"},
             "optimizers": {"lit_modules", "callbacks", "training", "discovery", "benchmarks", "cli"},
             "datamodules": {"lit_modules", "callbacks", "training", "discovery", "benchmarks", "cli"},
             "lit_modules": {"callbacks", "training", "discovery", "benchmarks", "cli"},
             "callbacks": {"training", "discovery", "benchmarks", "cli"},
             "training": {"discovery", "benchmarks", "cli"},
             "discovery": {"benchmarks", "cli"}, "benchmarks": {"cli"}}


def upward_imports(path: Path, forbidden: set[str]) -> list[str]:
    """``"<line>: <module>"`` for each import in ``path`` of a module whose top-level package is in ``forbidden``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        found += [f"{node.lineno}: {name}" for name in names if name.split(".")[0] in forbidden]
    return found


def test_no_import_runs_up_a_floor(root):
    violations = {str(f.relative_to(root)): hits for package, forbidden in FORBIDDEN.items()
                  for f in sorted((root / package).rglob("*.py")) if (hits := upward_imports(f, forbidden))}
    assert violations == {}


def test_the_scanner_finds_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\nfrom datamodules.common import x\n\ndef f():\n    from lit_modules.hf import y\n"
                      "    import callbacks.figures, torch\n")
    assert upward_imports(source, {"lit_modules", "callbacks"}) == ["5: lit_modules.hf", "6: callbacks.figures"]


def test_discovery_is_its_own_app_without_a_circle(root):
    """``discovery/`` (DiscoPOP's loop around an LLM proposer, not a LightningModule) is a top-level package; the
    imports between its own modules (those inside functions too) form no cycle."""
    assert not (root / "lit_modules" / "discovery").exists()
    files = {f.stem: f for f in (root / "discovery").glob("*.py") if f.stem != "__init__"}
    edges = {name: {hit.split(": ")[1].split(".")[1] for hit in upward_imports(f, {"discovery"})
                    if hit.split(": ")[1].count(".") >= 1} - {name} for name, f in files.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in edges.get(start, ()))

    assert [name for name in files if reaches(name, name, {name})] == []


def dynamic_upward_paths(path: Path, forbidden: set[str]) -> list[str]:
    """``"<line>: <how>"`` for each way ``path`` reaches a package in ``forbidden`` without an import statement:
    ``import_module("<pkg>...")`` / ``__import__("<pkg>...")`` with a literal name (``"import_module <name>"``), and a
    ``-m <pkg>`` module run, as ``"-m", "<pkg>..."`` in a list/tuple of arguments or inside one string such as
    ``"python -m cli fit"`` (``"-m <pkg>"``). Docstrings and comments are not code and are not read."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    top = lambda name: name.split(".")[0] in forbidden  # noqa: E731
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            arg = node.args[0] if node.args else None
            if (func in ("import_module", "__import__") and isinstance(arg, ast.Constant) and isinstance(arg.value, str)
                    and top(arg.value)):
                found.append(f"{node.lineno}: import_module {arg.value}")
        elif isinstance(node, (ast.List, ast.Tuple)):
            items = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            found += [f"{node.lineno}: -m {b.split('.')[0]}" for a, b in zip(items, items[1:])
                      if a == "-m" and isinstance(b, str) and top(b)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            found += [f"{node.lineno}: -m {m}" for m in re.findall(r"(?:^|\s)-m\s+([\w]+)", node.value) if top(m)]
    return found


def test_no_import_module_or_dash_m_path_runs_up_a_floor(root):
    violations = {}
    for package, forbidden in FORBIDDEN.items():
        for f in sorted((root / package).rglob("*.py")):
            if hits := dynamic_upward_paths(f, forbidden):
                violations[f.relative_to(root).as_posix()] = hits
    assert violations == {}


def test_the_dynamic_scanner_finds_import_module_and_dash_m(tmp_path):
    source = tmp_path / "m.py"
    source.write_text('''"""Run ``python -m cli fit`` by hand (a docstring: not code)."""
import importlib, subprocess, sys
from importlib import import_module

def f(name):
    """Or ``importlib.import_module("cli")``."""
    importlib.import_module(name)                    # a variable: not a literal name, not flagged
    importlib.import_module("torch.nn")              # a lower/foreign package: fine
    importlib.import_module("callbacks.figures")
    import_module("cli")
    subprocess.run([sys.executable, "-m", "cli", "fit"])
    subprocess.run(f"{sys.executable} -m benchmarks.reproduce --quick", shell=True)
    subprocess.run([sys.executable, "-m", "pytest"])
''')
    assert dynamic_upward_paths(source, {"callbacks", "cli", "benchmarks"}) == [
        "9: import_module callbacks.figures", "10: import_module cli", "11: -m cli", "12: -m benchmarks"]


def test_the_training_floor_is_checked_from_below_and_above(tmp_path):
    """``training/`` sits above ``callbacks/``: a module below it that imports it or starts ``python -m training``
    fails, and so does ``training/`` (or the claim code in ``benchmarks/``) reaching up to ``cli``/``benchmarks``."""
    lower = tmp_path / "lower.py"
    lower.write_text('import subprocess, sys\nfrom training.builtin_checkpoints import ensure_built_in\n\ndef f():\n'
                     '    subprocess.run([sys.executable, "-m", "training", "fit"])\n')
    for package in ("lm", "datamodules", "lit_modules", "callbacks"):
        assert upward_imports(lower, FORBIDDEN[package]) == ["2: training.builtin_checkpoints"]
        assert dynamic_upward_paths(lower, FORBIDDEN[package]) == ["5: -m training"]
    upper = tmp_path / "upper.py"
    upper.write_text('import importlib, subprocess, sys\nimport callbacks, lit_modules\nfrom cli import build_cli\n\n'
                     'def f():\n    importlib.import_module("benchmarks.reproduce")\n'
                     '    subprocess.run([sys.executable, "-m", "cli", "fit"])\n'
                     '    subprocess.run([sys.executable, "-m", "training", "fit"])\n')
    assert upward_imports(upper, FORBIDDEN["training"]) == ["3: cli"]
    assert dynamic_upward_paths(upper, FORBIDDEN["training"]) == ["6: import_module benchmarks.reproduce", "7: -m cli"]
    assert upward_imports(upper, FORBIDDEN["benchmarks"]) == ["3: cli"]
    assert dynamic_upward_paths(upper, FORBIDDEN["benchmarks"]) == ["7: -m cli"]
