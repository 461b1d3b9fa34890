"""Lineage queries (SageMaker's QueryLineage), answered from what the runs and versions record in
MLflow: what made a model version and what used it since, and which runs read or wrote a dataset.

Reads only; every answer is a small typed tree (`VersionLineage`, `DatasetLineage`) that the command
line prints as text or JSON. A dataset is found by its content digest: the runs' dataset inputs
(MLflow's own search) and the steps' lineage tags (`keel.input.NAME.digest`,
`keel.output.NAME.digest`), which MLflow cannot search by key pattern, so those are scanned: the
runs of the store's experiments, a page at a time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from tasks.steps.errors import NotInRegistry
from tasks.steps.tags import (
    APPROVAL_AT_TAG,
    APPROVAL_PREVIOUS_CHAMPION_TAG,
    APPROVAL_PREVIOUS_STATUS_TAG,
    APPROVAL_REASON_TAG,
    APPROVAL_TAG,
    APPROVED_BY_TAG,
    CHAMPION_ALIAS,
    COMPARED_WITH_TAG,
    DATASET_CONTEXT_TAG,
    EXECUTION_REASON_TAG,
    FLOW_RUN_URL_TAG,
    GIT_COMMIT_TAG,
    GIT_DIRTY_TAG,
    METRIC_TAG_PREFIX,
    MODEL_NAME_TAG,
    MODEL_VERSION_TAG,
    MONITOR_PIPELINE,
    PARENT_TAG,
    PIPELINE_TAG,
    QUALITY_PIPELINE,
    RAW_DIGEST_TAG,
    RAW_URI_TAG,
    SCORING_PIPELINE,
    SOURCE_NAME_TAG,
    STATUS_TAG,
    STEP_KIND_TAG,
    STEP_TAG,
    TRIGGER_TAG_PREFIX,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

PAGE = 1000


class DatasetNode(BaseModel):
    name: str
    digest: str
    location: str | None = None
    rows: int | None = None


class RunNode(BaseModel):
    run_id: str
    name: str
    pipeline: str | None = None
    step: str | None = None
    kind: str | None = None
    status: str
    started: int | None = Field(default=None, description="ms since the epoch")
    cache: str | None = None
    parent: str | None = Field(default=None, description="A step's execution run.")
    reads: list[DatasetNode] = Field(default_factory=list)
    writes: list[DatasetNode] = Field(default_factory=list)


class VersionLineage(BaseModel):
    model_name: str
    version: str
    aliases: list[str]
    approval_status: str
    metrics: dict[str, str]
    training_data: list[DatasetNode]
    code: dict[str, str]
    execution: RunNode | None
    steps: list[RunNode]
    trigger: dict[str, str]
    approval: dict[str, str]
    replaced: str | None = Field(description="The champion this version was compared with or replaced.")
    scoring_runs: list[RunNode]
    monitoring_checks: list[RunNode]


class DatasetUse(BaseModel):
    run: RunNode
    role: str = Field(description="read or wrote")
    as_name: str
    registered: list[str] = Field(default_factory=list, description="Versions its execution registered.")


class DatasetLineage(BaseModel):
    digest: str
    given: str
    uses: list[DatasetUse]


def _experiments(client: MlflowClient) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def _runs(client: MlflowClient, query: str) -> list[Run]:
    """Every run of every experiment matching `query`, page by page."""
    found: list[Run] = []
    token = None
    experiments = _experiments(client)
    if not experiments:
        return found
    while True:
        page = client.search_runs(experiments, query, max_results=PAGE, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found


def _datasets(tags: dict[str, str], context: str) -> list[DatasetNode]:
    """The datasets a step run's lineage tags name (`keel.<context>.<name>.uri|digest|rows`)."""
    prefix = f"keel.{context}."
    names = {
        k[len(prefix) :].rsplit(".", 1)[0] for k in tags if k.startswith(prefix) and k.endswith(".digest")
    }
    return [
        DatasetNode(
            name=name,
            digest=tags[f"{prefix}{name}.digest"],
            location=tags.get(f"{prefix}{name}.uri"),
            rows=int(tags[f"{prefix}{name}.rows"])
            if tags.get(f"{prefix}{name}.rows", "").isdigit()
            else None,
        )
        for name in sorted(names)
    ]


def run_node(run: Run) -> RunNode:
    tags = run.data.tags
    reads, writes = _datasets(tags, "input"), _datasets(tags, "output")
    known = {d.digest[:36] for d in reads + writes}  # a dataset logged as input that it wrote: an output
    for item in run.inputs.dataset_inputs if run.inputs else []:
        dataset = item.dataset
        if dataset.digest not in known:
            context = next((t.value for t in item.tags if t.key == DATASET_CONTEXT_TAG), dataset.name)
            reads.append(DatasetNode(name=context, digest=dataset.digest, location=_source(dataset.source)))
    return RunNode(
        run_id=run.info.run_id,
        name=run.info.run_name or run.info.run_id,
        pipeline=tags.get(PIPELINE_TAG),
        step=tags.get(STEP_TAG),
        kind=tags.get(STEP_KIND_TAG),
        status=run.info.status,
        started=run.info.start_time,
        cache=tags.get(STATUS_TAG),
        parent=tags.get(PARENT_TAG),
        reads=reads,
        writes=writes,
    )


def _source(source: str) -> str | None:
    import json

    try:
        parsed = json.loads(source)
    except ValueError:
        return None
    return parsed.get("uri") or parsed.get("path") if isinstance(parsed, dict) else None


