"""ModelStep: registers a model version in the MLflow registry with its approval status.

`register_model` is the step a pipeline author calls; the tabular pipeline's `register`
(`tasks.tabular.registry`) adds its own tags and model card on the same functions. Registration is
idempotent: a model already registered (the same logged model, or one with the same digest handed
on by a cached step) keeps its version, so a resumed or cached execution never adds a second one.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Literal, cast

from pydantic import AfterValidator, BaseModel

from tasks.steps import lineage, markdown
from tasks.steps.base import current_step, step_kind
from tasks.steps.events import emit_about_version
from tasks.steps.kinds import StepKind
from tasks.steps.refs import DatasetRef, ModelRef
from tasks.steps.retry import RetryPolicy
from tasks.steps.tags import (
    APPROVAL_TAG,
    CHAMPION_ALIAS,
    METRIC_TAG_PREFIX,
    MODEL_DIGEST_TAG,
    MODEL_PENDING_EVENT,
    REGISTERED_VERSION_TAG,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

ApprovalStatus = Literal["Approved", "PendingManualApproval", "Rejected"]
CARD_ARTIFACT = "model_card.md"  # the version's description, also kept on its execution's run

model_step = step_kind(StepKind.MODEL)

# A registered model's name as every flow takes it, checked before any work: it goes into MLflow search
# filters, Prefect event resource ids, lock names and paths, so only letters, digits and `._-` (MLflow
# itself refuses `/` and `:`; a quote would break its filters).
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
MODEL_NAME_HELP = "letters, digits, '.', '_' or '-', starting with a letter or digit; at most 200 characters"


def checked_model_name(name: str) -> str:
    if not MODEL_NAME_PATTERN.fullmatch(name):
        raise ValueError(f"{name[:80]!r} is not a model name keel accepts: {MODEL_NAME_HELP}")
    return name


ModelName = Annotated[str, AfterValidator(checked_model_name)]


class RegisteredVersion(BaseModel):
    name: str
    version: str
    status: ApprovalStatus
    champion: bool
    previous_champion: str | None = None
    uri: str
    existing: bool = False
    link: str | None = None  # its page in MLflow's UI, with a tracking server


def find_champion(client: MlflowClient, name: str) -> ModelVersion | None:
    """The version the `champion` alias points at, or None if there is no such model or alias."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        # An authenticating server denies an alias of a model that does not exist (it does not say
        # which names exist): ask for the model itself, which says "not found" to a permitted user.
        if exc.error_code == "PERMISSION_DENIED" and not _model_exists(client, name):
            return None
        raise


def _model_exists(client: MlflowClient, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            return False
        raise
    return True


def holds(version: ModelVersion, model: ModelRef) -> bool:
    """Whether a registered version is this model: the same logged model, or one with the same
    content (logged again by a re-run)."""
    if version.source == model.uri or bool(model.model_id and version.model_id == model.model_id):
        return True
    return bool(model.digest and version.tags.get(MODEL_DIGEST_TAG) == model.digest)


def registered_version(
    client: MlflowClient, name: str, model: ModelRef, execution: str
) -> ModelVersion | None:
    """The version of `name` that already holds this logged model, if any. Versions are registered
    with their execution's run (`execution`); older ones with the training step's."""
    from mlflow.exceptions import MlflowException

    queries = [f"name = '{name}' and run_id = '{run_id}'" for run_id in {model.run_id, execution}]
    if model.digest:
        queries.insert(0, f"name = '{name}' and tags.`{MODEL_DIGEST_TAG}` = '{model.digest}'")
    versions: list[ModelVersion] = []
    for query in queries:
        try:
            versions += client.search_model_versions(query)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                raise
    same = [v for v in versions if holds(v, model)]
    return min(same, key=lambda v: int(v.version)) if same else None


class Placed(BaseModel):
    """Where a registration left a model: its version, status, and what happened to `champion`."""

    version: str
    status: ApprovalStatus
    existing: bool
    previous_champion: str | None
    promoted: bool
    already_champion: bool
    described: bool  # it has a description (a retry after the version was created writes one)

    def alias_text(self) -> str:
        if not self.promoted:
            return f"{CHAMPION_ALIAS} unchanged"
        verb = "stays" if self.already_champion else "->"
        return f"{CHAMPION_ALIAS} {verb} v{self.version}"


def place_version(
    client: MlflowClient, name: str, model: ModelRef, status: ApprovalStatus, tags: dict[str, str]
) -> Placed:
    """Create the version (or find the one that holds this model already) with the running
    execution as its source run, and move `champion` to it when it is Approved."""
    from mlflow.exceptions import MlflowException

    execution = lineage.current_pipeline().run_id
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {APPROVAL_TAG: status, **tags, **({MODEL_DIGEST_TAG: model.digest} if model.digest else {})}
    existing = registered_version(client, name, model, execution)
    if existing is not None:  # this model is registered already: keep that version, don't add one
        version, status = existing, cast(ApprovalStatus, existing.tags.get(APPROVAL_TAG, status))
    else:
        version = client.create_model_version(
            name, source=model.uri, run_id=execution, tags=tags, model_id=model.model_id
        )
    previous = find_champion(client, name)
    promoted = status == "Approved"
    already = previous is not None and str(previous.version) == str(version.version)
    if promoted and not already:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, version.version)
    return Placed(
        version=str(version.version),
        status=status,
        existing=existing is not None,
        previous_champion=str(previous.version) if previous else None,
        promoted=promoted,
        already_champion=already,
        described=existing is not None and bool(existing.description),
    )


