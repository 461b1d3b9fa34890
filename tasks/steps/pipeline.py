"""`@pipeline`: a function of steps becomes a SageMaker-style pipeline.

    @pipeline(name="churn", params=ChurnParams)
    def churn(params: ChurnParams) -> ChurnResult:
        features = make_features(params.data)
        ...

    if __name__ == "__main__":
        sys.exit(churn.main())

The result is a Prefect flow (deployable, runnable from the UI, callable as a sub-flow) that, for
each execution: opens the MLflow parent run (parameters, git commit of the pipeline's own
repository, Prefect ids), makes a Dask cluster available to the steps (opened when a step first asks),
marks as KILLED the runs of executions whose process died, and applies the execution plan — resume
and selective execution (`reuse_from`, `selected_steps`, `force_steps`, from `ExecutionOptions`)
checked against the steps the pipeline's code runs (`steps`). `main()` is its command line,
generated from the parameters model: `--help`, one flag per field, exit codes 0 done, 1 failed on
purpose, 2 bad input.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

from prefect import Flow
from pydantic import BaseModel, Field

from tasks.steps import lineage
from tasks.steps.cli import run_flow_cli
from tasks.steps.compute import dask_cluster, local_size, runs_in_process
from tasks.steps.discover import step_objects_of, steps_of
from tasks.steps.params import Params, flatten
from tasks.steps.settings import get_settings

M = TypeVar("M", bound=BaseModel)
R = TypeVar("R")


class ExecutionOptions(Params):
    """Resume and selective execution (SageMaker's "retry pipeline execution" and
    `SelectiveExecutionConfig`): a pipeline's parameters model subclasses this to offer them."""

    force_steps: list[str] = Field(
        default_factory=list,
        description="Run these steps even if their outputs are cached; 'all' for every step.",
    )
    reuse_from: str | None = Field(
        default=None,
        description="An earlier execution (its MLflow run id) to resume or take steps from: its parameters are "
        "the defaults, and each of its finished steps is reused if its inputs are unchanged.",
    )
    selected_steps: list[str] = Field(
        default_factory=list,
        description="With --reuse-from: run only these steps (and those whose inputs change as a result).",
    )


