"""Step caching and reuse: SageMaker's CacheConfig, "retry pipeline execution" and selective execution.

Every step run records a content key in MLflow (`keel.cache.key`) and its return value
(`keel/output.json`). The key is built from parts, so a miss can say which part changed:

- `code:<module.function>`: the step's function and every function, class and constant it reaches
  (followed through globals and module attributes) in the step's own package (the top package of
  its module, wherever it lives), this project's packages and any the step names
  (`CacheConfig(code_packages=...)`), as ASTs, so a comment or a reformat does not count as a
  change. Bookkeeping modules (lineage, this one) are left out.
- `param:<name>`: each argument, with data references replaced by placeholders;
- `input:<name>`: the content digest of each `DatasetRef` (not its path: rewriting a file in place
  changes the key) and the id of each logged model (MLflow models are immutable);
- `lib:<name>`: the versions of the libraries that shape results (`CacheConfig(libraries=...)`;
  LIBRARIES by default), and Python's.

A step reuses earlier outputs only after checking they are still there: every `DatasetRef` is
digested again and every logged model must still exist. Prefect's own task cache is not used: it
keys on arguments (paths, not content), cannot check outputs, and knows nothing of MLflow lineage.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import inspect
import json
import platform
import sys
import tempfile
import textwrap
import time
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from tasks.steps.definitions import PARSING, fingerprint, top_level, tree_fingerprint
from tasks.steps.refs import Ref
from tasks.steps.run_lookup import FoundRun, finished_runs
from tasks.steps.tags import (
    KEY_TAG,
    PARENT_TAG,
    PRODUCED_TAG,
    SOURCE_EXECUTION_TAG,
    SOURCE_RUN_TAG,
    STEP_TAG,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

NOT_KEYED = "not_keyed"  # Field(json_schema_extra={NOT_KEYED: True}): lineage only, not content
OUTPUT_ARTIFACT = "keel/output.json"
KEY_ARTIFACT = "keel/cache_key.json"

LIBRARIES = ("lightgbm", "numpy", "pandas", "pyarrow", "dask", "optuna", "mlflow", "scikit-learn")
OUR_PACKAGES = ("tasks", "flows")
# Record what ran and where; never change what a step computes.
SHOWN_CHARS = 60  # a value in a cache reason, at most
SHOWN_CHANGES = 4  # changed key parts a miss names, at most
BOOKKEEPING = frozenset(
    {
        "tasks.steps.lineage",
        "tasks.steps.base",
        "tasks.steps.cache",
        "tasks.steps.retry",
        "tasks.steps.compute",
        "tasks.steps.settings",
    }
)


class CacheConfig(BaseModel):
    """Whether a step's outputs may be reused by a later execution with the same key, and for how long."""

    model_config = ConfigDict(frozen=True)

    enabled: bool = True
    expire_after: timedelta | None = Field(
        default=None, description="Reuse only outputs produced this recently (ISO 8601, e.g. P30D)."
    )
    ignore: tuple[str, ...] = Field(
        default=(),
        description="Arguments that say where outputs go, not what they are (left out of the key).",
    )
    code_packages: tuple[str, ...] = Field(
        default=(),
        description="More packages whose code the key covers, beside the step's own package and ours "
        "(e.g. a shared library of your team's that the step calls).",
    )
    libraries: tuple[str, ...] = Field(
        default=LIBRARIES,
        description="Installed distributions whose versions are part of the key (a new version: a miss).",
    )

    def packages_of(self, fn: Callable[..., Any]) -> tuple[str, ...]:
        """The top-level packages whose code the key of `fn`'s step covers."""
        own = module_name(getattr(fn, "__module__", None)).split(".")[0]
        return tuple(sorted({own, *OUR_PACKAGES, *self.code_packages}))


def module_name(module: str | None) -> str:
    """A module's import name; `__main__` (run with `python -m pkg.mod`) as `pkg.mod`, so a step keys
    the same whether its module runs as a program or is imported."""
    if module == "__main__":
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        return spec.name if spec is not None else "__main__"
    return module or "__main__"


