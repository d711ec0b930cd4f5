"""The package's folders depend one way, and the scoring module that travels with checkpoints imports
only torch: read from the source (every import, lazy ones included), not from what happens to load."""

from __future__ import annotations

import ast
from pathlib import Path

import granalign

PACKAGE = Path(granalign.__file__).resolve().parent
# Each folder may import the folders after it, never those before it. The command-line entry points
# (`cli_*.py`) wire everything together and are left out.
LAYERS = ("training", "evaluation", "retrieval")


def _imports(path: Path) -> set[str]:
    """Absolute names of the granalign modules `path` imports (relative imports resolved)."""
    module = path.relative_to(PACKAGE.parent).with_suffix("").parts
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = module[: len(module) - node.level] if node.level else ()
            names.add(".".join((*base, *([node.module] if node.module else []))))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_folders_import_only_the_folders_below_them():
    wrong = []
    for position, folder in enumerate(LAYERS):
        for path in sorted((PACKAGE / folder).rglob("*.py")):
            if path.name.startswith("cli_"):
                continue
            for name in _imports(path):
                parts = name.split(".")
                if parts[0] == "granalign" and len(parts) > 1 and parts[1] in LAYERS[:position]:
                    wrong.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not wrong, wrong


def test_the_scoring_module_imports_only_torch():
    names = _imports(PACKAGE / "scoring_granalign.py")
    assert {name.split(".")[0] for name in names} <= {"__future__", "collections", "typing", "torch"}, names
