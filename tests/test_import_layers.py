"""Imports go down the floors only (DESIGN.md): ``optimizers/`` and ``datamodules/`` import nothing from
``lit_modules/``, ``callbacks/`` or ``cli/``; ``lit_modules/`` nothing from ``callbacks/`` or ``cli/``; ``callbacks/``
nothing from ``cli/``. Checked on every import statement of every file (those inside functions included), by ast."""

import ast
from pathlib import Path

FORBIDDEN = {"optimizers": {"lit_modules", "callbacks", "cli"}, "datamodules": {"lit_modules", "callbacks", "cli"},
             "lit_modules": {"callbacks", "cli"}, "callbacks": {"cli"}}


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
