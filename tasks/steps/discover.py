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
from typing import TYPE_CHECKING, Any

from tasks.steps.cache import OUR_PACKAGES

if TYPE_CHECKING:
    from tasks.steps.base import Step

NAMED_BY_ARGUMENT = ("condition", "fail")  # framework functions whose first argument names the step


def steps_of(fn: Callable[..., Any]) -> tuple[str, ...]:
    """The names of the steps `fn` runs (or may run), in the order its code mentions them."""
    from tasks.steps.base import Step

    return tuple(found.name if isinstance(found, Step) else found for found in _mentioned(fn))


def step_objects_of(fn: Callable[..., Any]) -> tuple[Step[Any, Any], ...]:
    """The steps `fn` runs that are step objects (not `condition` or `fail` names), in order."""
    from tasks.steps.base import Step

    return tuple(found for found in _mentioned(fn) if isinstance(found, Step))


def _mentioned(fn: Callable[..., Any]) -> list[Step[Any, Any] | str]:
    """The steps `fn`'s code mentions: step objects, and the names given to `condition`/`fail`."""
    from tasks.steps.base import Step

    packages = {fn.__module__.split(".")[0], *OUR_PACKAGES}
    found: list[Step[Any, Any] | str] = []
    names: set[str] = set()
    seen: set[Any] = set()

    def add(item: Step[Any, Any] | str) -> None:
        name = item.name if isinstance(item, Step) else item
        if name not in names:
            names.add(name)
            found.append(item)

    def walk(function: Any) -> None:
        if function in seen or not inspect.isfunction(function):
            return
        seen.add(function)
        tree = _parsed(function) if (function.__module__ or "").split(".")[0] in packages else None
        if tree is None:
            return
        scope = {**vars(inspect.getmodule(function) or types.ModuleType("_")), **function.__globals__}
        for node in _in_order(tree):
            if isinstance(node, ast.Call):
                named = _named_by_argument(node, scope)
                if named:
                    add(named)
            elif isinstance(node, ast.Name | ast.Attribute) and isinstance(node.ctx, ast.Load):
                target = _resolve(node, scope)
                if isinstance(target, Step):
                    add(target)
                elif inspect.isfunction(target) and getattr(target, "__name__", "") not in NAMED_BY_ARGUMENT:
                    walk(target)

    walk(inspect.unwrap(fn))
    return found


def _parsed(function: Any) -> ast.AST | None:
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return None


def _resolve(node: ast.expr, scope: dict[str, Any]) -> Any:
    """What a name or a dotted name (through modules and steps: `step.submit`) stands for."""
    from tasks.steps.base import Step

    if isinstance(node, ast.Name):
        return scope.get(node.id)
    if isinstance(node, ast.Attribute):
        owner = _resolve(node.value, scope)
        if isinstance(owner, types.ModuleType | Step):
            return getattr(owner, node.attr, None)
    return None


def _named_by_argument(call: ast.Call, scope: dict[str, Any]) -> str | None:
    """The step a framework `condition("name", ...)` or `fail("name", ...)` call names, if literal."""
    called = _resolve(call.func, scope)
    if getattr(called, "__name__", None) not in NAMED_BY_ARGUMENT:
        return None
    if not (getattr(called, "__module__", None) or "").startswith("tasks.steps"):
        return None
    first = call.args[0] if call.args else None
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def _in_order(tree: ast.AST):
    """Every node, depth first in source order (ast.walk goes breadth first)."""
    yield tree
    for child in ast.iter_child_nodes(tree):
        yield from _in_order(child)
