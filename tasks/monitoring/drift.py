"""The monitoring job (Model Monitor): a batch against the champion's calibrated baseline, and the
retrain decision of a named policy.

`check_drift` makes one pass over the new data on the Dask workers: every monitored column's drift
score (Evidently's own tests, from the stored reference profile; `tasks.monitoring.drift_stats`), the
champion's predictions, and its performance (realized from labels, estimated without them). The
batch is judged against the normal ranges calibrated at training time (`tasks.monitoring.verdict`), and the
policy decides (`tasks.monitoring.policies`). `report_drift` renders the Evidently report (HTML + JSON) from
bounded row samples, logs it to MLflow next to the champion's version with the columns table and
the verdict, and shows them in Prefect. `emit_verdict` sends the decision as a Prefect event.
"""

from __future__ import annotations

import math
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from tasks.monitoring import worker
from tasks.monitoring.baseline import ChampionBaseline, load_baseline
from tasks.monitoring.policies import Decision, PolicyContext, PolicySettings, decide
from tasks.monitoring.verdict import Verdict, judge
from tasks.steps import current_step, lineage, markdown, processing_step
from tasks.steps.access import DataAccess, checked_files
from tasks.steps.compute import dask_client
from tasks.steps.errors import DataValidationError, StepFailed
from tasks.steps.events import emit_about_version
from tasks.steps.refs import DatasetRef, content_digest
from tasks.steps.tags import (
    DRIFT_DETECTED_EVENT,
    DRIFT_NOT_DETECTED_EVENT,
    DRIFT_REASONS_TAG,
    EVENT_TAG,
    LAST_REPORT_TAG,
    LAST_VERDICT_TAG,
    MODEL_NAME_TAG,
    MODEL_VERSION_TAG,
    MONITOR_PIPELINE,
    PIPELINE_TAG,
    POLICY_TAG,
    RETRAIN_TAG,
)
from tasks.steps.transform import INFERENCE_ID, MODEL_NAME_COLUMN, MODEL_VERSION_COLUMN, PREDICTION_COLUMN
from tasks.tabular.data import pinned_table, read_table

if TYPE_CHECKING:
    import pandas as pd

# Fewer rows say nothing about a distribution: such a batch is refused rather than judged.
MIN_BATCH_ROWS = 30
CALIBRATED_POLICIES = ("calibrated-drift", "performance", "drift-and-performance")


class DriftCheck(BaseModel):
    """The verdict on one batch and the policy's decision, with everything needed to explain them."""

    model_name: str
    version: str
    batch: DatasetRef
    rows: int
    verdict: Verdict
    decision: Decision
    champion_quality: dict[str, float] = Field(default_factory=dict)
    calibration_chunk: str | None = Field(
        default=None, description="The batch size the champion was calibrated at."
    )
    notes: list[str] = Field(default_factory=list)
    sample: DatasetRef = Field(description="Row sample of the batch, with predictions, for the report.")

    @property
    def retrain(self) -> bool:
        return self.decision.retrain

    @property
    def event(self) -> str:
        return DRIFT_DETECTED_EVENT if self.decision.retrain else DRIFT_NOT_DETECTED_EVENT

    @property
    def drifted_columns(self) -> list[str]:
        """Inputs beyond their calibrated thresholds (Evidently's verdict where not calibrated)."""
        return [
            c.column
            for c in self.verdict.features()
            if (c.drift if c.drift is not None else c.evidently_drift) and not c.ignored
        ]


def batch_files(uri: str, latest: bool, access: DataAccess) -> tuple[str, list[str]]:
    """The data to check, once the data-access policy allows it (`tasks.steps.access`): the file itself, the
    folder, or with `latest` the folder's last file by name; with the files it stands for."""
    location, files = checked_files(uri, access)
    if not files:
        raise DataValidationError(location, "file does not exist (or the folder holds no data files)")
    return (files[-1], files[-1:]) if latest else (location, files)


def batch_ref(location: str, files: list[str], datasets_root: str) -> DatasetRef:
    """The batch as a reference to the run's pinned copy, after cheap checks: it exists and reads."""
    return pinned_table("batch", location, files, datasets_root)