def registered(name: str, placed: Placed) -> RegisteredVersion:
    """What a registration step returns, and logs."""
    from prefect import get_run_logger

    pipeline = lineage.current_pipeline()
    get_run_logger().info(
        "%s %s v%s as %s; %s",
        "already registered:" if placed.existing else "registered",
        name,
        placed.version,
        placed.status,
        placed.alias_text(),
    )
    current_step().set_tags({REGISTERED_VERSION_TAG: placed.version, APPROVAL_TAG: placed.status})
    link = lineage.version_link(pipeline.tracking_uri, name, placed.version)
    if placed.status == "PendingManualApproval" and not placed.existing:
        # A person decides now: `deployments.serve` answers this event with a form in Prefect's UI.
        emit_about_version(
            MODEL_PENDING_EVENT,
            name,
            placed.version,
            {
                "status": placed.status,
                "champion": placed.previous_champion,
                "pipeline": pipeline.name,
                "execution_run_id": pipeline.run_id,
                "link": link,
            },
        )
    return RegisteredVersion(
        name=name,
        version=placed.version,
        status=placed.status,
        champion=placed.promoted,
        previous_champion=placed.previous_champion,
        uri=f"models:/{name}/{placed.version}",
        existing=placed.existing,
        link=link,
    )


def simple_card(
    name: str,
    placed: Placed,
    metrics: dict[str, float],
    datasets: dict[str, DatasetRef],
    reason: str,
) -> str:
    """A version's description: status, metrics, data and the execution that made it (escaped)."""
    pipeline = lineage.current_pipeline()
    execution = lineage.run_link(pipeline.tracking_uri, pipeline.experiment_id, pipeline.run_id)
    lines = [
        f"# {markdown.text(name)} v{placed.version}",
        "",
        f"**{placed.status}**" + (", champion" if placed.promoted else "") + f". {markdown.text(reason)}",
        "",
        "Made by execution "
        + (markdown.link(pipeline.run_id, execution) if execution else f"`{pipeline.run_id}`")
        + f" of pipeline {markdown.text(pipeline.name)}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.",
    ]
    if metrics:
        lines += ["", markdown.table(["metric", "value"], [[k, f"{v:.5g}"] for k, v in metrics.items()])]
    if datasets:
        rows = [
            [k, ref.rows if ref.rows is not None else "", ref.digest[:12], ref.location]
            for k, ref in datasets.items()
        ]
        lines += ["", markdown.table(["data", "rows", "sha256", "location"], rows)]
    return "\n".join(lines) + "\n"


@model_step(name="register", retry=RetryPolicy(attempts=3, retry_on=("tracking-unavailable",)))
def register_model(
    model: ModelRef,
    name: ModelName,
    metrics: dict[str, float] | None = None,
    datasets: dict[str, DatasetRef] | None = None,
    status: ApprovalStatus = "Approved",
    reason: str = "",
) -> RegisteredVersion:
    """Register `model` as a version of `name` (SageMaker's RegisterModel) with its approval status,
    metrics (as `metric.*` tags) and a model card as description; an Approved version becomes the
    `champion`. `datasets`: the data it was made and tested with, shown on the card."""
    checked_model_name(name)
    step = current_step()
    metrics = metrics or {}
    tags = {f"{METRIC_TAG_PREFIX}{k}": f"{v:.6g}" for k, v in metrics.items()}
    placed = place_version(step.client, name, model, status, tags)
    if not placed.described:
        card = simple_card(name, placed, metrics, datasets or {}, reason)
        step.client.update_model_version(name, placed.version, description=card)
        step.client.log_text(lineage.current_pipeline().run_id, card, CARD_ARTIFACT)  # on the execution
    return registered(name, placed)
