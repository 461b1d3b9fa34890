"""Command lines generated from a flow's pydantic parameters, so `--help` can never drift from them."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import sys
import threading
import types
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, NoReturn, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from tasks.steps.errors import DataValidationError, NotInRegistry, StepFailed
from tasks.steps.params import flat_fields, groups, nest

M = TypeVar("M", bound=BaseModel)
R = TypeVar("R")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap(annotation: Any) -> Any:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def build_parser(model: type[BaseModel], prog: str, description: str) -> argparse.ArgumentParser:
    """One flag per field; the fields of a parameter group (`tasks.steps.params`) are flags of their
    own names, listed under the group's title in `--help`."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    sections = {
        name: parser.add_argument_group(name, group.__doc__.split("\n")[0] if group.__doc__ else None)
        for name, group in groups(model).items()
    }
    for name, (group, field) in flat_fields(model).items():
        kwargs, default = _argument(field)
        help_text = field.description or ""
        help_text = f"{help_text} (default: {default})" if help_text else f"(default: {default})"
        target = sections[group] if group else parser
        target.add_argument(_flag(name), dest=name, help=help_text.replace("%", "%%"), **kwargs)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def _argument(field: FieldInfo) -> tuple[dict[str, Any], Any]:
    """argparse's keywords for a field, and its default as `--help` shows it."""
    kind = _unwrap(field.annotation)
    default = field.get_default(call_default_factory=True)
    kwargs: dict[str, Any] = {"default": argparse.SUPPRESS}
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(kind) is Literal:
        kwargs["choices"] = [str(c) for c in typing.get_args(kind)]
    elif typing.get_origin(kind) in (list, tuple):
        kwargs["nargs"] = "*"
        kwargs["metavar"] = "VALUE"
    elif typing.get_origin(kind) is dict or (isinstance(kind, type) and issubclass(kind, BaseModel)):
        kwargs["type"] = json.loads
        kwargs["metavar"] = "JSON"
        default = json.dumps(
            default.model_dump(mode="json")
            if isinstance(default, BaseModel)
            else {
                k: v.model_dump(mode="json") if isinstance(v, BaseModel) else v
                for k, v in (default or {}).items()
            }
        )
    return kwargs, default