def require_columns(batch: DatasetRef, required: list[str]) -> None:
    missing = [c for c in required if c not in batch.columns]
    if missing:
        hint = (
            " — a scoring output holds them when scored with --keep-inputs"
            if captured_output(batch) is not None
            else ""
        )
        raise DataValidationError(
            batch.uri,
            f"required columns are missing: {missing} (the model needs {required}){hint}",
            missing[0],
        )


def captured_output(batch: DatasetRef) -> worker.CapturedOutput | None:
    """The model-output columns of a scoring output (`flows.transform`), or None for other data."""
    if not {INFERENCE_ID, MODEL_NAME_COLUMN, MODEL_VERSION_COLUMN, PREDICTION_COLUMN} <= set(batch.columns):
        return None
    probabilities = tuple(c for c in batch.columns if c.startswith("probability_"))
    return worker.CapturedOutput(columns=(PREDICTION_COLUMN, *probabilities))


def scored_by(batch: DatasetRef, model_name: str) -> str | None:
    """The version that scored a scoring output (None for other data). Rows of another model, or of
    several versions, are refused: their predictions are not one version's."""
    import pyarrow.dataset as ds

    if captured_output(batch) is None:
        return None
    table = ds.dataset(batch.uri, format="parquet").to_table(
        columns=[MODEL_NAME_COLUMN, MODEL_VERSION_COLUMN]
    )
    unique = table.group_by([MODEL_NAME_COLUMN, MODEL_VERSION_COLUMN]).aggregate([]).to_pylist()
    pairs = sorted((str(row[MODEL_NAME_COLUMN]), str(row[MODEL_VERSION_COLUMN])) for row in unique)
    if [name for name, _ in pairs] != [model_name] * len(pairs):
        raise DataValidationError(
            batch.location,
            f"scored by another model than {model_name} (see its model_name column)",
            MODEL_NAME_COLUMN,
        )
    if len(pairs) != 1:
        raise DataValidationError(
            batch.location,
            f"scored by {len(pairs)} versions of {model_name}: check each version's rows on their own",
            MODEL_VERSION_COLUMN,
        )
    return str(pairs[0][1])


def check_settings(settings: PolicySettings, champion: ChampionBaseline, model_name: str) -> None:
    """Refuse settings this champion cannot honour, before any data is read."""
    monitored = sorted(champion.profile.columns)
    for flag, names in (
        ("--must-not-drift", settings.must_not_drift),
        ("--ignore-columns", settings.ignore_columns),
    ):
        unknown = [c for c in names if c not in champion.profile.columns]
        if unknown:
            raise StepFailed(
                f"{flag} names columns {model_name} v{champion.version} does not monitor: {unknown} "
                f"(it monitors {monitored})"
            )
    policy = settings.parsed()
    if policy.name in CALIBRATED_POLICIES and champion.profile.calibration is None:
        raise StepFailed(
            f"policy {policy.text} needs a calibrated baseline, and {model_name} v{champion.version} was registered "
            "before baselines were calibrated: retrain it (python -m flows.retrain), or use --policy drift"
        )


def policy_context(champion: ChampionBaseline, now: datetime) -> PolicyContext:
    """How long the champion has served: the checks against it so far (this one included) and days."""
    client = current_step().client
    pipeline = lineage.current_pipeline()
    version = client.get_model_version(champion.model_name, champion.version)
    days = (now - datetime.fromtimestamp(version.creation_timestamp / 1000, tz=UTC)).total_seconds() / 86400
    name = champion.model_name.replace("'", "")
    earlier = client.search_runs(  # the parent runs of finished checks: only they record the event
        [pipeline.experiment_id],
        f"tags.`{PIPELINE_TAG}` = '{MONITOR_PIPELINE}' and tags.`{MODEL_NAME_TAG}` = '{name}' and "
        f"tags.`{MODEL_VERSION_TAG}` = '{champion.version}' and tags.`{EVENT_TAG}` LIKE 'keel.drift.%' and "
        "attributes.status = 'FINISHED'",
        max_results=10_000,
    )
    return PolicyContext(batches_since_training=len(earlier) + 1, days_since_training=max(days, 0.0))


