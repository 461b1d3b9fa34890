"""Retraining: the training pipeline on a new data window, judged against the current champion.

    python -m flows.retrain --help
    python -m flows.retrain --data landing/ --window-days 120 --reason "drift detected"

The challenger trains on the last `--window-days` of `--data` (default: the data the champion was
trained on, found through its lineage) and is evaluated with the champion on the same, most recent
held-out period. It is promoted only when it beats the champion by `--champion-margin`; otherwise
its version is registered as `Rejected`, with the reason, and the champion stays.

At most one retrain per model runs at a time (a Prefect global concurrency limit named
`retrain-<model>`), and a retrain asked for within `--cooldown-minutes` of the last one is ignored,
and says so, unless `--force`. The triggering event (id, drift report) is recorded on the MLflow
run and the model version.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports: the collector paused, the warm pool or the Prefect server
    from infra.command import begin_command

    begin_command(__spec__)

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field, model_validator

from flows.pipeline import PipelineParams, PipelineResult, RegistryParams, training_pipeline, where_to_look
from tasks.monitoring.guards import retrain_lock
from tasks.steps import lineage, markdown, summary
from tasks.steps.cli import exit_process, run_flow_cli
from tasks.steps.model import find_champion
from tasks.steps.settings import get_settings
from tasks.steps.tags import RAW_URI_TAG
from tasks.tabular.project import require_model_name
from tasks.tabular.quality import ON_VIOLATION_HELP, OnViolation, QualityRules
from tasks.tabular.registry import last_retrain


class RetrainQuality(QualityRules):
    """New data that breaks the champion's constraints stops a retrain; data that moved does not."""

    on_quality_violation: OnViolation = Field(
        default="fail-on-broken",
        description="New data that breaks the champion's constraints. A retrain is for data that moved, so "
        f"by default only broken data stops it. {ON_VIOLATION_HELP}",
    )


class RetrainRegistry(RegistryParams):
    """A challenger that loses is registered as Rejected, with the reason: the retrain is on record."""

    on_gate_failure: Literal["fail", "reject"] = Field(
        default="reject", description="reject: register a losing challenger as Rejected; fail: FailStep."
    )


class RetrainParams(PipelineParams):
    """The pipeline's parameters with retraining defaults, plus what triggered it and the guards."""

    data: str | None = Field(
        default=None,
        description="New data: a CSV or Parquet file or folder; default: the champion's training data.",
    )
    quality: RetrainQuality = Field(default_factory=RetrainQuality)
    registry: RetrainRegistry = Field(default_factory=RetrainRegistry)
    reason: str = Field(default="scheduled retrain", max_length=500, description="Why this retrain runs.")
    force: bool = Field(default=False, description="Run even inside the cooldown window.")
    cooldown_minutes: float = Field(
        default=60, ge=0, description="Ignore requests this soon after the last retrain of the model."
    )
    event_id: str | None = Field(default=None, description="The Prefect event that triggered this retrain.")
    drift_report: str | None = Field(default=None, description="URI of the drift report behind the event.")

    @classmethod
    def completes_table(cls) -> bool:
        return False  # the table's columns not given are the champion's (`champion_table`)

    @model_validator(mode="after")
    def _model_named(self) -> RetrainParams:
        require_model_name(self.model_name, "retrain")
        return self


class RetrainResult(BaseModel):
    model_name: str
    ignored: str | None = Field(default=None, description="Why nothing was trained, if so.")
    pipeline: PipelineResult | None = None


@flow(name="retrain", log_prints=True, result_serializer="json")
def retrain(params: RetrainParams) -> RetrainResult:
    """Train a challenger on the new window; promote it only if it beats the champion."""
    logger = get_run_logger()
    model_name = require_model_name(params.model_name, "retrain")
    settings = get_settings()
    trigger = {
        k: v for k, v in {"event_id": params.event_id, "drift_report": params.drift_report}.items() if v
    }
    client = lineage.mlflow_client(settings)
    champion = find_champion(client, model_name)
    if champion is None:
        # Checked before a lock is made for the name: a stream of made-up names costs nothing.
        return _ignored(
            params,
            f"{model_name} has no champion: only a registered model with a champion is retrained "
            "(train it first with python -m flows.pipeline)",
        )
    with retrain_lock(model_name) as holder:
        if holder is not None:
            return _ignored(params, f"a retrain of {model_name} is already running ({holder})")
        last = last_retrain(client, model_name)
        if last is not None and not params.force:
            since = datetime.now(UTC) - last.created
            if since < timedelta(minutes=params.cooldown_minutes):
                until = (last.created + timedelta(minutes=params.cooldown_minutes)).isoformat(
                    timespec="seconds"
                )
                return _ignored(
                    params,
                    f"cooldown: {model_name} v{last.version} was retrained {since.total_seconds() / 60:.1f} min "
                    f"ago (cooldown {params.cooldown_minutes:g} min, until {until}); use --force to retrain anyway",
                )
        data = params.data or _champion_data(champion, model_name)
        given = params.model_dump(include=set(PipelineParams.model_fields))
        pipeline_params = PipelineParams.model_validate(
            {
                **champion_table(client, champion),
                **{k: v for k, v in given.items() if v is not None},
                "data": data,
                "trigger": {**trigger, "flow": "retrain"},
            }
        )
        logger.info(
            "retraining %s on %s%s (%s)",
            model_name,
            data,
            f", last {params.split.window_days} days" if params.split.window_days else "",
            params.reason,
        )
        result = training_pipeline(pipeline_params)
    headline = decide(params, result, str(champion.version))
    print(f"retrain of {model_name} ({params.reason}): {headline}; {result.gate.message}")
    return RetrainResult(model_name=model_name, pipeline=result)