def run_flow_cli(  # noqa: PLR0913  # the command line's whole description, the optional part by keyword
    flow_fn: Callable[[M], R],
    model: type[M],
    argv: Sequence[str] | None,
    prog: str,
    description: str,
    summary: Callable[[R], str],
    *,
    after_bad_input: str = "nothing trained or registered",
    prepare_params: Callable[[M, dict[str, Any]], M] | None = None,
    check_params: Callable[[M], object] | None = None,
    preload: Callable[[M], Sequence[str]] | None = None,
) -> int:
    """Parse, run the flow, print `summary(result)`. Exit codes: 0 done, 1 failed on purpose (a
    FailStep) or something needed is not in the registry, 2 bad input; anything else propagates
    with its traceback. `prepare_params`: completes the parsed parameters, given the values the user
    gave (e.g. from an earlier run);
    `check_params`: refuses them with a ValueError (exit 2, before anything runs); `preload`: the
    modules the run's steps will import in this process (`services_opened_together`)."""
    given: dict[str, Any] = {}
    params = parse_params(model, argv, prog, description, check_params, given)
    configure_logging()
    try:
        servers = warm_pool_if_asked()
    except ValidationError as exc:  # a KEEL_ setting that is not valid: said plainly, nothing run
        problems = "; ".join(f"KEEL_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        print(f"\nbad settings, nothing was run: {problems}", file=sys.stderr)
        return 2
    modules = functools.partial(preload, params) if preload is not None else tuple
    with servers, services_opened_together(modules):
        try:
            if prepare_params is not None:
                params = prepare_params(params, given)
            result = flow_fn(params)
        except DataValidationError as exc:
            print(f"\nbad input, {after_bad_input}: {exc}", file=sys.stderr)
            return 2
        except NotInRegistry as exc:
            print(f"\n{exc}", file=sys.stderr)
            return 1
        except StepFailed as exc:
            print(f"\n{getattr(flow_fn, 'name', prog)} failed: {exc}", file=sys.stderr)
            return 1
    print("\n" + summary(result))
    return 0


def warm_pool_if_asked() -> contextlib.AbstractContextManager[None]:
    """With `KEEL_WARM_POOL` and no servers named: this run uses the warm pool (`tasks.steps.warm_pool`)."""
    from prefect.settings import PREFECT_API_URL

    from tasks.steps.settings import get_settings

    settings = get_settings()
    if not settings.warm_pool or PREFECT_API_URL.value() or settings.dask_scheduler_address:
        return contextlib.nullcontext()
    from tasks.steps.warm_pool import join_warm_pool, using_servers

    return using_servers(join_warm_pool(settings.state_dir / "pool", settings.warm_pool))


@contextlib.contextmanager
def services_opened_together(preload: Callable[[], Sequence[str]] = tuple) -> Iterator[None]:
    """Start what a run talks to side by side, not one after the other as the flow first uses each:
    without PREFECT_API_URL, the run's temporary Prefect server (`infra.temporary_server`, started
    by the command's `__main__` block already, else now; 4-5 s to start here on a database from
    `infra.prefect_home`) starts in the background while an embedded MLflow store opens (a new one
    creates its tables for about 2.5 s) and the libraries the run's steps will import in this process
    (named by `preload()`) are imported; the run then uses that server. Then the garbage collector,
    paused by the command's first line (`infra.command`), runs again.
    Failures of the store and of the imports are left to the flow, which reports them where it uses
    them."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as STARTUP_TIMEOUT

    from infra.collector import resume_collection
    from infra.temporary_server import discard_early_server, start_temporary_server
    from tasks.steps.lineage import mlflow_client
    from tasks.steps.settings import get_settings
    from tasks.steps.warm_pool import using_servers

    server, imports = None, None
    if not PREFECT_API_URL.value() and PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        server = start_temporary_server()
        imports = threading.Thread(target=_import_quietly, args=(preload,), daemon=True)
        imports.start()  # while the server starts on the other core; joined before the flow imports too
    else:
        discard_early_server()
    with contextlib.suppress(Exception):
        settings = get_settings()
        if settings.embedded_mlflow:  # a server is up already (or the flow says it is not)
            mlflow_client(settings).search_experiments(max_results=1)
    if server is None or imports is None:
        resume_collection()
        yield
        return
    url = server.wait_until_ready(STARTUP_TIMEOUT.value())
    imports.join()
    resume_collection()  # the run's libraries are imported: the collector's pause ends
    with using_servers({"PREFECT_API_URL": url}):
        yield


def _import_quietly(modules: Callable[[], Sequence[str]]) -> None:
    """Import the `modules()` now; one that fails is left for the step that imports it to report."""
    import importlib

    with contextlib.suppress(Exception):
        for name in modules():
            with contextlib.suppress(Exception):
                importlib.import_module(name)


def exit_process(code: int) -> NoReturn:
    """End a command-line run as the interpreter would, minus its last step: threads are joined and
    exit handlers run (Prefect stops its temporary server and sends its last logs and events, MLflow
    and Dask close), output is flushed; then the process ends without tearing down every module one
    by one, which took 1.6-2.8 s here with MLflow, Evidently, Prefect and Dask loaded."""
    import atexit

    shutdown = getattr(threading, "_shutdown", None)  # what the interpreter calls first on exit
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def configure_logging() -> None:
    """Our INFO lines (cluster, steps) and Prefect's run logs; Dask's start-up chatter only if it warns."""
    import dask

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bars in every log line
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # `distributed` sets its loggers from Dask's config when first imported; spawned LocalCluster
    # workers read it from the environment. A user's own DASK_LOGGING__DISTRIBUTED wins.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    level = os.environ["DASK_LOGGING__DISTRIBUTED"]
    dask.config.set({"logging.distributed": level})
    logging.getLogger("distributed").setLevel(level.upper())
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(_one_line_for_intended_failures)


def _one_line_for_intended_failures(record: logging.LogRecord) -> bool:
    """Bad input and a FailStep end a run on purpose with a message that says it all (printed once
    more at the end): Prefect logs them in one line, without the traceback."""
    failure = record.exc_info[1] if record.exc_info else None
    if isinstance(failure, DataValidationError | StepFailed | NotInRegistry):
        record.exc_info, record.exc_text = None, None
    return True


def parse_params(
    model: type[M],
    argv: Sequence[str] | None,
    prog: str,
    description: str,
    check: Callable[[M], object] | None = None,
    given: dict[str, Any] | None = None,
) -> M:
    """Parse `argv` into `model`; bad values end the program with the field and the reason.
    `given`: filled with the values as given on the command line."""
    parser = build_parser(model, prog, description)
    values = vars(parser.parse_args(argv))
    if given is not None:
        given.update(values)
    try:
        params = model.model_validate(nest(model, values))
        if check is not None:
            check(params)
        return params
    except ValueError as exc:
        if not isinstance(exc, ValidationError):
            parser.error(str(exc))
            raise

        grouped = groups(model)
        problems = "; ".join(
            (f"{_flag(name)}: " if (name := _flat_name(e["loc"], grouped)) else "")
            + e["msg"].removeprefix("Value error, ")
            for e in exc.errors()
        )
        parser.error(problems)
        raise  # unreachable: parser.error exits


def _flat_name(loc: tuple[int | str, ...], grouped: Mapping[str, Any]) -> str | None:
    """The flag a validation error is about: a group's field by its own (flat) name; none for an
    error about the whole model or a whole group (its message names the flags)."""
    if not loc:
        return None
    if loc[0] in grouped:
        return str(loc[1]) if len(loc) > 1 else None
    return str(loc[0])
