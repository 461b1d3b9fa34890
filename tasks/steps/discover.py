"""The steps of a pipeline, read from its code: no hand-kept list to fall out of date.

The pipeline function's source is walked in order. A name that is a step (or `step.submit`) adds
that step; `condition("name", ...)` and `fail("name", ...)` with a literal name add theirs; a
function of the pipeline's own package or of ours is walked in turn (a helper that runs steps).
Another pipeline called inside (a sub-flow) keeps its steps to itself.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import types
from collections.abc import Callable
from typing import Any

from tasks.steps.cache import OUR_PACKAGES

NAMED_BY_ARGUMENT = ("condition", "fail")  # framework functions whose first argument names the step


def steps_of(fn: Callable[..., Any]) -> tuple[str, ...]:
    """The names of the steps `fn` runs (or may run), in the order its code mentions them."""
    from tasks.steps.base import Step

    packages = {fn.__module__.split(".")[0], *OUR_PACKAGES}
    found: list[str] = []
    seen: set[Any] = set()

    def add(name: str) -> None:
        if name not in found:
            found.append(name)

    def resolve(node: ast.expr, scope: dict[str, Any]) -> Any:
        if isinstance(node, ast.Name):
            return scope.get(node.id)
        if isinstance(node, ast.Attribute):
            owner = resolve(node.value, scope)
            if isinstance(owner, types.ModuleType | Step):
                return getattr(owner, node.attr, None)
        return None

    def walk(function: Any) -> None:
        if function in seen or not inspect.isfunction(function):
            return
        seen.add(function)
        if (function.__module__ or "").split(".")[0] not in packages:
            return
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
        except (OSError, TypeError, SyntaxError):
            return
        scope = {**vars(inspect.getmodule(function) or types.ModuleType("_")), **function.__globals__}
        for node in _in_order(tree):
            if isinstance(node, ast.Call):
                called = resolve(node.func, scope)
                name = getattr(called, "__name__", None)
                if (
                    name in NAMED_BY_ARGUMENT
                    and (called.__module__ or "").startswith("tasks.steps")
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)
                ):
                    add(node.args[0].value)
            elif isinstance(node, ast.Name | ast.Attribute) and isinstance(node.ctx, ast.Load):
                target = resolve(node, scope)
                if isinstance(target, Step):
                    add(target.name)
                elif inspect.isfunction(target) and getattr(target, "__name__", "") not in NAMED_BY_ARGUMENT:
                    walk(target)

    walk(inspect.unwrap(fn))
    return tuple(found)


def _in_order(tree: ast.AST):
    """Every node, depth first in source order (ast.walk goes breadth first)."""
    yield tree
    for child in ast.iter_child_nodes(tree):
        yield from _in_order(child)