class Pipeline(Flow[..., R], Generic[M, R]):
    """A Prefect flow that runs one pipeline execution per call (see the module's docstring)."""

    def __init__(
        self,
        fn: Callable[[M], R],
        name: str,
        params: type[M],
        run_tags: Callable[[M], Mapping[str, str]] | None = None,
        summary: Callable[[R], str] | None = None,
        after_bad_input: str = "nothing was run",
        reads: Callable[[M], Iterable[str | None]] | None = None,
    ):
        self.pipeline_fn = fn
        self.reads = reads
        self.params_model = params
        self.run_tags = run_tags
        self.summary = summary or _default_summary
        self.after_bad_input = after_bad_input

        @functools.wraps(fn)
        def execution(params: M | None = None) -> R:
            return self._execute(params if params is not None else self.params_model())

        # A model whose fields all have defaults may be left out (None: its defaults, made when the
        # execution starts; not at import, where they may read the project's config).
        optional = _constructible(params)
        annotation = params | None if optional else params
        execution.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [
                inspect.Parameter(
                    "params",
                    inspect.Parameter.POSITIONAL_OR_KEYWORD,
                    default=None if optional else inspect.Parameter.empty,
                    annotation=annotation,
                )
            ],
            return_annotation=inspect.signature(fn).return_annotation,
        )
        execution.__annotations__ = {"params": annotation, "return": fn.__annotations__.get("return", Any)}
        super().__init__(
            execution,
            name=name,
            log_prints=True,
            result_serializer="json",  # a failure's result is stored as JSON, never as a pickle
            description=inspect.getdoc(fn),
        )

    @functools.cached_property
    def steps(self) -> tuple[str, ...]:
        """The names of this pipeline's steps, read from its code (`tasks.steps.discover`)."""
        return steps_of(self.pipeline_fn)

    def preload(self, params: M) -> tuple[str, ...]:
        """The heavy modules this run's steps import (their `preload`), when its Dask work runs in
        its own process (`tasks.steps.compute.runs_in_process`): the command line imports them while
        Prefect's server starts (`tasks.steps.cli.services_opened_together`). Otherwise none: workers
        elsewhere import them, and this process does not need them."""
        if self.reads is None or not runs_in_process(get_settings(), local_size(self.reads(params))):
            return ()
        return self._steps_preload

    @functools.cached_property
    def _steps_preload(self) -> tuple[str, ...]:
        modules = (name for step in step_objects_of(self.pipeline_fn) for name in step.preload)
        return tuple(dict.fromkeys(modules))

    @property
    def source_file(self) -> Path | None:
        try:
            return Path(inspect.getfile(self.pipeline_fn)).resolve()
        except (OSError, TypeError):
            return None

    def plan(self, params: M) -> lineage.ExecutionPlan:
        """The execution plan the parameters ask for; unknown step names are refused (ValueError)."""
        if not isinstance(params, ExecutionOptions):
            return lineage.ExecutionPlan()
        unknown = sorted(set(params.force_steps + params.selected_steps) - {*self.steps, lineage.ALL_STEPS})
        if unknown:
            raise ValueError(
                f"unknown steps {unknown}; the steps of {self.name} are {', '.join(self.steps)} (or 'all')"
            )
        if params.selected_steps and not params.reuse_from:
            raise ValueError(
                "--selected-steps needs --reuse-from: the execution the other steps' outputs come from"
            )
        return lineage.ExecutionPlan(
            reuse_from=params.reuse_from,
            selected=frozenset(params.selected_steps),
            force=frozenset(params.force_steps),
        )

    def _execute(self, params: M) -> R:
        settings = get_settings()
        plan = self.plan(params)
        with (
            lineage.pipeline_run(
                self.name,
                params.model_dump(mode="json"),
                settings,
                tags=dict(self.run_tags(params)) if self.run_tags else None,
                plan=plan,
                source=self.source_file,
            ) as run,
            dask_cluster(settings, local_size(self.reads(params)) if self.reads else None),
        ):
            client = run.client()
            ended = lineage.end_stale_runs(client, run.experiment_id, plan.reuse_from)
            ended += lineage.end_stale_runs(client, run.experiment_id)
            if ended:
                print(f"ended {len(ended)} MLflow runs of executions whose process is gone, as KILLED")
            return self.pipeline_fn(params)

    def with_stored_params(self, params: M, given: Mapping[str, Any]) -> M:
        """With `reuse_from`, the earlier execution's parameters, updated with those `given` now (the
        values as the user gave them: defaults filled in by the model must not replace stored ones)."""
        if not isinstance(params, ExecutionOptions) or not params.reuse_from:
            return params
        stored = lineage.execution_params(lineage.mlflow_client(get_settings()), params.reuse_from)
        model = self.params_model
        fresh: dict[str, list[str]] = {"force_steps": [], "selected_steps": []}
        return model.model_validate(
            {**flatten(model, stored), **fresh, **flatten(model, given)}
        )  # Params nests

    def rerun(self, execution: str, selected_steps: Sequence[str] = (), **changes: Any) -> R:
        """Resume an execution (no `selected_steps`), or run only `selected_steps` taking the other
        steps' outputs from it (selective execution); its parameters, updated with `changes`."""
        given = {**changes, "reuse_from": execution, "selected_steps": list(selected_steps)}
        return self(self.with_stored_params(self.params_model.model_validate(given), given))

    def main(self, argv: Sequence[str] | None = None) -> int:
        """The pipeline's command line (`python -m your.module --help`); returns the exit code."""
        module = sys.modules.get(self.pipeline_fn.__module__)
        spec = getattr(module, "__spec__", None)
        prog = f"python -m {spec.name}" if spec is not None else Path(sys.argv[0]).name
        description = (module.__doc__ if module is not None else None) or self.description or ""
        return run_flow_cli(
            self,
            self.params_model,
            argv,
            prog,
            description,
            self.summary,
            after_bad_input=self.after_bad_input,
            prepare_params=self.with_stored_params,
            check_params=self.plan,
            preload=self.preload,
        )


def _constructible(model: type[BaseModel]) -> bool:
    return all(not field.is_required() for field in model.model_fields.values())


def _default_summary(result: Any) -> str:
    if isinstance(result, BaseModel):
        return result.model_dump_json(indent=2)
    return str(result)


def pipeline(
    name: str | None = None,
    *,
    params: type[M],
    run_tags: Callable[[M], Mapping[str, str]] | None = None,
    summary: Callable[[R], str] | None = None,
    after_bad_input: str = "nothing was run",
    reads: Callable[[M], Iterable[str | None]] | None = None,
) -> Callable[[Callable[[M], R]], Pipeline[M, R]]:
    """Make a function of steps a pipeline. `params`: its parameters model (flags, UI form);
    `run_tags`: tags for the execution's MLflow run from the parameters; `summary`: what the command
    line prints at the end; `name`: the flow's and the MLflow pipeline's name (default: the
    function's, with dashes); `reads`: the files or folders an execution reads, from its parameters
    (small enough, its Dask work stays in its process: `tasks.steps.compute`)."""

    def decorate(fn: Callable[[M], R]) -> Pipeline[M, R]:
        return Pipeline(
            fn, name or fn.__name__.replace("_", "-"), params, run_tags, summary, after_bad_input, reads
        )

    return decorate
