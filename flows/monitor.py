"""The drift monitor (SageMaker Model Monitor): a batch of new data against the champion's baseline.

    python -m flows.monitor --batch data/new.csv
    python -m flows.monitor --batch landing/ --latest      # the folder's last file by name

The batch (a CSV or Parquet file, or a folder of them; with or without the target column) is
checked on the Dask workers against the statistics and normal ranges stored with the champion's
version at training time: drift of every column and of the predictions, and the champion's
performance (realized from labels, estimated without them). A named policy (`--policy`) decides
whether the batch calls for a retrain. The Evidently report (HTML + JSON) goes to MLflow next to
that version and is linked from Prefect, and the decision is emitted as a Prefect event
(`keel.drift.detected`: retrain; `keel.drift.not-detected`: checked, fine) about the model version,
which the retrain deployment's trigger listens for. First the batch is checked against the
champion's data-quality constraints: violations are reported as a table and, with
`--on-quality-violation fail`, stop the run. Bad input fails the run (exit 2) before anything is
emitted.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports: the collector paused, the warm pool or the Prefect server
    from infra.command import begin_command

    begin_command(__spec__)

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field, model_validator

from tasks.monitoring.baseline import load_baseline
from tasks.monitoring.drift import (
    MIN_BATCH_ROWS,
    DriftCheck,
    DriftReportRef,
    batch_files,
    batch_ref,
    check_drift,
    emit_verdict,
    report_drift,
    scored_by,
)
from tasks.monitoring.history import HistoryRef, checks_text, point_metrics, update_history
from tasks.monitoring.policies import PolicySettings, settings_of
from tasks.steps import Params, current_pipeline, lineage, pipeline
from tasks.steps.cli import exit_process
from tasks.steps.errors import DataValidationError
from tasks.steps.model import MODEL_NAME_HELP, ModelName
from tasks.steps.refs import DatasetRef
from tasks.steps.settings import get_settings
from tasks.steps.tags import (
    EVENT_ID_TAG,
    EVENT_TAG,
    MODEL_NAME_TAG,
    MODEL_VERSION_TAG,
    MONITOR_PIPELINE,
    POLICY_TAG,
)
from tasks.steps.transform import MODEL_VERSION_COLUMN
from tasks.tabular.project import configured_model_name, require_model_name
from tasks.tabular.quality import (
    ON_VIOLATION_HELP,
    OnViolation,
    QualityReport,
    QualityRules,
    check_quality,
    version_constraints,
)
from tasks.tabular.snapshot import reported_as


class MonitorQuality(QualityRules):
    """A batch that breaks the champion's data-quality constraints is reported, not refused, by default."""

    on_quality_violation: OnViolation = Field(
        default="warn",
        description=f"A batch that breaks the champion's data-quality constraints (checked before drift). {ON_VIOLATION_HELP}",
    )


class MonitorParams(Params, PolicySettings):
    """What to check, against which model, and which policy decides on a retrain."""

    batch: str = Field(min_length=1, description="CSV or Parquet file, or a folder of them, to check.")
    latest: bool = Field(default=False, description="Check only the last file of the folder, by name.")
    model_name: ModelName | None = Field(
        default=None, description=f"Registered model to monitor (default: keel.toml's): {MODEL_NAME_HELP}."
    )
    min_batch_rows: int = Field(
        default=MIN_BATCH_ROWS,
        ge=1,
        description="Fewer rows than this are too few to judge: the batch is refused (exit 2), no event.",
    )
    max_report_mb: float = Field(
        default=50,
        gt=0,
        description="An Evidently report larger than this is not kept (the verdict and scores still are).",
    )
    version: str | None = Field(
        default=None,
        pattern=r"^[1-9][0-9]{0,9}$",
        description="Version to check against; default: @champion.",
    )
    quality: MonitorQuality = Field(default_factory=MonitorQuality)

    @model_validator(mode="before")
    @classmethod
    def _project_model(cls, values: Any) -> Any:
        return configured_model_name(values)

    @model_validator(mode="after")
    def _model_named(self) -> MonitorParams:
        require_model_name(self.model_name, "monitor")
        return self


class MonitorResult(BaseModel):
    quality: QualityReport
    check: DriftCheck
    report: DriftReportRef
    event: str
    event_id: str | None
    history: HistoryRef
    mlflow_run_id: str
    prefect_flow_run: dict[str, str]


