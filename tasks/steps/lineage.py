"""Lineage in MLflow: one parent run per pipeline execution, one child run per step.

Runs are created with an explicit `MlflowClient` and explicit run ids (not the thread-local fluent
"active run"), so a step's run can be created once in the flow and resumed by every retry of its
Prefect task: a retried step leaves one run behind, with its attempts counted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from uuid import UUID

from infra.processes import pid_running
from tasks.steps import summary
from tasks.steps.errors import NotInRegistry
from tasks.steps.fluent import point_fluent_api
from tasks.steps.refs import DatasetRef
from tasks.steps.settings import Settings
from tasks.steps.tag_limits import settle_tag_limits
from tasks.steps.tags import (
    DATASET_CONTEXT_TAG,
    ERROR_TAG,
    EXPERIMENT_KIND_TAG,
    FLOW_RUN_ID_TAG,
    FLOW_RUN_NAME_TAG,
    FLOW_RUN_URL_TAG,
    FORCED_STEPS_TAG,
    GIT_COMMIT_TAG,
    GIT_DIRTY_TAG,
    HOST_TAG,
    PARENT_TAG,
    PID_TAG,
    PIPELINE_TAG,
    REUSED_FROM_TAG,
    SELECTED_STEPS_TAG,
    SOURCE_NAME_TAG,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Run


PROJECT_ROOT = Path(__file__).resolve().parents[2]
PARAMS_ARTIFACT = "keel/params.json"
# What MLflow's UI reads to tell a model-training experiment from a GenAI one (without it, it infers
# the kind, and showed ours with traces and token usage, the step runs under "Evaluation runs").
# The layout a page opens in is also the browser's last choice: our links ask (MLFLOW_UI_LAYOUT).
EXPERIMENT_KIND = "custom_model_development"


ALL_STEPS = "all"


@dataclass(frozen=True)
class ExecutionPlan:
    """Which steps of an execution run and which reuse earlier outputs.

    `reuse_from`: an earlier execution (its MLflow parent run id) whose finished steps are reused
    when their inputs are the same as now (resume, and selective execution). `selected`: run only
    these steps, taking the others from `reuse_from` (a step whose inputs changed runs anyway).
    `force`: run these steps (or "all") even if cached."""

    reuse_from: str | None = None
    selected: frozenset[str] = frozenset()
    force: frozenset[str] = frozenset()

    def forced(self, step: str) -> bool:
        return ALL_STEPS in self.force or step in self.force or step in self.selected


@dataclass(frozen=True)
class PipelineRun:
    """The MLflow parent run of one pipeline execution."""

    run_id: str
    experiment_id: str
    tracking_uri: str
    registry_uri: str
    name: str
    plan: ExecutionPlan = ExecutionPlan()
    outputs_root: str = ""  # where steps write data (Settings.datasets_root)
    facts: list[summary.Fact] = field(default_factory=list, compare=False)  # the summary's rows

    def output_location(self, step: str) -> str:
        """Where this execution's outputs of one step go: `<outputs_root>/<execution>/<step>`."""
        if "://" in self.outputs_root:
            return f"{self.outputs_root.rstrip('/')}/{self.run_id}/{step}"
        return str(Path(self.outputs_root or ".").resolve() / self.run_id / step)

    def client(self) -> MlflowClient:
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)


_current_pipeline: ContextVar[PipelineRun | None] = ContextVar("keel_pipeline_run", default=None)


def note(label: str, value: str, link: str | None = None) -> None:
    """Add a row to the running execution's summary (its Prefect artifact, published at its end)."""
    current = _current_pipeline.get()
    if current is not None:
        current.facts.append(summary.Fact(label, value, link))


