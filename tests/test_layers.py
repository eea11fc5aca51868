"""The layers' imports point down (serving -> runtime -> models -> policy -> shared leaves), checked
by import-linter's layer contract in pyproject.toml, not by eye."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_imports_point_down():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint, "import-linter is a dev dependency: pip install -e '.[dev]'"
    res = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 kept, 0 broken" in res.stdout


def test_the_planner_knows_no_family():
    """The planner's code (identifiers and strings, not its comments and docstrings' examples) names
    no model family: layouts come from the families' own packages."""
    import ast
    import re

    family = re.compile(r"\b(csm|dia|pocket_?tts|piper|mimi|dac|vits)", re.IGNORECASE)
    for path in (ROOT / "edge_runtime" / "policy" / "planner").rglob("*.py"):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                      and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        words = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                words.append(node.id)
            elif isinstance(node, ast.Attribute):
                words.append(node.attr)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                words.append(node.name)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                words.append(node.value)
        found = sorted({m.group(0) for w in words for m in family.finditer(w)})
        assert not found, f"{path.relative_to(ROOT)} names {found}"