def version_lineage(client: MlflowClient, name: str, version: str) -> VersionLineage:
    """Everything recorded about how a version came to be and what used it."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.get_model_version(name, version)
    except MlflowException as exc:
        raise NotInRegistry(f"the registry has no {name} v{version}") from exc
    tags = found.tags
    execution = None
    steps: list[RunNode] = []
    code: dict[str, str] = {}
    if found.run_id:
        run = client.get_run(found.run_id)
        execution = run_node(run)
        code = {
            k: v
            for k, v in {
                "commit": run.data.tags.get(GIT_COMMIT_TAG, ""),
                "dirty": run.data.tags.get(GIT_DIRTY_TAG, ""),
                "source": run.data.tags.get(SOURCE_NAME_TAG, ""),
                "prefect_flow_run": run.data.tags.get(FLOW_RUN_URL_TAG, ""),
                "reason": run.data.tags.get(EXECUTION_REASON_TAG, ""),
            }.items()
            if v
        }
        steps = sorted(
            (run_node(r) for r in _runs(client, f"tags.`{PARENT_TAG}` = '{found.run_id}'")),
            key=lambda r: (r.started or 0, r.name),
        )
    training = (
        [DatasetNode(name="raw", digest=tags[RAW_DIGEST_TAG], location=tags.get(RAW_URI_TAG))]
        if RAW_DIGEST_TAG in tags
        else []
    )
    seen = {d.digest for d in training}
    for step in steps:  # the splits the training pipeline's prepare step wrote
        for dataset in step.writes if step.step == "prepare" else []:
            if dataset.digest not in seen:
                training.append(dataset.model_copy(update={"name": dataset.name.removeprefix("output.")}))
                seen.add(dataset.digest)
    quoted = name.replace("'", "")
    about = f"tags.`{MODEL_NAME_TAG}` = '{quoted}' and tags.`{MODEL_VERSION_TAG}` = '{version}'"
    scoring = [
        run_node(r)
        for r in _runs(client, f"tags.`{PIPELINE_TAG}` = '{SCORING_PIPELINE}' and {about}")
        if not r.data.tags.get(PARENT_TAG)
    ]
    checks = [
        run_node(r)
        for pipeline in (MONITOR_PIPELINE, QUALITY_PIPELINE)
        for r in _runs(client, f"tags.`{PIPELINE_TAG}` = '{pipeline}' and {about}")
        if not r.data.tags.get(PARENT_TAG)
    ]
    approval = {
        k.removeprefix("approval."): v
        for k, v in tags.items()
        if k in (APPROVED_BY_TAG, APPROVAL_AT_TAG, APPROVAL_REASON_TAG, APPROVAL_PREVIOUS_STATUS_TAG)
    }
    return VersionLineage(
        model_name=name,
        version=str(found.version),
        aliases=list(getattr(found, "aliases", []) or []),
        approval_status=tags.get(APPROVAL_TAG, "none"),
        metrics={
            k.removeprefix(METRIC_TAG_PREFIX): v for k, v in tags.items() if k.startswith(METRIC_TAG_PREFIX)
        },
        training_data=training,
        code=code,
        execution=execution,
        steps=steps,
        trigger={
            k.removeprefix(TRIGGER_TAG_PREFIX): v for k, v in tags.items() if k.startswith(TRIGGER_TAG_PREFIX)
        },
        approval=approval,
        replaced=_replaced(tags, str(found.version)),
        scoring_runs=sorted(scoring, key=lambda r: r.started or 0),
        monitoring_checks=sorted(checks, key=lambda r: r.started or 0),
    )


def _replaced(tags: dict[str, str], version: str) -> str | None:
    """The champion an approval moved away from, else the one the version was compared with."""
    previous = tags.get(APPROVAL_PREVIOUS_CHAMPION_TAG)
    if previous and previous not in ("none", version):
        return previous
    return tags.get(COMPARED_WITH_TAG)


def dataset_lineage(client: MlflowClient, digest: str, given: str) -> DatasetLineage:
    """Every run that read or wrote the content with this digest (a full sha256, or a prefix of at
    least 12 hex digits), and the versions their executions registered."""
    digest = digest.lower()
    uses: list[DatasetUse] = []
    for run in _runs(client, ""):
        node = run_node(run)
        for role, datasets in (("read", node.reads), ("wrote", node.writes)):
            for dataset in datasets:
                if dataset.digest.startswith(digest) or digest.startswith(dataset.digest):
                    uses.append(DatasetUse(run=node, role=role, as_name=dataset.name))
    registered: dict[str, list[str]] = {}
    for use in uses:  # the versions the run's execution registered (a step's, or its own)
        execution = use.run.parent or use.run.run_id
        if execution not in registered:
            versions = client.search_model_versions(f"run_id = '{execution}'")
            registered[execution] = sorted(f"{v.name} v{v.version}" for v in versions)
        use.registered = registered[execution]
    uses.sort(key=lambda u: (u.run.started or 0, u.run.name, u.role))
    return DatasetLineage(digest=digest, given=given, uses=uses)


def champion_mark(lineage: VersionLineage) -> str:
    return f" (@{CHAMPION_ALIAS})" if CHAMPION_ALIAS in lineage.aliases else ""


def as_json(value: BaseModel) -> dict[str, Any]:
    return value.model_dump(mode="json")