def mlflow_client(settings: Settings) -> MlflowClient:
    """A client for the configured store; also points MLflow's fluent API at it (`point_fluent_api`:
    the process's environment is left as the user had it).
    A new embedded store starts as a copy of the migrated template (`infra.mlflow_store`), if any;
    its connections write ahead (`infra.mlflow_store.write_ahead`). The models this process logs
    and loads skip MLflow's scan of every installed package (`check_requirements_quickly`).
    """
    import mlflow

    from tasks.steps.requirements_check import check_requirements_quickly

    if settings.embedded_mlflow:
        from infra.mlflow_store import seed_new_store, write_ahead

        with contextlib.suppress(OSError):  # MLflow then creates the store and says what fails
            seed_new_store(settings.mlflow_database)
        write_ahead(settings.mlflow_database)
    point_fluent_api(settings.tracking_uri, settings.registry_uri)
    check_requirements_quickly()
    return mlflow.MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.registry_uri)


def ensure_experiment(client: MlflowClient, settings: Settings) -> str:
    """The experiment's id; created as a model-training experiment (older ones are tagged so)."""
    experiment = client.get_experiment_by_name(settings.experiment_name)
    if experiment is not None:
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    try:
        return client.create_experiment(
            settings.experiment_name,
            artifact_location=settings.artifact_location,
            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
        )
    except Exception:  # created concurrently by another execution
        experiment = client.get_experiment_by_name(settings.experiment_name)
        if experiment is None:
            raise
        return experiment.experiment_id


def git_commit(source: Path | None = None) -> dict[str, str]:
    """The commit of the repository the pipeline's code (`source`, a file) is in, and whether its
    work tree had uncommitted changes: the user's repository, not this project's."""
    folder = (source.parent if source is not None else PROJECT_ROOT).resolve()

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=folder, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        return {
            GIT_COMMIT_TAG: git("rev-parse", "HEAD"),
            GIT_DIRTY_TAG: str(bool(git("status", "--porcelain"))),
        }
    except (OSError, subprocess.SubprocessError):
        return {GIT_COMMIT_TAG: "unknown", GIT_DIRTY_TAG: "unknown"}


def prefect_flow_run_tags() -> dict[str, str]:
    from prefect.runtime import flow_run

    tags = {FLOW_RUN_ID_TAG: str(flow_run.id or ""), FLOW_RUN_NAME_TAG: str(flow_run.name or "")}
    url = str(flow_run.ui_url or "")
    if url.startswith(("http://", "https://")):  # without a Prefect UI it reads "None/flow-runs/..."
        tags[FLOW_RUN_URL_TAG] = url
    return tags


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested parameters as MLflow params: dotted keys, JSON for lists of plain values, 6000 chars at
    most. Lists of records (a tuning job's trials) are results, not parameters: they are left out
    (the step that made them logs them as a table)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list | tuple) and any(isinstance(v, Mapping) for v in value):
            continue
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            flat[name] = text[:6000]
    return flat


def log_batch(
    client: MlflowClient,
    run_id: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    metrics: Sequence[Metric] = (),
) -> None:
    """Parameters (flattened), tags and metrics of a run in one write, or in as few as MLflow's
    limits allow (100 parameters and 100 tags, 1,000 items in all, per write)."""
    from mlflow.entities import Param, RunTag

    param_items = [Param(k, v) for k, v in flatten(params or {}).items()]
    tag_items = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    metric_items = list(metrics)
    if not (param_items or tag_items or metric_items):
        return
    while True:
        batch_params, param_items = param_items[:100], param_items[100:]
        batch_tags, tag_items = tag_items[:100], tag_items[100:]
        room = 1000 - len(batch_params) - len(batch_tags)
        batch_metrics, metric_items = metric_items[:room], metric_items[room:]
        client.log_batch(run_id, metrics=batch_metrics, params=batch_params, tags=batch_tags)
        if not (param_items or tag_items or metric_items):
            return


_NOT_IN_MLFLOW_KEYS = re.compile(r"[^\w.\- ]")