def summarise(result: MonitorResult) -> str:
    check = result.check
    verdict, decision = check.verdict, check.decision
    features = verdict.features()
    top = sorted(features, key=lambda c: -(c.importance or 0))[:5]
    lines = [
        f"Decision:        {'RETRAIN' if decision.retrain else 'no retrain'} (policy {decision.policy}) — "
        f"{check.model_name} v{check.version}, {check.rows:,} rows of {check.batch.location}",
        *(f"                 {reason}" for reason in decision.reasons),
        *([f"                 {decision.blind_reason()}"] if decision.could_not_judge else []),
        "Signals:         "
        + "\n                 ".join(
            f"{s.name}: {_shown(s.value)}"
            + (f" (threshold {_shown(s.threshold)})" if s.threshold is not None else "")
            + (" FIRED" if s.fired else "")
            for s in verdict.signals.values()
        ),
        f"Drifted inputs:  {len(check.drifted_columns)} of {len(features)} beyond their calibrated thresholds"
        + (f" ({', '.join(check.drifted_columns)})" if check.drifted_columns else "")
        + f"; Evidently's fixed rule: {sum(c.evidently_drift for c in features)}",
        "Top inputs:      "
        + ", ".join(
            f"{c.column} (importance {c.importance or 0:.2f}) {c.score:.3f}"
            + (f" / {c.threshold:.3f}" if c.threshold is not None else "")
            for c in top
        ),
        "Performance:     "
        + (", ".join(f"{k} {v:.4g}" for k, v in verdict.realized.items()) or "no labels")
        + " realized; "
        + (", ".join(f"{k} {v:.4g}" for k, v in verdict.estimated.items()) or "none")
        + " estimated",
        f"Data quality:    {len(result.quality.violations)} violations of the champion's constraints"
        + (
            f" ({', '.join(f'{v.column}: {v.rule}' for v in result.quality.violations[:5])})"
            if result.quality.violations
            else ""
        ),
        f"Report:          {result.report.link}",
        f"History:         {result.history.link} ({checks_text(result.history.checks)})",
        f"Event:           {result.event} ({result.event_id})",
        f"MLflow run:      {result.mlflow_run_id}",
    ]
    return "\n".join(lines)


def _shown(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4g}"


@pipeline(
    name=MONITOR_PIPELINE,
    params=MonitorParams,
    run_tags=lambda params: {MODEL_NAME_TAG: params.model_name or ""},
    summary=summarise,
    after_bad_input="nothing checked, no event emitted",
    reads=lambda params: [params.batch],
)
def monitor(params: MonitorParams) -> MonitorResult:
    """Check one batch for drift against the champion, report it, and emit the verdict as an event."""
    settings = get_settings()
    model_name = require_model_name(params.model_name, "monitor")
    settings_ = settings_of(params)
    checked_at = datetime.now(UTC).isoformat(timespec="seconds")
    batch_location, batch_files_ = batch_files(params.batch, params.latest, settings.data_access)
    run = current_pipeline()
    client = run.client()
    # pinned once: both checks read the same copy, whatever happens to the file meanwhile
    batch = batch_ref(batch_location, batch_files_, settings.datasets_root)
    champion = load_baseline(client, model_name, checked_version(batch, model_name, params.version))
    with reported_as(batch):  # errors about the pinned copy name the user's file
        quality = check_quality(
            batch,
            champion.profile.features.time_column,
            [],
            version_constraints(client, model_name, champion.version),
            params.quality,
            [],
            champion.profile.features.input_columns,
            target=champion.profile.features.target,
        )
        if quality.rows < params.min_batch_rows:
            raise DataValidationError(
                batch.location,
                f"too few rows to judge: {quality.rows} (at least {params.min_batch_rows}, --min-batch-rows)"
                if quality.rows
                else "the batch has no rows",
            )
        check = check_drift(
            batch,
            model_name,
            champion.version,  # the version the quality check used, even if the alias moved since
            settings_,
        )
    report = report_drift(check, settings_, checked_at, int(params.max_report_mb * 2**20))
    event_id = emit_verdict(check, report, checked_at)
    event = check.event
    lineage.set_tags(
        client,
        run.run_id,
        {
            MODEL_VERSION_TAG: check.version,
            POLICY_TAG: check.decision.policy,
            EVENT_TAG: event,
            EVENT_ID_TAG: event_id or "not emitted",
        },
    )
    lineage.log_metrics(client, run.run_id, point_metrics(check, len(quality.violations)))
    history = update_history(check, report, checked_at)
    decision = check.decision
    lineage.note(
        "Decision",
        f"{'retrain' if decision.retrain else 'no retrain'} (policy {decision.policy})"
        + (f": {'; '.join(decision.reasons)}" if decision.reasons else ""),
    )
    lineage.note(
        "Model version",
        f"{check.model_name} v{check.version}",
        lineage.version_link(run.tracking_uri, check.model_name, check.version),
    )
    lineage.note("Batch", f"{check.batch.location} ({check.rows:,} rows, sha256 {check.batch.digest[:12]})")
    lineage.note("Data quality", f"{len(quality.violations)} violations of the version's constraints")
    lineage.note("Drift report", "Evidently report and every column's scores", report.link)
    lineage.note("Event", f"{event} ({event_id or 'not emitted'})")
    print(f"{event} for {check.model_name} v{check.version} (event {event_id}); report: {report.link}")
    return MonitorResult(
        quality=quality,
        check=check,
        report=report,
        history=history,
        event=event,
        event_id=event_id,
        mlflow_run_id=run.run_id,
        prefect_flow_run=lineage.prefect_flow_run_tags(),
    )


def checked_version(batch: DatasetRef, model_name: str, version: str | None) -> str | None:
    """The version to check against: the one asked for; for a scoring output, the one that scored
    it (its predictions are that version's), which must then be the one asked for, if any."""
    scored = scored_by(batch, model_name)
    if scored is None:
        return version
    if version is not None and version != scored:
        raise DataValidationError(
            batch.location,
            f"scored by {model_name} v{scored}, not v{version}: its predictions are v{scored}'s "
            f"(check it against v{scored}, or score it again with v{version})",
            MODEL_VERSION_COLUMN,
        )
    return scored


def main(argv: Sequence[str] | None = None) -> int:
    return monitor.main(argv)


if __name__ == "__main__":
    exit_process(main())
