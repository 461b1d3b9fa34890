"""The model registry side: find the champion, register a version with its approval status (ModelStep)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator, BaseModel

from tasks import lineage, model_card
from tasks.refs import DatasetRef, ModelRef
from tasks.steps import RetryPolicy, current_step, model_step
from tasks.steps.model import APPROVAL_TAG, CHAMPION_ALIAS, ApprovalStatus

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from tasks.baseline import Baseline
    from tasks.featurize import FeatureSpec
    from tasks.quality import QualityReport


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

# A version's tags: only what code reads back. What people read is its description, the model card
# (tasks.model_card), which also holds what the tags hold.
BASELINE_TAG = "baseline.uri"  # where the version's monitoring baseline is (tasks.baseline)
BASELINE_RUN_TAG = "baseline.run_id"
QUALITY_TAG = "quality.uri"  # where the version's data-quality constraints are (tasks.quality)
QUALITY_RUN_TAG = "quality.run_id"
RAW_URI_TAG = "dataset.raw.uri"  # the user's training data (a retrain's default data)
RAW_DIGEST_TAG = "dataset.raw.digest"
RAW_PINNED_TAG = "dataset.raw.pinned"  # the copy the execution read (tasks.snapshot)
TRIGGER_TAG_PREFIX = "keel.trigger."  # what started the execution: flow, event_id, drift_report
COMPARED_WITH_TAG = "compared_with"  # the champion version it was judged against
METRIC_TAG_PREFIX = "metric."  # test metrics, to sort and filter versions by
LAST_VERDICT_TAG = "drift.last_verdict"  # the monitor's last decision about this version
LAST_REPORT_TAG = "drift.last_report"
HISTORY_TAG = "drift.history"  # the monitoring history picture (tasks.history)


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


def comparable_champion(client: MlflowClient, name: str, model: ModelRef) -> str | None:
    """The champion version a challenger must beat, or None: there is none, or it is this very model
    (a re-run that reused the champion's training outputs has nothing to compare)."""
    champion = find_champion(client, name)
    if champion is None or holds(champion, model):
        return None
    return str(champion.version)


MODEL_DIGEST_TAG = "model.digest"


def holds(version: ModelVersion, model: ModelRef) -> bool:
    """Whether a registered version is this model: the same logged model, or one with the same
    content (the same trees, feature spec and input example, logged again by a re-run)."""
    if version.source == model.uri or bool(model.model_id and version.model_id == model.model_id):
        return True
    return bool(model.digest and version.tags.get(MODEL_DIGEST_TAG) == model.digest)


def registered_version(
    client: MlflowClient, name: str, model: ModelRef, execution: str
) -> ModelVersion | None:
    """The version of `name` that already holds this logged model, if any (registration is idempotent:
    a resumed, retried or cached execution never registers the same model twice). Versions are
    registered with their execution's run (`execution`); older ones with the training step's."""
    from mlflow.exceptions import MlflowException

    queries = [f"name = '{name}' and run_id = '{run_id}'" for run_id in {model.run_id, execution}]
    if model.digest:
        queries.insert(0, f"name = '{name}' and tags.`{MODEL_DIGEST_TAG}` = '{model.digest}'")
    versions = []
    for query in queries:
        try:
            versions += client.search_model_versions(query)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                raise
    same = [v for v in versions if holds(v, model)]
    return min(same, key=lambda v: int(v.version)) if same else None


def made_by_retrain(version: ModelVersion) -> bool:
    """Whether a retrain flow registered this version (its execution's trigger says so)."""
    return version.tags.get(f"{TRIGGER_TAG_PREFIX}flow") == "retrain"


class VersionCreated(BaseModel):
    version: str
    created: datetime


def last_retrain(client: MlflowClient, name: str, look_back: int = 50) -> VersionCreated | None:
    """The newest version a retrain flow registered (any status), for the cooldown."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(
            f"name = '{name}'", max_results=look_back, order_by=["creation_timestamp DESC"]
        )
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
            return None
        raise
    for version in versions:
        if made_by_retrain(version):
            created = datetime.fromtimestamp(version.creation_timestamp / 1000, tz=UTC)
            return VersionCreated(version=str(version.version), created=created)
    return None


@model_step(name="register", retry=RetryPolicy(attempts=3, retry_on=("tracking-unavailable",)))
def register(
    model: ModelRef,
    model_name: str,
    status: ApprovalStatus,
    reason: str,
    metrics: dict[str, float],
    datasets: dict[str, DatasetRef],
    baseline: Baseline | None = None,
    champion: tuple[str, dict[str, float]] | None = None,
    quality: QualityReport | None = None,
    features: FeatureSpec | None = None,
    boundaries: dict[str, str] | None = None,
) -> RegisteredVersion:
    """Register a new version, with its execution as source run and its model card as description;
    move `champion` to it only when it is Approved. `champion`: the version it was compared with and
    that version's metrics on the same test data. `quality`: the input's data-quality constraints,
    the baseline later data is checked against. `features`, `boundaries`: what the card describes."""
    from mlflow.exceptions import MlflowException
    from prefect import get_run_logger

    step = current_step()
    client = step.client
    pipeline = lineage.current_pipeline()
    try:
        client.create_registered_model(model_name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    execution = client.get_run(pipeline.run_id).data.tags  # the parent run: Prefect flow run and reason
    trigger = {k: v for k, v in execution.items() if k.startswith(TRIGGER_TAG_PREFIX)}
    raw = datasets.get("raw")
    tags = {
        APPROVAL_TAG: status,
        **trigger,
        **{f"{METRIC_TAG_PREFIX}{k}": f"{v:.6g}" for k, v in metrics.items()},
    }
    if raw is not None:
        tags.update({RAW_URI_TAG: raw.location, RAW_DIGEST_TAG: raw.digest})
        if raw.source:
            tags[RAW_PINNED_TAG] = raw.uri
    if baseline is not None:
        tags.update({BASELINE_TAG: baseline.uri, BASELINE_RUN_TAG: baseline.run_id})
    if quality is not None:
        tags.update({QUALITY_TAG: quality.uri, QUALITY_RUN_TAG: quality.run_id})
    if model.digest:
        tags[MODEL_DIGEST_TAG] = model.digest
    if champion is not None:  # the champion it was judged against, on the same test data
        tags[COMPARED_WITH_TAG] = champion[0]
    existing = registered_version(client, model_name, model, pipeline.run_id)
    if existing is not None:  # this model is registered already: keep that version, don't add one
        version, status = existing, existing.tags.get(APPROVAL_TAG, status)
    else:
        version = client.create_model_version(
            model_name, source=model.uri, run_id=pipeline.run_id, tags=tags, model_id=model.model_id
        )
    previous = find_champion(client, model_name)
    promoted = status == "Approved"
    already = previous is not None and str(previous.version) == str(version.version)
    if promoted and not already:
        client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version.version)
    if existing is None or not existing.description:  # a retry after the version was created writes it
        facts = model_card.CardFacts(
            model_name=model_name,
            version=str(version.version),
            status=status,
            champion=promoted,
            previous_champion=str(previous.version) if previous else None,
            task=features.task if features else model.task,
            target=features.target if features else "",
            inputs=features.input_columns if features else [],
            metrics=metrics,
            compared=champion,
            gate_message=reason,
            datasets=datasets,
            boundaries=boundaries or {},
            reason=execution.get("keel.reason", ""),
            trigger={k.removeprefix(TRIGGER_TAG_PREFIX): v for k, v in trigger.items()},
            execution_run_id=pipeline.run_id,
            execution_link=lineage.run_link(pipeline.tracking_uri, pipeline.experiment_id, pipeline.run_id),
            flow_run_name=execution.get("prefect.flow_run_name", ""),
            flow_run_link=execution.get("prefect.flow_run_url"),
            registered_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        card = model_card.render(facts)
        client.update_model_version(model_name, version.version, description=card)
        client.log_text(pipeline.run_id, card, model_card.CARD_ARTIFACT)
        if features is not None:
            champion_now = version.version if promoted else (previous.version if previous else None)
            client.update_registered_model(
                model_name,
                description=model_card.model_description(
                    model_name, features.task, features.target, str(champion_now) if champion_now else None
                ),
            )
    alias = f"{CHAMPION_ALIAS} unchanged"
    if promoted:
        alias = (
            f"{CHAMPION_ALIAS} stays v{version.version}"
            if already
            else f"{CHAMPION_ALIAS} -> v{version.version}"
        )
    get_run_logger().info(
        "%s %s v%s as %s; %s",
        "already registered:" if existing else "registered",
        model_name,
        version.version,
        status,
        alias,
    )
    step.set_tags({"keel.registered_version": version.version, APPROVAL_TAG: status})
    return RegisteredVersion(
        name=model_name,
        version=str(version.version),
        status=status,
        champion=promoted,
        previous_champion=str(previous.version) if previous else None,
        uri=f"models:/{model_name}/{version.version}",
        existing=existing is not None,
        link=lineage.version_link(pipeline.tracking_uri, model_name, str(version.version)),
    )