def mlflow_key(name: str) -> str:
    """A metric or parameter name MLflow accepts (letters, digits, `_ . -` and spaces; MLflow also allows
    `/` and `:`, which it reads as paths): other characters, from a column such as `temp (°C)`, become
    `_`, and a short digest of the original keeps two such names apart."""
    safe = _NOT_IN_MLFLOW_KEYS.sub("_", name)
    if safe == name:
        return name
    return f"{safe[:240]}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """Metrics in one batch write; names made acceptable (`mlflow_key`); values that are not finite
    numbers are left out (MLflow refuses NaN)."""
    import math
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [
        Metric(mlflow_key(k), float(v), now, step)
        for k, v in metrics.items()
        if v is not None and math.isfinite(float(v))
    ]
    log_batch(client, run_id, metrics=items)


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    log_batch(client, run_id, tags=tags)


@contextmanager
def pipeline_run(
    pipeline: str,
    params: Mapping[str, Any],
    settings: Settings,
    tags: Mapping[str, str] | None = None,
    plan: ExecutionPlan = ExecutionPlan(),
    source: Path | None = None,
) -> Iterator[PipelineRun]:
    """Open the parent run of a pipeline execution; it ends FINISHED or FAILED with the flow.
    The parameters are also stored whole (`keel/params.json`), so the execution can be resumed.
    `source`: the pipeline's file (its repository's commit is recorded)."""
    client = mlflow_client(settings)
    experiment_id = ensure_experiment(client, settings)
    prefect_tags = prefect_flow_run_tags()
    if prefect_tags[FLOW_RUN_NAME_TAG]:  # inside a flow run: its server is up (tag_limits.py)
        with contextlib.suppress(Exception):
            settle_tag_limits()
    run = client.create_run(
        experiment_id,
        run_name=f"{pipeline}/{prefect_tags[FLOW_RUN_NAME_TAG] or 'local'}",
        tags={
            PIPELINE_TAG: pipeline,
            SOURCE_NAME_TAG: pipeline,
            **prefect_tags,
            **git_commit(source),
            HOST_TAG: socket.gethostname(),
            PID_TAG: str(os.getpid()),
            **({REUSED_FROM_TAG: plan.reuse_from} if plan.reuse_from else {}),
            **({SELECTED_STEPS_TAG: ",".join(sorted(plan.selected))} if plan.selected else {}),
            **({FORCED_STEPS_TAG: ",".join(sorted(plan.force))} if plan.force else {}),
            **(tags or {}),
        },
    )
    log_batch(client, run.info.run_id, params=params)
    client.log_text(run.info.run_id, json.dumps(params, indent=1, default=str), PARAMS_ARTIFACT)
    current = PipelineRun(
        run.info.run_id,
        experiment_id,
        settings.tracking_uri,
        settings.registry_uri,
        pipeline,
        plan,
        settings.datasets_root,
    )
    current.facts.append(
        summary.Fact(
            "MLflow execution run",
            run.info.run_id,
            run_link(settings.tracking_uri, experiment_id, run.info.run_id),
        )
    )
    token = _current_pipeline.set(current)
    try:
        yield current
    except BaseException as exc:
        _publish_summary(current, f"{pipeline}: failed", f"{type(exc).__name__}: {exc}")
        try:
            set_tags(client, run.info.run_id, {ERROR_TAG: f"{type(exc).__name__}: {exc}"[:5000]})
            client.set_terminated(run.info.run_id, "FAILED")
        except Exception as unreachable:  # the tracking server itself may be what failed
            logging.getLogger(__name__).error(
                "could not mark MLflow run %s FAILED (%s); the next execution on this host ends it as KILLED",
                run.info.run_id,
                unreachable,
            )
        raise
    else:
        client.set_terminated(run.info.run_id, "FINISHED")
        _publish_summary(current, f"{pipeline}: completed")
    finally:
        _current_pipeline.reset(token)


def _publish_summary(current: PipelineRun, title: str, error: str | None = None) -> None:
    """Best effort: a summary that cannot be written must not change how the execution ends."""
    facts = [*current.facts, *([summary.Fact("Error", error[:2000])] if error else [])]
    try:
        summary.publish(title, facts, description=error[:500] if error else title)
    except Exception as exc:
        logging.getLogger(__name__).warning("could not publish the execution summary: %s", exc)


def end_stale_runs(client: MlflowClient, experiment_id: str, execution: str | None = None) -> list[str]:
    """Mark as KILLED the runs of executions whose process died on this host (SIGKILL, power loss):
    MLflow has no heartbeat, so they would read RUNNING forever. `execution`: only that one, and
    refuse if its process is still alive."""
    query = f"tags.`{PIPELINE_TAG}` != '' and attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{socket.gethostname()}'"
    parents = (
        [client.get_run(execution)]
        if execution
        else client.search_runs([experiment_id], query, max_results=200)
    )
    ended: list[str] = []
    for parent in parents:
        tags = parent.data.tags
        if parent.info.status != "RUNNING" or PARENT_TAG in tags:
            continue
        pid = int(tags.get(PID_TAG, "0") or 0)
        if tags.get(HOST_TAG) == socket.gethostname() and pid and pid_running(pid):
            if execution:
                raise RuntimeError(
                    f"execution {execution} is still running (process {pid}); wait for it or stop it"
                )
            continue
        pending = [parent.info.run_id]
        while pending:
            run_id = pending.pop()
            children = client.search_runs(
                [parent.info.experiment_id],
                f"tags.`{PARENT_TAG}` = '{run_id}' and attributes.status = 'RUNNING'",
            )
            pending.extend(c.info.run_id for c in children)
            set_tags(client, run_id, {ERROR_TAG: "ended as KILLED: the process running it is gone"})
            client.set_terminated(run_id, "KILLED")
            ended.append(run_id)
        crash_flow_run(tags.get(FLOW_RUN_ID_TAG, ""))
    return ended


def crash_flow_run(flow_run_id: str) -> None:
    """Mark a dead execution's Prefect flow run Crashed; a flow run started from the command line has
    no heartbeat, so the server would show it Running forever. Best effort: the run may live in
    another (ephemeral) server."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    if not flow_run_id:
        return
    try:
        with get_client(sync_client=True) as prefect:
            flow_run = prefect.read_flow_run(UUID(flow_run_id))
            if flow_run.state is not None and flow_run.state.is_running():
                prefect.set_flow_run_state(
                    flow_run_id, Crashed(message="the process running it is gone (found by keel)"), force=True
                )
    except Exception as exc:
        logging.getLogger(__name__).info("could not mark Prefect flow run %s Crashed: %s", flow_run_id, exc)


