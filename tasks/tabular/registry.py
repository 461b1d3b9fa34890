"""The model registry side: find the champion, register a version with its approval status (ModelStep)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from pydantic import BaseModel

from tasks.steps import RetryPolicy, current_step, lineage, model_step
from tasks.steps.model import (
    CARD_ARTIFACT,
    METRIC_TAG_PREFIX,
    ApprovalStatus,
    RegisteredVersion,
    find_champion,
    holds,
    place_version,
    registered,
)
from tasks.steps.refs import DatasetRef, ModelRef
from tasks.steps.tags import (
    BASELINE_RUN_TAG,
    BASELINE_TAG,
    COMPARED_WITH_TAG,
    EXECUTION_REASON_TAG,
    FLOW_RUN_NAME_TAG,
    FLOW_RUN_URL_TAG,
    QUALITY_RUN_TAG,
    QUALITY_TAG,
    RAW_DIGEST_TAG,
    RAW_PINNED_TAG,
    RAW_URI_TAG,
    TRIGGER_TAG_PREFIX,
)
from tasks.tabular import model_card

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from tasks.tabular.featurize import FeatureSpec
    from tasks.tabular.quality import QualityReport


# A version's tags: only what code reads back. What people read is its description, the model card
# (tasks.tabular.model_card), which also holds what the tags hold.


class StoredWithRun(Protocol):
    """What a version points to: something stored (a baseline, data-quality constraints) and the run
    that stored it. The monitoring baseline is one; the registry needs no more of it."""

    @property
    def uri(self) -> str: ...

    @property
    def run_id(self) -> str: ...


def comparable_champion(client: MlflowClient, name: str, model: ModelRef) -> str | None:
    """The champion version a challenger must beat, or None: there is none, or it is this very model
    (a re-run that reused the champion's training outputs has nothing to compare)."""
    champion = find_champion(client, name)
    if champion is None or holds(champion, model):
        return None
    return str(champion.version)


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
def register(  # noqa: PLR0913, PLR0917  # a step's inputs are what its lineage and cache key record
    model: ModelRef,
    model_name: str,
    status: ApprovalStatus,
    reason: str,
    metrics: dict[str, float],
    datasets: dict[str, DatasetRef],
    baseline: StoredWithRun | None = None,
    champion: tuple[str, dict[str, float]] | None = None,
    quality: QualityReport | None = None,
    features: FeatureSpec | None = None,
    boundaries: dict[str, str] | None = None,
) -> RegisteredVersion:
    """Register a new version, with its execution as source run and its model card as description;
    move `champion` to it only when it is Approved. `champion`: the version it was compared with and
    that version's metrics on the same test data. `quality`: the input's data-quality constraints,
    the baseline later data is checked against. `features`, `boundaries`: what the card describes."""
    step = current_step()
    client = step.client
    pipeline = lineage.current_pipeline()
    execution = client.get_run(pipeline.run_id).data.tags  # the parent run: Prefect flow run and reason
    trigger = {k: v for k, v in execution.items() if k.startswith(TRIGGER_TAG_PREFIX)}
    raw = datasets.get("raw")
    tags = {**trigger, **{f"{METRIC_TAG_PREFIX}{k}": f"{v:.6g}" for k, v in metrics.items()}}
    if raw is not None:
        tags.update({RAW_URI_TAG: raw.location, RAW_DIGEST_TAG: raw.digest})
        if raw.source:
            tags[RAW_PINNED_TAG] = raw.uri
    if baseline is not None:
        tags.update({BASELINE_TAG: baseline.uri, BASELINE_RUN_TAG: baseline.run_id})
    if quality is not None:
        tags.update({QUALITY_TAG: quality.uri, QUALITY_RUN_TAG: quality.run_id})
    if champion is not None:  # the champion it was judged against, on the same test data
        tags[COMPARED_WITH_TAG] = champion[0]
    placed = place_version(client, model_name, model, status, tags)
    if not placed.described:
        facts = model_card.CardFacts(
            model_name=model_name,
            version=placed.version,
            status=placed.status,
            champion=placed.promoted,
            previous_champion=placed.previous_champion,
            task=features.task if features else model.task,
            target=features.target if features else "",
            inputs=features.input_columns if features else [],
            metrics=metrics,
            compared=champion,
            gate_message=reason,
            datasets=datasets,
            boundaries=boundaries or {},
            reason=execution.get(EXECUTION_REASON_TAG, ""),
            trigger={k.removeprefix(TRIGGER_TAG_PREFIX): v for k, v in trigger.items()},
            execution_run_id=pipeline.run_id,
            execution_link=lineage.run_link(pipeline.tracking_uri, pipeline.experiment_id, pipeline.run_id),
            flow_run_name=execution.get(FLOW_RUN_NAME_TAG, ""),
            flow_run_link=execution.get(FLOW_RUN_URL_TAG),
            registered_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        card = model_card.render(facts)
        client.update_model_version(model_name, placed.version, description=card)
        client.log_text(pipeline.run_id, card, CARD_ARTIFACT)
        if features is not None:
            champion_now = placed.version if placed.promoted else placed.previous_champion
            client.update_registered_model(
                model_name,
                description=model_card.model_description(
                    model_name, features.task, features.target, champion_now
                ),
            )
    return registered(model_name, placed)