@processing_step(name="drift-check", preload=("lightgbm", "scipy.spatial"))
def check_drift(
    batch: DatasetRef, model_name: str, version: str | None, settings: PolicySettings
) -> DriftCheck:
    """Summarise the batch on the workers, judge it against the champion's calibrated baseline and
    let the policy decide."""
    from prefect import get_run_logger

    logger = get_run_logger()
    step = current_step()
    pipeline = lineage.current_pipeline()
    champion = load_baseline(step.client, model_name, version)
    profile = champion.profile
    spec = profile.features
    require_columns(batch, spec.input_columns)
    step.set_tags({MODEL_NAME_TAG: model_name, MODEL_VERSION_TAG: champion.version})
    check_settings(settings, champion, model_name)

    captured = captured_output(batch)
    if captured is not None and scored_by(batch, model_name) != champion.version:
        raise DataValidationError(
            batch.location,
            f"scored by another version than {model_name} v{champion.version}, which it is checked against",
            MODEL_VERSION_COLUMN,
        )
    model = captured or worker.ModelLocation(
        uri=champion.model_uri, tracking_uri=pipeline.tracking_uri, registry_uri=pipeline.registry_uri
    )
    summary = worker.summarise_batch(
        dask_client(), read_table(batch), profile.columns, spec, model, profile.estimator
    )
    _reject_bad_values(batch, summary, spec.time_column, spec.target)
    logger.info(
        "drift check of %s rows of %s against %s v%s (policy %s; predictions %s)",
        f"{summary.rows:,}",
        batch.uri,
        model_name,
        champion.version,
        settings.policy,
        "captured by the scoring" if captured else "made now",
    )
    verdict = judge(
        summary.columns,
        profile.columns,
        spec,
        profile.calibration,
        summary.performance.realized(spec.task),
        summary.performance.estimated(spec.task),
        summary.performance.rows,
        champion.metrics,
        settings,
    )
    policy = settings.parsed()
    context = policy_context(champion, datetime.now(UTC)) if policy.name == "schedule" else PolicyContext()
    decision = decide(policy, verdict.signals, context)

    check = DriftCheck(
        model_name=model_name,
        version=champion.version,
        batch=batch.model_copy(update={"rows": summary.rows}),
        rows=summary.rows,
        verdict=verdict,
        decision=decision,
        champion_quality={k: v for k, v in champion.metrics.items() if k in verdict.realized},
        calibration_chunk=profile.calibration.chunk if profile.calibration else None,
        notes=_notes(champion, summary.rows)
        + (
            ["the predictions are those the scoring captured (flows.transform), not made again"]
            if captured
            else []
        ),
        sample=_stored_sample(summary.sample),
    )
    step.log_metrics(_metrics(check))
    step.set_tags(
        {
            POLICY_TAG: decision.policy,
            RETRAIN_TAG: str(decision.retrain).lower(),
            DRIFT_REASONS_TAG: "; ".join(decision.reasons)[:5000],
        }
    )
    _log_decision(check)
    return check


def _stored_sample(sample: pd.DataFrame) -> DatasetRef:
    """The bounded row sample behind the Evidently report, as the step's Parquet output."""
    output_uri = current_step().output_location()
    sample_uri = f"{output_uri}/sample.parquet"
    if "://" not in output_uri:
        Path(output_uri).mkdir(parents=True, exist_ok=True)
    sample.to_parquet(sample_uri, index=False)
    return DatasetRef(
        name="batch-sample",
        uri=sample_uri,
        digest=content_digest(sample_uri),
        format="parquet",
        rows=len(sample),
    )


def _log_decision(check: DriftCheck) -> None:
    from prefect import get_run_logger

    logger = get_run_logger()
    verdict, decision = check.verdict, check.decision
    logger.info(
        "%s (policy %s)%s; %d of %d inputs beyond calibrated thresholds (importance-weighted %.2f), "
        "Evidently's rule: %d (share %.2f)",
        "RETRAIN" if decision.retrain else "no retrain",
        decision.policy,
        f": {'; '.join(decision.reasons)}" if decision.reasons else "",
        sum(bool(c.drift) for c in verdict.features()),
        len(verdict.features()),
        verdict.weighted_share,
        sum(c.evidently_drift for c in verdict.features()),
        verdict.evidently_share,
    )
    blind = decision.blind_reason()
    if blind:
        logger.warning("drift check: %s", blind)
    for note in check.notes:
        if note not in blind:  # a calibration note is often the reason the policy could not judge
            logger.warning("drift check: %s", note)