def execution_params(client: MlflowClient, execution: str) -> dict[str, Any]:
    """The parameters an execution ran with (as stored by `pipeline_run`)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(execution, PARAMS_ARTIFACT, tmp)
        except Exception as exc:
            raise NotInRegistry(
                f"execution {execution} is not in the tracking store, or stored no parameters "
                f"({PARAMS_ARTIFACT}): {exc}"
            ) from exc
        return json.loads(Path(path).read_text())


def current_pipeline() -> PipelineRun:
    current = _current_pipeline.get()
    if current is None:
        raise RuntimeError(
            "steps run inside a pipeline execution: open `pipeline_run(...)` in the flow first"
        )
    return current


def create_child_run(
    client: MlflowClient, experiment_id: str, parent_run_id: str, name: str, tags: Mapping[str, str]
) -> Run:
    """Create a run nested under `parent_run_id` (a step under its execution, a trial under its step)."""
    return client.create_run(experiment_id, run_name=name, tags={PARENT_TAG: parent_run_id, **tags})


def dataset_entity(ref: DatasetRef):
    """An MLflow dataset that records where the data is, its content digest, its schema (column types,
    from a Parquet footer or a CSV's first rows) and its profile (rows, columns), without loading it."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.sources import LocalArtifactDatasetSource  # type: ignore[attr-defined]  # made at import
    from mlflow.entities import Dataset

    if "://" in ref.uri and not ref.uri.startswith("file://"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(ref.uri)
    else:
        source = LocalArtifactDatasetSource(ref.uri)
    schema = _schema(ref.uri, ref.format, ref.digest)
    profile = {"num_rows": ref.rows, "num_columns": len(schema or ref.columns) or None, "sha256": ref.digest}
    return Dataset(
        name=ref.name,
        digest=ref.digest[:36],
        source_type=source._get_source_type(),
        source=source.to_json(),
        schema=json.dumps({"mlflow_colspec": schema}) if schema else None,
        profile=json.dumps({k: v for k, v in profile.items() if v is not None}),
    )


_SCHEMAS: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
_SCHEMAS_KEPT = 256


def _schema(uri: str, format: str, digest: str) -> list[dict[str, Any]] | None:
    """`dataset_schema`, read once per content: every step that takes the splits logs them again.
    Only schemas read are kept (a read that failed is tried again by the next step)."""
    key = (uri, format, digest)
    if key not in _SCHEMAS:
        found = dataset_schema(DatasetRef(name="", uri=uri, format=format, digest=digest))
        if found is None:
            return None
        if len(_SCHEMAS) >= _SCHEMAS_KEPT:
            _SCHEMAS.clear()
        _SCHEMAS[key] = found
    return _SCHEMAS[key]


def dataset_schema(ref: DatasetRef) -> list[dict[str, Any]] | None:
    """MLflow's column specs of a dataset, read from its first file's Parquet footer or a CSV's first
    100 rows; None when it cannot be read (the lineage is recorded all the same)."""
    import fsspec
    import pandas as pd
    from mlflow.types.utils import _infer_schema

    from tasks.steps.refs import file_urls

    try:
        first = file_urls(ref.uri)[0]
        with fsspec.open(first, "rb") as handle:
            if ref.format == "parquet":
                import pyarrow.parquet as pq

                head = pq.read_schema(handle).empty_table().to_pandas()
            else:
                head = pd.read_csv(handle, nrows=100)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MLflow's hint about integer columns and missing values
            return _infer_schema(head).to_dict()
    except Exception as exc:
        logging.getLogger(__name__).debug("no schema for dataset %s: %s", ref.uri, exc)
        return None


def log_dataset_inputs(client: MlflowClient, run_id: str, refs: Mapping[str, DatasetRef]) -> None:
    """Datasets a run read, with `log_inputs`, so MLflow's UI lists them under the run's datasets
    (named by the argument they came in as)."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.exceptions import MlflowException

    if not refs:
        return
    inputs = [
        DatasetInput(dataset_entity(ref), tags=[InputTag(DATASET_CONTEXT_TAG, key)])
        for key, ref in refs.items()
    ]
    # MLflow's SQL store looks a dataset up, then inserts it: two steps side by side logging the same
    # new dataset both insert, and one fails on the unique key. One at a time in this process; a
    # clash with another process is retried once (the row is there by then).
    with _LOGGING_INPUTS:
        try:
            client.log_inputs(run_id, datasets=inputs)
        except MlflowException as exc:
            if "UNIQUE constraint" not in str(exc) and "duplicate key" not in str(exc):
                raise
            client.log_inputs(run_id, datasets=inputs)


_LOGGING_INPUTS = threading.Lock()


# MLflow's UI opens every experiment in its GenAI layout unless the link (or the browser's memory of
# an earlier choice) asks for the model-training one.
MLFLOW_UI_LAYOUT = "workflowType=machine_learning"


def mlflow_ui_link(tracking_uri: str, path: str) -> str | None:
    """A page of MLflow's UI (e.g. `experiments/1/runs/abc`) in its model-training layout, or None
    without a tracking server."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/{path.lstrip('/')}?{MLFLOW_UI_LAYOUT}"
    return None


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    return mlflow_ui_link(tracking_uri, f"experiments/{experiment_id}/runs/{run_id}")


def version_link(tracking_uri: str, model_name: str, version: str) -> str | None:
    return mlflow_ui_link(tracking_uri, f"models/{model_name}/versions/{version}")


def artifact_link(
    tracking_uri: str, experiment_id: str, run_id: str, artifact_uri: str, path: str = ""
) -> str:
    """A link people can open for a run's artifact (`path` in the run): the MLflow UI's artifact
    page with a tracking server, else the file itself."""
    page = mlflow_ui_link(
        tracking_uri, f"experiments/{experiment_id}/runs/{run_id}/artifacts/{path}".rstrip("/")
    )
    if page is not None:
        return page
    if artifact_uri.startswith("/"):
        return f"file://{artifact_uri}"
    return artifact_uri
