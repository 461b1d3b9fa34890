"""The machinery shared by every step kind.

A step is a typed plain function marked with its kind. Called inside a pipeline execution, it runs
as a Prefect task run named after the step (so the Prefect UI draws the pipeline's graph) and owns
one MLflow child run under the execution's parent run. `DatasetRef` arguments are logged as the
run's inputs (`log_input`, with digest and URI); references in the return value are tagged as its
outputs. Retries of the task resume the same MLflow run (found by the Prefect task-run id), so a
retried step leaves one run behind with its attempt count.

Before the function runs, the step looks for outputs it may reuse (`tasks.steps.cache`): from the
execution named in the plan (resume, selective execution), else from its cache if it has one. A
reused step still gets its MLflow run, tagged with the run that produced the outputs, and ends in
Prefect as `Cached` or `Reused`; a step that runs says why in its state message.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeVar, overload

from pydantic import BaseModel

from tasks.steps import cache, lineage
from tasks.steps.artifacts import store_frames
from tasks.steps.cache import NO_CACHE, CacheConfig
from tasks.steps.kinds import StepKind, task_run_name
from tasks.steps.refs import DatasetRef, Ref
from tasks.steps.retry import NO_RETRY, RetryPolicy
from tasks.steps.tags import (
    ATTEMPTS_TAG,
    ERROR_TAG,
    KEY_TAG,
    PIPELINE_TAG,
    PRODUCED_TAG,
    REASON_TAG,
    SOURCE_EXECUTION_TAG,
    SOURCE_RUN_TAG,
    STATUS_TAG,
    STEP_KIND_TAG,
    STEP_TAG,
    TASK_RUN_ID_TAG,
)

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient
    from prefect.futures import PrefectFuture

P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class StepRun:
    """The MLflow run of the step that is running now; step code logs through it."""

    client: MlflowClient
    run_id: str
    step: str
    kind: StepKind
    artifact_root: str  # the run's artifact URI, known from its creation
    # What the step's machinery records about the run, written with the run's end in one batch (on
    # failure too): the arguments as parameters, and tags; closing_tags only when the step succeeds.
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    closing_tags: dict[str, str] = field(default_factory=dict)

    def log_params(self, params: Mapping[str, Any]) -> None:
        lineage.log_batch(self.client, self.run_id, params=params)

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        lineage.log_metrics(self.client, self.run_id, metrics, step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        lineage.set_tags(self.client, self.run_id, tags)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def output_location(self) -> str:
        """Where this step writes data in this execution: `<outputs>/<execution>/<step>`."""
        return lineage.current_pipeline().output_location(self.step)

    def artifact_uri(self, path: str) -> str:
        """Where an artifact of this run is (as the registry's tags point at it)."""
        return f"{self.artifact_root.rstrip('/')}/{path}"


_current_step: ContextVar[StepRun | None] = ContextVar("keel_step_run", default=None)


def current_step() -> StepRun:
    """The running step's MLflow run (only inside a step)."""
    step = _current_step.get()
    if step is None:
        raise RuntimeError("not inside a pipeline step")
    return step


def find_refs(value: Any, prefix: str) -> dict[str, Ref]:
    """Every reference inside a value (plain, in a pydantic model, a list or a dict), by dotted name."""
    found: dict[str, Ref] = {}
    if isinstance(value, Ref):
        found[prefix] = value
    elif isinstance(value, BaseModel):
        for field in type(value).model_fields:
            found.update(find_refs(getattr(value, field), f"{prefix}.{field}"))
    elif isinstance(value, Mapping):
        for key, item in value.items():
            found.update(find_refs(item, f"{prefix}.{key}"))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found.update(find_refs(item, f"{prefix}.{index}"))
    return found


def plain_params(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The step's arguments that are parameters, not data references."""
    params: dict[str, Any] = {}
    for name, value in arguments.items():
        if find_refs(value, name):
            continue
        if isinstance(value, BaseModel):
            params[name] = value.model_dump(mode="json")
        elif isinstance(value, str | int | float | bool | type(None) | list | tuple | dict):
            params[name] = value
    return params


@contextmanager
def _step_run(step: str, kind: StepKind) -> Iterator[StepRun]:
    """Create (first attempt) or resume (retry) the step's MLflow child run, and end it."""
    from prefect.runtime import task_run

    pipeline = lineage.current_pipeline()
    client = pipeline.client()
    task_run_id = str(task_run.id)
    attempt = int(task_run.run_count or 1)
    found = None
    if attempt > 1:
        existing = client.search_runs(
            [pipeline.experiment_id],
            filter_string=f"tags.`{TASK_RUN_ID_TAG}` = '{task_run_id}'",
            max_results=1,
        )
        found = existing[0] if existing else None
    if found is None:
        found = lineage.create_child_run(
            client,
            pipeline.experiment_id,
            pipeline.run_id,
            step,
            {
                STEP_TAG: step,
                STEP_KIND_TAG: kind,
                PIPELINE_TAG: pipeline.name,
                TASK_RUN_ID_TAG: task_run_id,
                ATTEMPTS_TAG: "1",
            },
        )
        run = StepRun(client, found.info.run_id, step, kind, found.info.artifact_uri)
    else:
        client.update_run(found.info.run_id, status="RUNNING")
        run = StepRun(client, found.info.run_id, step, kind, found.info.artifact_uri)
        run.tags[ATTEMPTS_TAG] = str(attempt)
    token = _current_step.set(run)
    try:
        yield run
    except BaseException as exc:
        _end(run, error=f"{type(exc).__name__}: {exc}")
        raise
    else:
        _end(run)
    finally:
        _current_step.reset(token)


def _end(run: StepRun, error: str | None = None) -> None:
    """Write what the machinery recorded (one batch where MLflow's limits allow) and end the run:
    FINISHED with the closing tags, or FAILED with the error. (The step's time is the run's own,
    from its start to its end, as MLflow's UI shows it.)"""
    from mlflow.exceptions import MlflowException

    tags = {**run.tags, **run.closing_tags} if error is None else {**run.tags, ERROR_TAG: error[:5000]}
    try:
        lineage.log_batch(run.client, run.run_id, params=run.params, tags=tags)
    except MlflowException as exc:
        run.client.set_terminated(run.run_id, "FAILED")
        if error is None:
            raise
        _log(f"{run.step}: could not record the failed run's parameters and tags: {exc}")
        return
    run.client.set_terminated(run.run_id, "FINISHED" if error is None else "FAILED")


def results(*futures: PrefectFuture[Any]) -> tuple[Any, ...]:
    """The values of steps started with `Step.submit`, once every one of them has ended (a failure
    does not leave the others running while the execution closes); raises the first failure."""
    from prefect.futures import wait

    wait(list(futures))
    return tuple(future.result() for future in futures)


def _retry_condition(policy: RetryPolicy) -> Callable[[Any, Any, Any], bool]:
    """What Prefect asks before each retry: only the failures the step's policy names are retried.
    (A plain function: Prefect ignores callables that are not, bound methods included.)"""

    def retryable(task, task_run, state) -> bool:
        try:
            state.result()
        except BaseException as exc:  # the step's own exception
            return policy.retries(exc)
        return False

    return retryable


class Step(Generic[P, R]):
    """A typed function that runs as a named pipeline step of one kind."""

    def __init__(
        self,
        fn: Callable[P, R],
        kind: StepKind,
        name: str,
        retry: RetryPolicy = NO_RETRY,
        cache: CacheConfig = NO_CACHE,
        preload: Sequence[str] = (),
    ):
        from prefect import task
        from prefect.cache_policies import NO_CACHE as PREFECT_NO_CACHE

        self.fn = fn
        self.kind = kind
        self.name = name
        self.retry = retry
        self.cache = cache
        self.preload = tuple(preload)  # heavy modules its work imports: `Pipeline.preload`
        self._signature = inspect.signature(fn)
        self._task = task(  # type: ignore[call-overload]  # Prefect's overloads miss a bound method of P
            self._body,
            name=name,
            task_run_name=task_run_name(name, kind),  # the graph draws the kind beside the name
            tags=[kind.value],  # filterable in the UI; costs ~4 ms a step (a tag-concurrency lookup)
            retries=retry.attempts - 1,
            # One number: Prefect's UI shows a list of delays as "NaNs". The backoff beyond the first
            # wait is slept at the start of the attempt (`_backoff`).
            retry_delay_seconds=retry.interval_seconds if retry.attempts > 1 else 0,
            retry_condition_fn=_retry_condition(retry),
            cache_policy=PREFECT_NO_CACHE,  # ours is content-keyed: tasks.steps.cache
        )
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        from prefect.states import State

        outcome = self._task(*args, **kwargs)
        # The body returns a named state (Cached, Reused, or Completed with the cache's reason);
        # Prefect records it and hands it back as is: the caller wants the value in it.
        return outcome.result() if isinstance(outcome, State) else outcome

    def submit(self, *args: P.args, **kwargs: P.kwargs) -> PrefectFuture[R]:
        """Start the step in a thread of the flow and return at once: steps that do not need each
        other's outputs run side by side, as in a SageMaker pipeline's graph. `results` waits."""
        return self._task.submit(*args, **kwargs)

    def _body(self, *args: Any, **kwargs: Any) -> Any:
        from prefect.states import Completed

        cache.check_output_type(self.fn)  # before any work: a return type that cannot be passed on
        self._backoff()
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        key = cache.step_key(self.name, self.fn, bound.arguments, self.cache)
        with _step_run(self.name, self.kind) as run:
            inputs = {
                k: v for name, value in bound.arguments.items() for k, v in find_refs(value, name).items()
            }
            run.params.update(plain_params(bound.arguments))
            run.tags.update(_record(run, inputs, "input"))
            run.tags[KEY_TAG] = key.digest
            reuse, status, why = self._reusable(run, key)
            if reuse is not None:
                result = reuse.value
                run.tags.update(
                    {
                        STATUS_TAG: reuse.how,
                        SOURCE_RUN_TAG: reuse.run_id,
                        SOURCE_EXECUTION_TAG: reuse.execution,
                        REASON_TAG: reuse.message[:5000],
                    }
                )  # no log line: Prefect's ("Finished in state Cached(...)") says the same at once
            else:
                run.tags.update({STATUS_TAG: status, REASON_TAG: why[:5000]})
                if status != "off":
                    _log(f"{self.name}: {status}: {why}")
                result = store_frames(
                    self.fn(*bound.args, **bound.kwargs),
                    self.name,
                    lineage.current_pipeline().output_location(self.name),
                )
                cache.save_output(run.client, run.artifact_root, self.fn, key, result)
                run.closing_tags[PRODUCED_TAG] = "true"
            outputs = find_refs(result, "output")
            run.closing_tags.update(_record(run, outputs, "output"))  # written with the run's end
        if reuse is not None:
            name = "Cached" if reuse.how == "hit" else "Reused"
            return Completed(name=name, message=reuse.message[:2000], data=result)
        return Completed(message=f"{status}: {why}"[:2000], data=result)

    def _backoff(self) -> None:
        """The rest of the retry policy's growing wait: Prefect waited `interval_seconds` already."""
        from prefect.runtime import task_run

        attempt = int(task_run.run_count or 1)
        if attempt > 1:
            extra = self.retry.delays()[attempt - 2] - self.retry.interval_seconds
            if extra > 0:
                _log(f"{self.name}: attempt {attempt}, waiting {extra:g} s more (backoff)")
                time.sleep(extra)

    def _reusable(self, run: StepRun, key: cache.CacheKey) -> tuple[cache.Reuse | None, str, str]:
        """Earlier outputs this run may take (or None), the cache status and why.
        Status: reused (from the plan's execution), hit, miss, rerun (not reusable from the plan's
        execution, no cache), forced, off (no cache, nothing to reuse from)."""
        pipeline = lineage.current_pipeline()
        plan = pipeline.plan
        if plan.forced(self.name):
            return None, "forced", "run on request (--force-steps or --selected-steps)"
        not_reused = ""
        if plan.reuse_from:
            reuse, not_reused = cache.find_in_execution(
                run.client, pipeline.experiment_id, plan.reuse_from, key, self.fn
            )
            if reuse is not None:
                return reuse, reuse.how, reuse.message
        if not self.cache.enabled:
            return None, ("rerun" if not_reused else "off"), not_reused or "this step has no cache"
        reuse, miss = cache.find_cached(
            run.client, pipeline.experiment_id, key, self.fn, self.cache.expire_after
        )
        if reuse is not None:
            return reuse, reuse.how, reuse.message
        return None, "miss", "; ".join(filter(None, [miss, not_reused]))


def _log(message: str) -> None:
    from prefect import get_run_logger

    get_run_logger().info(message)


def _record(run: StepRun, refs: Mapping[str, Ref], context: str) -> dict[str, str]:
    """Lineage of a step's references: the tags for each (context: input or output), for the caller
    to write with its next batch; datasets read are logged as the run's MLflow dataset inputs now."""
    if context == "input":
        datasets = {k: v for k, v in refs.items() if isinstance(v, DatasetRef)}
        lineage.log_dataset_inputs(run.client, run.run_id, datasets)
    return {t: v for name, ref in refs.items() for t, v in ref.lineage_tags(name, context).items()}


class StepDecorator:
    """The decorator of one step kind. Bare (`@processing_step`) or with arguments
    (`@processing_step(name=..., cache=CacheConfig(), retry=RetryPolicy(...))`); the step is named
    after its function (`make_features` -> `make-features`) unless `name` says otherwise. `preload`:
    heavy modules the step's work imports (`preload=("evidently",)`); a small run imports them while
    its Prefect server starts (`Pipeline.preload`)."""

    def __init__(self, kind: StepKind):
        self.kind = kind
        self.__doc__ = (
            f"Mark a typed function as a {kind.value}: a named Prefect task with its own MLflow run."
        )

    @overload
    def __call__(self, fn: Callable[P, pd.DataFrame], /) -> Step[P, DatasetRef]: ...
    @overload
    def __call__(self, fn: Callable[P, R], /) -> Step[P, R]: ...
    @overload
    def __call__(
        self,
        fn: None = None,
        /,
        *,
        name: str | None = None,
        retry: RetryPolicy = NO_RETRY,
        cache: CacheConfig = NO_CACHE,
        preload: Sequence[str] = (),
    ) -> _Decorate: ...

    def __call__(
        self,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        name: str | None = None,
        retry: RetryPolicy = NO_RETRY,
        cache: CacheConfig = NO_CACHE,
        preload: Sequence[str] = (),
    ) -> Any:
        if fn is not None and not callable(fn):
            raise TypeError(
                f"@{self.kind.label.lower()}_step takes the step's function, or keyword arguments "
                f"(name=, retry=, cache=, preload=); got {fn!r}"
            )

        def decorate(function: Callable[..., Any]) -> Step[Any, Any]:
            return Step(function, self.kind, name or step_name(function), retry, cache, preload)

        return decorate(fn) if fn is not None else decorate

    def __repr__(self) -> str:
        return f"<{self.kind.label.lower()}_step decorator>"


class _Decorate(Protocol):
    """What `@step_kind(...)` with arguments returns: it turns a function into a step."""

    @overload
    def __call__(self, fn: Callable[P, pd.DataFrame], /) -> Step[P, DatasetRef]: ...
    @overload
    def __call__(self, fn: Callable[P, R], /) -> Step[P, R]: ...


def step_name(fn: Callable[..., Any]) -> str:
    """A step's default name: its function's, with dashes (`make_features` -> `make-features`)."""
    return fn.__name__.strip("_").replace("_", "-")


def step_kind(kind: StepKind) -> StepDecorator:
    """Make the decorator of one step kind, e.g. `processing_step = step_kind(StepKind.PROCESSING)`."""
    return StepDecorator(kind)