def _notes(champion: ChampionBaseline, rows: int) -> list[str]:
    calibration = champion.profile.calibration
    if calibration is None:
        return [f"v{champion.version} has no calibrated baseline: only Evidently's fixed thresholds apply"]
    return list(calibration.notes)


def _metrics(check: DriftCheck) -> dict[str, float]:
    verdict = check.verdict
    values: dict[str, float] = {
        "rows": check.rows,
        "evidently_share": verdict.evidently_share,
        "weighted_drift_share": verdict.weighted_share,
        "retrain": float(check.retrain),
        **{f"drift_score.{c.column}": c.score for c in verdict.columns},
        **{f"drift_threshold.{c.column}": c.threshold for c in verdict.columns if c.threshold is not None},
        **{f"realized_{k}": v for k, v in verdict.realized.items()},
        **{f"estimated_{k}": v for k, v in verdict.estimated.items()},
        **signal_metrics(verdict),
    }
    return values  # NaN and missing values are left out when logged (lineage.log_metrics)


def signal_metrics(verdict: Verdict) -> dict[str, float]:
    """Each signal's value and threshold as metrics: `signal.<name>`, `signal.<name>.threshold`."""
    values: dict[str, float] = {}
    for name, signal in verdict.signals.items():
        if signal.value is not None:
            values[f"signal.{name}"] = signal.value
        if signal.threshold is not None:
            values[f"signal.{name}.threshold"] = signal.threshold
    return values


def _reject_bad_values(
    batch: DatasetRef, summary: worker.BatchSummary, time_column: str, target: str
) -> None:
    if summary.rows == 0:
        raise DataValidationError(batch.uri, "the batch has no rows")
    if summary.bad_times:
        raise DataValidationError(
            batch.uri,
            f"{summary.bad_times} of {summary.rows} values are missing or not dates/times",
            time_column,
        )
    for column, n in summary.not_numbers.items():
        raise DataValidationError(batch.uri, f"{n} of {summary.rows} values are not numbers", column)
    for column, col in summary.columns.items():
        if col.count == 0:
            raise DataValidationError(batch.uri, "every value is missing (or infinite)", column)
    if summary.bad_labels:
        raise DataValidationError(batch.uri, summary.bad_labels, target)


class DriftReportRef(BaseModel):
    """Where the report went: MLflow artifact URIs, and a link people can open."""

    html_uri: str
    json_uri: str
    link: str
    run_id: str
    evidently_share: float
    evidently_agrees: bool = Field(description="Evidently's verdict per column on the samples equals ours.")