def _trigger_facts(params: RetrainParams) -> list[summary.Fact]:
    facts = [summary.Fact("Reason", params.reason)]
    if params.event_id:
        facts.append(summary.Fact("Event", params.event_id))
    if params.drift_report:
        report = params.drift_report
        facts.append(
            summary.Fact("Report behind the event", report, report if report.startswith("http") else None)
        )
    return facts


def decide(params: RetrainParams, result: PipelineResult, champion: str) -> str:
    """Say what the retrain decided, with the figures it decided on: a `retrain-decision` artifact
    and the flow run's summary. Returns the headline."""
    from prefect.artifacts import create_markdown_artifact

    registered = result.registered
    if registered is not None and registered.champion and registered.version != champion:
        outcome, headline = "promoted", f"promoted: v{registered.version} replaces v{champion} as champion"
    elif registered is not None and registered.status == "PendingManualApproval":
        outcome, headline = (
            "pending",
            (
                f"v{registered.version} waits for approval (python -m flows.approve {registered.name} "
                f"{registered.version} --approve|--reject --reason ...); v{champion} stays champion"
            ),
        )
    else:
        version = f"v{registered.version} registered as {registered.status}; " if registered else ""
        outcome, headline = "rejected", f"rejected: {version}v{champion} stays champion"
    checks = markdown.table(
        ["check", "challenger", "op", "threshold", "result"],
        [
            [
                c.left_name,
                f"{c.left:.4g}",
                c.op,
                f"{c.right_name} = {c.right:.4g}",
                "passed" if c.passed else "missed",
            ]
            for c in result.gate.checks
        ],
    )
    version_link = (
        markdown.link(f"{registered.name} v{registered.version}", registered.link)
        if registered and registered.link
        else (markdown.text(f"{registered.name} v{registered.version}") if registered else "none")
    )
    create_markdown_artifact(
        key="retrain-decision",
        markdown=f"### {outcome.capitalize()}: {markdown.text(headline)}\n\n{checks}\n\n"
        f"Challenger: {version_link}. Reason: {markdown.text(params.reason)}\n",
        description=headline,
    )
    facts = [
        summary.Fact("Decision", headline),
        summary.Fact("Quality gate", result.gate.message),
        summary.Fact(
            "Model version",
            f"{registered.name} v{registered.version}: {registered.status}" if registered else "none",
            registered.link if registered else None,
        ),
        summary.Fact("Training execution (MLflow)", result.mlflow_run_id, result.mlflow_run_link),
        *_trigger_facts(params),
    ]
    summary.publish(f"retrain of {params.model_name}: {outcome}", facts, headline)
    return headline


def _ignored(params: RetrainParams, why: str) -> RetrainResult:
    from prefect.artifacts import create_markdown_artifact

    message = f"retrain request ignored: {why}" + (f" (event {params.event_id})" if params.event_id else "")
    get_run_logger().warning(message)
    create_markdown_artifact(
        key="retrain-ignored", markdown=f"**Ignored.** {markdown.text(why)}\n", description=message
    )
    facts = [summary.Fact("Decision", f"ignored: {why}"), *_trigger_facts(params)]
    summary.publish(f"retrain of {params.model_name}: ignored", facts, message)
    return RetrainResult(model_name=params.model_name, ignored=why)


TABLE_FIELDS = ("target", "time_column", "drop_columns", "key_columns", "task")


def champion_table(client, champion) -> dict[str, object]:
    """The table's columns the champion was trained with (its execution's parameters), so a retrain
    on new data reads it the same way; empty for a version whose execution stored none."""
    from tasks.steps.errors import NotInRegistry

    try:
        stored = lineage.execution_params(client, champion.run_id)
    except NotInRegistry:
        return {}
    return {k: stored[k] for k in TABLE_FIELDS if stored.get(k) is not None}


def _champion_data(champion, model_name: str) -> str:
    """The training data of the champion found at the start of the run (its lineage tag)."""
    from tasks.steps.errors import NotInRegistry

    uri = champion.tags.get(RAW_URI_TAG)
    if not uri:
        raise NotInRegistry(
            f"no --data given and {model_name}'s champion v{champion.version} has no recorded training data URI "
            "to retrain on"
        )
    return uri


def summarise(result: RetrainResult) -> str:
    if result.ignored:
        return f"Ignored:         {result.ignored}"
    assert result.pipeline is not None
    return where_to_look(result.pipeline)


def main(argv: Sequence[str] | None = None) -> int:
    return run_flow_cli(retrain, RetrainParams, argv, "python -m flows.retrain", __doc__ or "", summarise)


if __name__ == "__main__":
    exit_process(main())
