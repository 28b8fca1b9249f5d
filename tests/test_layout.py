"""The layout the code keeps: helpers/ is plumbing that knows no script, each module short enough to read at once."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"sft", "dpo", "grpo", "agrl", "eval"}
HELPERS = sorted((ROOT / "helpers").glob("*.py"))


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", HELPERS, ids=lambda p: p.name)
def test_no_helpers_module_imports_a_script(path):
    assert not imported_modules(path) & SCRIPTS, f"{path.name} imports {imported_modules(path) & SCRIPTS}"


@pytest.mark.parametrize("path", HELPERS, ids=lambda p: p.name)
def test_no_helpers_module_probes_a_scripts_flags(path):
    """A helper reads the common flags (helpers/flags.py) or takes explicit parameters, never getattr(args, ...)."""
    probes = [
        node.lineno
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("getattr", "hasattr")
        and node.args
        and isinstance(node.args[0], ast.Name)
        and node.args[0].id == "args"
    ]
    assert not probes, f"{path.name} probes args on lines {probes}"


def test_modules_stay_short():
    lengths = {p.name: len(p.read_text().splitlines()) for p in HELPERS}
    assert max(lengths.values()) <= 450, lengths
    assert len((ROOT / "eval.py").read_text().splitlines()) <= 600
