"""The layout the architecture promises, checked: every module of `tasks` in one of its three layers,
and every MLflow tag, alias and event name written as the one constant of `tasks.steps.tags`."""

from __future__ import annotations

import ast
from pathlib import Path

from tasks.steps import tags

ROOT = Path(__file__).resolve().parents[2]
LAYERS = {"steps", "tabular", "monitoring"}


def test_every_module_of_tasks_is_in_one_of_its_layers():
    loose = sorted(p.name for p in (ROOT / "tasks").glob("*.py") if p.name != "__init__.py")
    assert loose == []
    packages = {p.name for p in (ROOT / "tasks").iterdir() if (p / "__init__.py").exists()}
    assert packages == LAYERS


def _string_constants(path: Path):
    """Every string literal that is not a docstring, with its line."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_tag_alias_and_event_names_are_spelled_once():
    """A name spelled out twice drifts apart (the model digest was once written under two names)."""
    names = {v: k for k, v in vars(tags).items() if k.isupper() and k != "CHAMPION_ALIAS"}
    spelled = [
        f"{path.relative_to(ROOT)}:{line}: {value!r} is {names[value]}"
        for folder in ("tasks", "flows", "deployments")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path != ROOT / "tasks" / "steps" / "tags.py"
        for line, value in _string_constants(path)
        if value in names
    ]
    assert spelled == []


def test_the_champion_alias_is_the_constant_wherever_an_alias_is_used():
    literal = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for folder in ("tasks", "flows", "deployments")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and "alias" in node.func.attr
        and any(isinstance(a, ast.Constant) and a.value == tags.CHAMPION_ALIAS for a in node.args)
    ]
    assert literal == []
