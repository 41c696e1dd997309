"""Imports go down the floors only (DESIGN.md): ``optimizers/`` and ``datamodules/`` import nothing from
``lit_modules/``, ``callbacks/`` or ``cli/``; ``lit_modules/`` nothing from ``callbacks/`` or ``cli/``; ``callbacks/``
nothing from ``cli/``. Checked on every import statement of every file (those inside functions included), by ast."""

import ast
from pathlib import Path

FORBIDDEN = {"optimizers": {"lit_modules", "callbacks", "discovery", "cli"},
             "datamodules": {"lit_modules", "callbacks", "discovery", "cli"},
             "lit_modules": {"callbacks", "discovery", "cli"}, "callbacks": {"discovery", "cli"}, "discovery": {"cli"}}


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