@processing_step(name="drift-report", preload=("evidently", "evidently.metrics", "evidently.presets"))
def report_drift(
    check: DriftCheck, settings: PolicySettings, checked_at: str, max_report_bytes: int = 50 * 2**20
) -> DriftReportRef:
    """Evidently's report on the row samples (not kept above `max_report_bytes`), logged to MLflow
    with the verdict; Prefect artifacts."""
    import pandas as pd
    from prefect import get_run_logger

    from tasks.monitoring import drift_report

    step = current_step()
    champion = load_baseline(step.client, check.model_name, check.version, with_reference=True)
    assert champion.reference is not None
    spec = champion.profile.features
    current = pd.read_parquet(check.sample.uri)
    report = (
        dask_client()
        .submit(
            drift_report.rendered_report,
            champion.reference,
            current,
            spec.numeric,
            list(spec.categorical),
            max_report_bytes,
            drift_share=settings.drift_share,
            prediction=worker.PREDICTION,
            target=spec.target if spec.target in current.columns else None,
            regression=spec.task == "regression",
            pure=False,
        )
        .result()
    )
    table = drift_table(check)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "drift"
        folder.mkdir()
        (folder / "report.html").write_bytes(report.html)
        (folder / "report.json").write_bytes(report.json)
        if not report.kept:
            get_run_logger().warning(
                "the Evidently report is over %.0f MiB (--max-report-mb): not kept; the verdict and every "
                "column's scores are in drift/columns.md and drift/verdict.json",
                max_report_bytes / 2**20,
            )
        (folder / "columns.md").write_text(table + "\n")
        (folder / "verdict.json").write_text(check.model_dump_json(indent=1))
        step.client.log_artifacts(step.run_id, str(folder), "drift")
    run = step.client.get_run(step.run_id)
    base = run.info.artifact_uri.rstrip("/")
    html_uri, json_uri = f"{base}/drift/report.html", f"{base}/drift/report.json"
    link = lineage.artifact_link(
        lineage.current_pipeline().tracking_uri,
        run.info.experiment_id,
        step.run_id,
        html_uri,
        "drift/report.html",
    )
    agrees = all(
        report.verdicts[c.column].drifted == c.evidently_drift
        for c in check.verdict.features()
        if c.column in report.verdicts
    )
    step.set_tags({MODEL_NAME_TAG: check.model_name, MODEL_VERSION_TAG: check.version})
    for key, value in {
        LAST_VERDICT_TAG: f"{'retrain' if check.retrain else 'no retrain'} (policy {check.decision.policy})",
        LAST_REPORT_TAG: html_uri,
    }.items():
        step.client.set_model_version_tag(check.model_name, check.version, key, value)
    reference_rows = (len(champion.reference), champion.profile.train.rows or 0)
    _announce_report(check, link, table, reference_rows, len(current))
    return DriftReportRef(
        html_uri=html_uri,
        json_uri=json_uri,
        link=link,
        run_id=step.run_id,
        evidently_share=report.drifted_share,
        evidently_agrees=agrees,
    )