NO_CACHE = CacheConfig(enabled=False)


class CacheKey(BaseModel):
    parts: dict[str, str]

    @functools.cached_property
    def digest(self) -> str:
        text = json.dumps(self.parts, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def changes_from(self, earlier: Mapping[str, str]) -> list[str]:
        """What differs from an earlier key, most telling first (inputs, params, code, libraries)."""
        order = ("input:", "param:", "code:", "lib:", "step")
        changes = []
        for name in sorted(set(self.parts) | set(earlier), key=lambda n: (_rank(n, order), n)):
            before, now = earlier.get(name), self.parts.get(name)
            if before == now:
                continue
            if before is None:
                changes.append(f"{name} is new")
            elif now is None:
                changes.append(f"{name} is gone")
            elif name.startswith("code:"):
                changes.append(f"{name} changed")
            else:
                changes.append(f"{name} changed ({_short(before)} -> {_short(now)})")
        return changes


def _rank(name: str, order: tuple[str, ...]) -> int:
    return next((i for i, prefix in enumerate(order) if name.startswith(prefix)), len(order))


def _short(value: str) -> str:
    return (
        value
        if len(value) <= SHOWN_CHARS
        else value[: SHOWN_CHARS // 2 - 2] + "..." + value[-(SHOWN_CHARS // 2 - 2) :]
    )


# --- the key --------------------------------------------------------------------------------------


def canonical(value: Any) -> Any:
    """An argument as plain JSON data, with data references replaced by placeholders (they are
    keyed by content as `input:` parts)."""
    if isinstance(value, Ref):
        return f"<{type(value).__name__.removesuffix('Ref').lower()}>"
    if isinstance(value, BaseModel):
        return {
            name: canonical(getattr(value, name))
            for name, field in type(value).model_fields.items()
            if (field.json_schema_extra or {}).get(NOT_KEYED) is not True  # type: ignore[union-attr]
        }
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = [canonical(v) for v in value]
        return sorted(items, key=json.dumps) if isinstance(value, set | frozenset) else items
    plain = value.value if isinstance(value, Enum) else value
    return str(plain) if isinstance(plain, date | timedelta | Path) else plain


def input_parts(name: str, value: Any) -> dict[str, str]:
    from tasks.steps.base import find_refs

    return {f"input:{path}": ref.key_part() for path, ref in find_refs(value, name).items()}


def step_key(
    step_name: str, fn: Callable[..., Any], arguments: Mapping[str, Any], config: CacheConfig | None = None
) -> CacheKey:
    config = config or CacheConfig()
    parts = {"step": step_name, **code_parts(fn, config.packages_of(fn)), **library_parts(config.libraries)}
    for name, value in arguments.items():
        if name in config.ignore:
            continue
        parts.update(input_parts(name, value))
        parts[f"param:{name}"] = json.dumps(canonical(value), sort_keys=True, default=str)
    return CacheKey(parts=parts)


@functools.cache
def library_parts(libraries: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    parts = {"lib:python": platform.python_version()}
    for name in libraries:
        try:
            parts[f"lib:{name}"] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            parts[f"lib:{name}"] = "absent"
    return parts


CONSTANT_TYPES = (bool, int, float, str, bytes, tuple, list, dict, set, frozenset)


def _stable_repr(value: Any) -> str:
    """repr, with sets sorted (their order changes with the process's hash seed)."""
    if isinstance(value, set | frozenset):
        return "{" + ", ".join(sorted(_stable_repr(v) for v in value)) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_stable_repr(k)}: {_stable_repr(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_stable_repr(v) for v in value) + "]"
    if inspect.isfunction(value):  # e.g. a lambda in a table: its bytecode, not its address
        code = value.__code__
        consts = [c for c in code.co_consts if not isinstance(c, types.CodeType)]
        return f"<function {code.co_code.hex()} {code.co_names} {consts!r}>"
    return repr(value)


def _covered(module: str | None, packages: tuple[str, ...]) -> bool:
    return module is not None and module.split(".")[0] in packages and module not in BOOKKEEPING


def _codes(code: types.CodeType):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


@functools.cache
def code_parts(fn: Callable[..., Any], packages: tuple[str, ...] = OUR_PACKAGES) -> dict[str, str]:
    """Fingerprints of the step function and of the code it reaches in `packages` (top-level names)."""
    found: dict[str, str] = {}

    def visit(obj: Any) -> None:
        obj = getattr(obj, "fn", obj) if type(obj).__name__ == "Step" else obj
        if isinstance(obj, types.ModuleType) or not (inspect.isfunction(obj) or inspect.isclass(obj)):
            return
        module = getattr(obj, "__module__", None)
        if module is None or not _covered(module_name(module), packages):
            return
        name = f"code:{module_name(module)}.{obj.__qualname__}"
        if name not in found:
            found[name] = _source_fingerprint(obj)
            for owner, attr, target in _reached(obj, module, packages):
                visit_named(owner, attr, target)

    def visit_named(module: str, name: str, target: Any) -> None:
        if not isinstance(target, CONSTANT_TYPES):
            visit(target)
        elif _covered(module_name(module), packages) and name.isupper():  # module constants: UPPER_CASE
            found[f"code:{module_name(module)}.{name}"] = fingerprint(_stable_repr(target))

    visit(fn)
    return found


def _source_fingerprint(obj: Any) -> str:
    """A function's or class's syntax tree, hashed: comments and layout do not count."""
    try:
        found = _top_level_fingerprint(obj)
        if found is not None:
            return found
        source = textwrap.dedent(inspect.getsource(obj))
        with PARSING:
            return tree_fingerprint(ast.parse(source))
    except (OSError, TypeError, SyntaxError):
        return "unavailable"


def _top_level_fingerprint(obj: Any) -> str | None:
    """A class's or function's fingerprint from its module's table (`tasks.steps.definitions`: kept
    across processes), the same as parsing its own source (what `inspect.getsource` gives) without
    `inspect` parsing the whole module again for every class and tokenizing every function (0.1 s
    for one class of a large module). Top-level definitions only (an indented one's source is
    dedented first, which changes its strings); None where the name does not lead to it (a method,
    a definition under an `if`, a function whose first line is not the definition's): the caller
    reads its source instead."""
    function = getattr(inspect.unwrap(obj), "__code__", None) if inspect.isfunction(obj) else None
    if (function is None and not inspect.isclass(obj)) or "." in obj.__qualname__:
        return None
    file = inspect.getsourcefile(obj)
    if file is None:
        return None
    found = top_level(file).get(obj.__qualname__)
    if found is None:
        return None
    first, fingerprint = found
    if function is not None and first != function.co_firstlineno:
        return None
    return fingerprint


def _reached(obj: Any, module: str, packages: tuple[str, ...]) -> list[tuple[str, str, Any]]:
    """(module, name, value) of every global a function (or a class's methods) uses; through a module
    of `packages`, each of its attributes the code names."""
    namespace = sys.modules[module].__dict__ if module in sys.modules else {}
    functions = [obj] if inspect.isfunction(obj) else [v for v in vars(obj).values() if inspect.isfunction(v)]
    reached = []
    for function in functions:
        names = {n for code in _codes(function.__code__) for n in code.co_names}
        scope = {**namespace, **function.__globals__}
        for n in names:
            target = scope.get(n)
            if not isinstance(target, types.ModuleType):
                reached.append((module, n, target))
            elif _covered(target.__name__, packages):
                reached += [(target.__name__, attr, getattr(target, attr, None)) for attr in names]
    return reached


# --- outputs: save, load, check -------------------------------------------------------------------


class UnstorableOutput(TypeError):
    """A step returns something that cannot pass between steps (it is not a reference, a model or JSON)."""


@functools.cache
def _adapter(fn: Callable[..., Any]) -> TypeAdapter:
    """A validator for the step's return annotation (only that one is resolved: parameters may name
    types imported for type checkers alone). DataFrames are stored and passed on as `DatasetRef`."""
    from pydantic.errors import PydanticSchemaGenerationError

    from tasks.steps.artifacts import stored_type

    annotation = fn.__annotations__.get("return", Any)
    if isinstance(annotation, str):
        annotation = eval(annotation, fn.__globals__)  # what typing.get_type_hints does
    try:
        return TypeAdapter(stored_type(annotation))
    except PydanticSchemaGenerationError as exc:
        raise UnstorableOutput(unstorable(fn, annotation)) from exc


def unstorable(fn: Callable[..., Any], what: Any) -> str:
    return (
        f"step {fn.__qualname__} returns {getattr(what, '__name__', what)}, which cannot be passed to the "
        "next step: return a reference (DatasetRef, ModelRef), a pydantic model or plain JSON values. "
        "A pandas or Dask DataFrame is stored as Parquet for you and passed on as a DatasetRef; log a "
        "model with tasks.steps.log_model, which returns a ModelRef."
    )


def check_output_type(fn: Callable[..., Any]) -> None:
    """Refuse a step whose return annotation cannot be stored, before its work is done."""
    _adapter(fn)


def save_output(
    client: MlflowClient, artifact_root: str, fn: Callable[..., Any], key: CacheKey, result: Any
) -> None:
    """The step's return value and its key, as artifacts of its run (one upload, to the run's
    artifact URI as its creation returned it: MLflow's `log_artifacts` would ask the store again)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from pydantic_core import PydanticSerializationError

    try:
        output = _adapter(fn).dump_json(result)
    except PydanticSerializationError as exc:
        raise UnstorableOutput(unstorable(fn, type(result))) from exc
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "keel"
        folder.mkdir()
        (folder / "output.json").write_bytes(output)
        (folder / "cache_key.json").write_text(json.dumps(key.parts, indent=1, sort_keys=True))
        repository = get_artifact_repository(artifact_root, tracking_uri=client.tracking_uri)
        repository.log_artifacts(str(folder), "keel")


def load_artifact(client: MlflowClient, run: FoundRun, path: str) -> bytes | None:
    """One of our small artifacts of a run (None if it is not there). An embedded store's artifacts
    are local files, read as they are: MLflow's download (a temporary copy, a listing, a progress
    bar) took about 35 ms of a step's 85 (B1); other stores are downloaded."""
    from urllib.parse import unquote, urlparse

    from mlflow.exceptions import MlflowException

    location = urlparse(run.artifact_uri)
    if location.scheme == "file":
        try:
            return (Path(unquote(location.path)) / path).read_bytes()
        except OSError:
            return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return Path(client.download_artifacts(run.run_id, path, tmp)).read_bytes()
        except (MlflowException, OSError):
            return None


def missing_outputs(client: MlflowClient, value: Any) -> str | None:
    """Why earlier outputs cannot be reused (gone or changed), or None if they all check out."""
    from tasks.steps.base import find_refs

    for name, ref in find_refs(value, "output").items():
        problem = ref.problem(client)
        if problem is not None:
            return f"{name}: {problem}"
    return None


# --- finding outputs to reuse ---------------------------------------------------------------------


@dataclass(frozen=True)
class Reuse:
    """Outputs to take instead of running: from which run and execution, and how they were found."""

    how: str  # "hit" (cache) or "reused" (from a named execution)
    run_id: str
    execution: str
    value: Any
    message: str


def _source(run: FoundRun) -> tuple[str, str]:
    """The run that really produced the outputs (a reused run points at its own source)."""
    return (
        run.tags.get(SOURCE_RUN_TAG, run.run_id),
        run.tags.get(SOURCE_EXECUTION_TAG, run.tags.get(PARENT_TAG, "")),
    )


# the tags read of the runs found: whose outputs they are, and their key
_READ_TAGS = (KEY_TAG, SOURCE_RUN_TAG, SOURCE_EXECUTION_TAG, PARENT_TAG)


def _take(client: MlflowClient, run: FoundRun, fn: Callable[..., Any]) -> tuple[Any, str | None]:
    raw = load_artifact(client, run, OUTPUT_ARTIFACT)
    if raw is None:
        return None, f"run {run.run_id} stored no output"
    try:
        value = _adapter(fn).validate_json(raw)
    except ValueError as exc:
        return (
            None,
            f"run {run.run_id} stored an output this code cannot read ({exc.__class__.__name__})",
        )
    return value, missing_outputs(client, value)


def find_cached(
    client: MlflowClient,
    experiment_id: str,
    key: CacheKey,
    fn: Callable[..., Any],
    expire_after: timedelta | None,
) -> tuple[Reuse | None, str]:
    """The newest earlier run with this key whose outputs still check out; else why not."""
    since = None
    if expire_after is not None:
        since = int((time.time() - expire_after.total_seconds()) * 1000)
    runs = finished_runs(
        client,
        experiment_id,
        {KEY_TAG: key.digest, PRODUCED_TAG: "true"},
        limit=5,
        since_ms=since,
        read_tags=_READ_TAGS,
    )
    problems = []
    for run in runs:
        value, problem = _take(client, run, fn)
        if problem is None:
            run_id, execution = _source(run)
            age = (time.time() * 1000 - run.start_time) / 60000
            message = f"outputs of run {run_id} (execution {execution}, {age:.0f} min ago)"
            return Reuse("hit", run_id, execution, value, message), message
        problems.append(problem)
    if problems:
        return None, "earlier outputs with this key cannot be used: " + "; ".join(problems)
    return None, explain_miss(client, experiment_id, key, expire_after)


def explain_miss(
    client: MlflowClient, experiment_id: str, key: CacheKey, expire_after: timedelta | None
) -> str:
    """Compare with the newest earlier run of the same step: which parts of the key changed."""
    step = key.parts["step"]
    runs = finished_runs(
        client, experiment_id, {STEP_TAG: step, PRODUCED_TAG: "true"}, limit=1, read_tags=_READ_TAGS
    )
    if not runs:
        return f"no earlier finished run of step {step!r}"
    earlier = runs[0]
    if earlier.tags.get(KEY_TAG) == key.digest:  # same key, so it is too old
        return f"the last outputs with this key (run {earlier.run_id}) are older than {expire_after}"
    raw = load_artifact(client, earlier, KEY_ARTIFACT)
    if raw is None:
        return f"the last run of {step!r} ({earlier.run_id}) recorded no key"
    changes = key.changes_from(json.loads(raw))
    more = f" and {len(changes) - SHOWN_CHANGES} more" if len(changes) > SHOWN_CHANGES else ""
    return f"since run {earlier.run_id}: " + "; ".join(changes[:4]) + more


def find_in_execution(
    client: MlflowClient, experiment_id: str, execution: str, key: CacheKey, fn: Callable[..., Any]
) -> tuple[Reuse | None, str]:
    """This step's finished run in a named execution, if its key matches and its outputs check out."""
    step = key.parts["step"]
    runs = finished_runs(
        client, experiment_id, {PARENT_TAG: execution, STEP_TAG: step}, limit=1, read_tags=_READ_TAGS
    )
    if not runs:
        return None, f"it did not finish in execution {execution}"
    run = runs[0]
    if run.tags.get(KEY_TAG) != key.digest:
        raw = load_artifact(client, run, KEY_ARTIFACT)
        changes = key.changes_from(json.loads(raw)) if raw else ["no key recorded"]
        return None, f"its inputs differ from execution {execution}'s: " + "; ".join(changes[:4])
    value, problem = _take(client, run, fn)
    if problem is not None:
        return None, f"its outputs in execution {execution} cannot be reused: {problem}"
    run_id, source_execution = _source(run)
    message = f"outputs of run {run_id} (execution {source_execution}), taken from execution {execution}"
    return Reuse("reused", run_id, source_execution, value, message), ""