def _announce_report(
    check: DriftCheck, link: str, table: str, reference_rows: tuple[int, int], batch_rows: int
) -> None:
    """The report's link and the columns table as Prefect artifacts, saying whether the report was
    drawn from samples (`reference_rows`: sampled, and in the training data)."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    sampled_reference, training_rows = reference_rows
    note = (
        f"\n\nThe Evidently report is drawn from {sampled_reference:,} reference and {batch_rows:,} "
        "batch rows (uniform samples) and shows Evidently's fixed thresholds; the verdicts above use every row."
        if check.rows > batch_rows or training_rows > sampled_reference
        else "\n\nThe Evidently report shows Evidently's fixed thresholds; the calibrated ones are above."
    )
    create_link_artifact(
        key="drift-report",
        link=link,
        link_text=f"Evidently drift report: {check.model_name} v{check.version}",
        description="HTML report (data drift, prediction drift, quality) logged to MLflow",
    )
    create_markdown_artifact(
        key="drift-columns",
        markdown=f"### {'Retrain' if check.retrain else 'No retrain'} (policy {check.decision.policy}): "
        f"{markdown.text(check.batch.location)}\n\n"
        + table
        + note
        + f"\n\n{markdown.link('Evidently report', link)}\n",
        description=f"{check.rows:,} rows against {check.model_name} v{check.version}",
    )


def _number(value: float | None, digits: int = 4) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.{digits}g}"


def _yes(flag: bool | None) -> markdown.Trusted:
    return markdown.Trusted("n/a" if flag is None else "**yes**" if flag else "no")


def drift_table(check: DriftCheck) -> str:
    """Markdown: the decision and its signals, then every column (inputs by importance), then performance."""
    verdict, decision = check.verdict, check.decision
    heard = {s.name for s in decision.signals}
    lines = [
        f"**Policy {markdown.text(decision.policy)}: {'retrain' if decision.retrain else 'no retrain'}.**"
        + (" " + "; ".join(markdown.text(r) for r in decision.reasons) if decision.reasons else "")
        + (f" **{markdown.text(decision.blind_reason())}.**" if decision.could_not_judge else ""),
        "",
        markdown.table(
            ["signal", "value", "threshold", "fired", "the policy listens", "what"],
            [
                [
                    s.name,
                    _number(s.value),
                    _number(s.threshold),
                    _yes(s.fired),
                    _yes(s.name in heard),
                    s.basis,
                ]
                for s in verdict.signals.values()
            ],
        ),
        "",
    ]
    chunk = f" (calibrated on chunks of {check.calibration_chunk})" if check.calibration_chunk else ""
    rows = sorted(verdict.columns, key=lambda c: (c.role != "feature", -(c.importance or 0), c.column))
    lines.append(
        markdown.table(
            [
                "column",
                "role",
                "model input",
                "importance",
                "test",
                "score",
                f"calibrated threshold{chunk}",
                "calibrated drift",
                "Evidently (score >= 0.1)",
                "in the verdict",
            ],
            [
                [
                    c.column,
                    c.role,
                    _yes(c.model_input),
                    _number(c.importance, 3),
                    c.method,
                    _number(c.score),
                    _number(c.threshold),
                    _yes(c.drift),
                    _yes(c.evidently_drift),
                    markdown.Trusted("no (ignored)" if c.ignored else "yes"),
                ]
                for c in rows
            ],
        )
    )
    metrics = sorted(set(verdict.realized) | set(verdict.estimated))
    if metrics:
        lines += [
            "",
            markdown.table(
                ["metric", "realized (labels)", "estimated (no labels)", "champion at training (test)"],
                [
                    [
                        name,
                        _number(verdict.realized.get(name)),
                        _number(verdict.estimated.get(name)),
                        _number(check.champion_quality.get(name)),
                    ]
                    for name in metrics
                ],
            ),
        ]
    if check.notes:
        lines += ["", *(f"- {markdown.text(n)}" for n in check.notes)]
    return "\n".join(lines)


def event_payload(check: DriftCheck, report: DriftReportRef, checked_at: str) -> dict:
    """What the event says: the decision, which policy decided on which signals, and every signal."""
    verdict = check.verdict
    return {
        "policy": check.decision.policy,
        "retrain": check.decision.retrain,
        "reasons": check.decision.reasons,
        "decided_on": [s.name for s in check.decision.signals],
        "could_not_judge": [s.name for s in check.decision.could_not_judge],
        "signals": {name: s.model_dump(mode="json") for name, s in verdict.signals.items()},
        "drift_share": round(verdict.evidently_share, 4),
        "weighted_drift_share": round(verdict.weighted_share, 4),
        "drifted_columns": check.drifted_columns,
        "prediction_drift_score": round(next(c.score for c in verdict.columns if c.role == "prediction"), 4),
        "realized": verdict.realized,
        "estimated": verdict.estimated,
        "report_uri": report.html_uri,
        "report_link": report.link,
        "batch_uri": check.batch.location,
        "batch_digest": check.batch.digest,
        "rows": check.rows,
        "checked_at": checked_at,
        "mlflow_run_id": report.run_id,
    }


VERDICT_IDS = uuid.UUID("a3a345d9-d610-4f11-9f14-004418d3a029")  # namespace of verdict event ids


def verdict_id(check: DriftCheck) -> uuid.UUID:
    """One verdict, one event: the same decision on the same batch (by content) for the same version
    under the same policy gets the same id, and Prefect's server drops an event whose id it has
    seen. A batch checked again, or five times at once, asks for one retrain, not five."""
    key = "|".join([check.event, check.model_name, check.version, check.batch.digest, check.decision.policy])
    return uuid.uuid5(VERDICT_IDS, key)


def emit_verdict(check: DriftCheck, report: DriftReportRef, checked_at: str) -> str | None:
    """Emit the decision as a Prefect event about the model version; returns the event id."""
    payload = finite(event_payload(check, report, checked_at))
    # Prefect's event page lists related resources by id (it links only its own kinds, such as the
    # monitor's flow run, whose summary links the report): the report's link is the id.
    related = [
        {
            "prefect.resource.id": report.link,
            "prefect.resource.role": "drift-report",
            "prefect.resource.name": f"drift report of {check.model_name} v{check.version}",
        }
    ]
    return emit_about_version(
        check.event, check.model_name, check.version, payload, related, event_id=verdict_id(check)
    )


def finite(value):
    """The value with every NaN or infinite number replaced by None (events are JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value
