"""Model quality from late labels (Model Monitor's model-quality job): ground truth that arrives after
the predictions, joined to the captured predictions by inference id.

    python -m flows.label --labels labels/week-23.csv --predictions scored/ --id-column inference_id
    python -m flows.label --labels truth.parquet --predictions scored/ --id-column order_id \\
        --label-column returned --time-column order_date --window 7D --within 90D

`--predictions` is a scoring output of `flows.transform` or a folder of them (the scoring inbox's
outbox, say); the model's predictions in it are read (id, version, time, prediction, probabilities).
Each label is joined to the predictions with its id, and the realized metric is computed per window
of `--window` (default: the chunk the version's range was calibrated on) of `--time-column` (default:
the scoring time; a kept column of the data, such as its date, works too), for each version that made
predictions. A window with at least `--min-window-rows` labels is judged against that version's
calibrated range (the monitor's `performance` signal). The champion's newest judged window decides:
`keel.quality.dropped` (outside its range: the retrain deployment listens for it) or
`keel.quality.ok`, emitted about the champion's version with the figures.

Labels that cannot be used (no id, no value, an id given twice, an id with no prediction, a value the
version cannot be scored on) are counted and listed in a table; a file none of whose ids matches a
prediction exits 2. The joined data, the windows (table and picture) and the bad labels are stored
with the MLflow run.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports: the collector paused, the warm pool or the Prefect server
    from infra.command import begin_command

    begin_command(__spec__)

import tempfile
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import BaseModel, Field, field_validator, model_validator

from tasks.monitoring import ground_truth as gt
from tasks.monitoring import quality_report
from tasks.monitoring.baseline import ChampionBaseline, load_baseline
from tasks.monitoring.calibration import parse_chunk
from tasks.monitoring.drift import MIN_BATCH_ROWS, batch_files, finite
from tasks.monitoring.performance import PRIMARY
from tasks.monitoring.policies import (
    PERFORMANCE,
    Decision,
    PerformanceSettings,
    Policy,
    PolicyContext,
    SignalSettings,
    decide,
)
from tasks.steps import DatasetRef, Params, current_pipeline, lineage, markdown, pipeline
from tasks.steps.access import checked_local_path
from tasks.steps.cli import exit_process
from tasks.steps.errors import DataValidationError, NotInRegistry
from tasks.steps.events import emit_about_version
from tasks.steps.model import MODEL_NAME_HELP, ModelName, find_champion
from tasks.steps.refs import content_digest, file_urls
from tasks.steps.settings import get_settings
from tasks.steps.tags import (
    EVENT_ID_TAG,
    EVENT_TAG,
    LABELLED_ROWS_TAG,
    MODEL_NAME_TAG,
    MODEL_VERSION_TAG,
    POLICY_TAG,
    QUALITY_DROPPED_EVENT,
    QUALITY_LAST_REPORT_TAG,
    QUALITY_LAST_VERDICT_TAG,
    QUALITY_OK_EVENT,
    QUALITY_PIPELINE,
)
from tasks.steps.transform import INFERENCE_ID, MODEL_VERSION_COLUMN, SCORED_AT_COLUMN
from tasks.tabular.data import pinned_table
from tasks.tabular.project import configured_model_name, require_model_name

POLICY = Policy(name="performance")
ARTIFACT_DIR = "quality"
QUALITY_EVENT_IDS = uuid.UUID("5c0f7a51-7d8e-4f39-a4a2-1b0e3c9d2e61")  # namespace of the events' ids


def _period(text: str | None) -> str | None:
    """A window or age as the monitor's chunks are written (`7D`, `12h`); a number of rows is not one."""
    if text is None:
        return None
    try:
        chunk = parse_chunk(text)
    except ValueError as exc:
        raise ValueError(f"not a time period (e.g. 1D, 7D, 12h): {exc}") from exc
    if chunk.period is None:
        raise ValueError(f"not a time period: {text!r} is a number of rows (e.g. 1D, 7D, 12h)")
    return chunk.text


class LabelParams(Params, PerformanceSettings):
    """Which labels, which captured predictions, and how they are judged."""

    labels: str = Field(min_length=1, description="CSV or Parquet file (or a folder of them) of labels.")
    predictions: str = Field(
        min_length=1, description="A scoring output of flows.transform, or a folder of them (local)."
    )
    id_column: str = Field(
        default=INFERENCE_ID, min_length=1, description="The label file's column holding the inference ids."
    )
    label_column: str | None = Field(
        default=None, description="The label file's column holding the labels (default: the model's target)."
    )
    model_name: ModelName | None = Field(
        default=None, description=f"Registered model (default: keel.toml's): {MODEL_NAME_HELP}."
    )
    time_column: str = Field(
        default=SCORED_AT_COLUMN,
        min_length=1,
        description="The predictions' column the windows are cut on: the scoring time, or a kept data column.",
    )
    window: str | None = Field(
        default=None,
        description="Window length, e.g. 7D (default: the chunk the champion's range is calibrated on).",
    )
    within: str | None = Field(
        default=None, description="Join only predictions scored this long before now at most, e.g. 90D."
    )
    min_window_rows: int = Field(
        default=MIN_BATCH_ROWS, ge=1, description="Fewer labels than this in a window: reported, not judged."
    )

    @field_validator("window", "within")
    @classmethod
    def _periods(cls, value: str | None) -> str | None:
        return _period(value)

    @model_validator(mode="before")
    @classmethod
    def _project_model(cls, values: Any) -> Any:
        return configured_model_name(values)

    @model_validator(mode="after")
    def _model_named(self) -> LabelParams:
        require_model_name(self.model_name, "judge")
        if self.label_column is not None and self.label_column == self.id_column:
            raise ValueError("--id-column and --label-column must be different columns")
        return self


class LabelResult(BaseModel):
    model_name: str
    champion: str | None
    labels: DatasetRef
    labels_read: int
    matched: int
    problems: dict[str, int]
    metric: str
    windows: list[gt.WindowQuality]
    decision: str
    event: str | None
    event_id: str | None
    report_link: str
    joined_uri: str
    mlflow_run_id: str
    prefect_flow_run: dict[str, str]


def summarise(result: LabelResult) -> str:
    header = [*quality_report.WINDOW_HEADER[:4], result.metric, *quality_report.WINDOW_HEADER[5:]]
    rows = [header, *quality_report.window_rows(result.windows, result.metric)[-12:]]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    table = "\n".join(
        "              " + "  ".join(f"{c:<{w}}" for c, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
    return "\n".join(
        [
            f"Labels:       {result.labels_read:,} read from {result.labels.location}; {result.matched:,} "
            f"joined to predictions of {result.model_name}",
            "Not used:     "
            + (", ".join(f"{n:,} {p}" for p, n in result.problems.items()) or "none")
            + (" (bad_labels.csv)" if result.problems else ""),
            f"Windows:      {len(result.windows)} ({result.metric}; the last 12 below)",
            table,
            f"Decision:     {result.decision}",
            f"Event:        {result.event or 'none'} ({result.event_id or 'not emitted'})",
            f"Report:       {result.report_link}",
            f"Joined data:  {result.joined_uri}",
            f"MLflow run:   {result.mlflow_run_id}",
        ]
    )


def read_labels(ref: DatasetRef, id_column: str, label_column: str) -> pd.DataFrame:
    """The id and label columns of the pinned label file, ids as text (a CSV's "0012" stays "0012"),
    with each row's number in the file."""
    for column in (id_column, label_column):
        if column not in ref.columns:
            raise DataValidationError(
                ref.location, f"the label file has no such column (it has {list(ref.columns)})", column
            )
    urls = file_urls(ref.uri)
    try:
        if ref.format == "csv":
            frames = [
                pd.read_csv(u, usecols=[id_column, label_column], dtype={id_column: "string"}) for u in urls
            ]
        else:
            frames = [pd.read_parquet(u, columns=[id_column, label_column]) for u in urls]
    except (ValueError, OSError) as exc:
        raise DataValidationError(ref.location, f"unreadable label file ({type(exc).__name__})") from exc
    frame = (
        pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[id_column, label_column])
    )
    ids = frame[id_column]
    return pd.DataFrame(
        {
            gt.ROW: range(1, len(frame) + 1),
            gt.INFERENCE_ID: ids.astype("string") if ids.dtype != "string" else ids,
            gt.LABEL: frame[label_column],
        }
    )


def predictions_folder(text: str, access) -> Path:
    folder = checked_local_path(
        text, access, "--predictions must be a local folder (a scoring output, or a folder of them)"
    )
    if not folder.is_dir():
        raise DataValidationError(
            text, "--predictions is not a folder (a scoring output, or a folder of them)"
        )
    return folder


def _judge(
    champion: str | None, windows: list[gt.WindowQuality], min_rows: int
) -> tuple[gt.WindowQuality | None, Decision | None, str]:
    """The champion's newest judged window, the policy's decision on it, and the decision in words."""
    mine = [w for w in windows if w.version == champion and w.judged]
    if champion is None or not mine:
        unjudged = [w.signal for w in windows if w.version == champion and w.signal is not None]
        if champion is None:
            why = "the model has no champion"
        elif unjudged:
            why = f"v{champion}'s newest window cannot be judged: {unjudged[-1].basis}"
        else:
            why = f"no window of v{champion}'s predictions has {min_rows} or more labels (--min-window-rows)"
        return None, None, f"nothing judged: {why}; no event"
    newest = mine[-1]
    assert newest.signal is not None
    decision = decide(POLICY, {PERFORMANCE: newest.signal}, PolicyContext())
    text = (
        f"{'RETRAIN' if decision.retrain else 'no retrain'} (policy {POLICY.text}): v{champion}'s window "
        f"from {newest.start[:19]}, {newest.signal.line()}"
    )
    return newest, decision, text


@pipeline(
    name=QUALITY_PIPELINE,
    params=LabelParams,
    run_tags=lambda params: {MODEL_NAME_TAG: params.model_name or ""},
    summary=summarise,
    after_bad_input="nothing stored, no event emitted",
    reads=lambda params: [params.labels, params.predictions],
)
def label(params: LabelParams) -> LabelResult:
    """Join late labels to the captured predictions, judge the realized metric per window against the
    range of the version that predicted, and emit the champion's verdict."""
    settings = get_settings()
    name = require_model_name(params.model_name, "judge")
    run = current_pipeline()
    client = run.client()
    folder = predictions_folder(params.predictions, settings.data_access)
    location, files = batch_files(params.labels, False, settings.data_access)
    labels_ref = pinned_table("labels", location, files, settings.datasets_root)
    found = find_champion(client, name)
    champion = str(found.version) if found is not None else None
    captured = _captured(folder, name, params)
    baselines = {
        v: _baseline(client, name, v) for v in sorted(captured.frame[MODEL_VERSION_COLUMN].unique(), key=int)
    }
    reference = baselines.get(champion or "") or baselines[max(baselines, key=int)]
    spec = reference.profile.features
    labels = read_labels(labels_ref, params.id_column, params.label_column or spec.target)
    within = pd.Timedelta(params.within) if params.within else None
    joined, bad = gt.join_labels(labels, captured.frame, within, pd.Timestamp(datetime.now(UTC)))
    if joined.empty:
        raise DataValidationError(
            labels_ref.location,
            f"none of its {len(labels):,} labels' ids matches a prediction of {name} under {params.predictions}",
            params.id_column,
        )
    metric = params.performance_metric or PRIMARY[spec.task]
    versions = gt.Versions(
        specs={v: b.profile.features for v, b in baselines.items()},
        calibrations={v: b.profile.calibration for v, b in baselines.items()},
    )
    joined, windows, unscorable = gt.judge_windows(
        joined,
        versions,
        params.time_column,
        pd.Timedelta(params.window or _calibrated_window(reference)),
        params.min_window_rows,
        SignalSettings(performance_sd=params.performance_sd, performance_metric=params.performance_metric),
    )
    if joined.empty:
        raise DataValidationError(
            labels_ref.location,
            f"no label joined to a prediction can be scored: {gt.bad_table(unscorable)[gt.PROBLEM].iloc[0]}",
            params.label_column or spec.target,
        )
    if not any(metric in w.metrics for w in windows):
        raise DataValidationError(
            "--performance-metric", f"{metric!r} is not a metric of this model ({sorted(windows[0].metrics)})"
        )
    bad_frame = gt.bad_table(bad + unscorable)
    matched = int(joined[gt.INFERENCE_ID].nunique())
    counts = quality_report.problem_counts(bad_frame)
    newest, decision, decision_text = _judge(champion, windows, params.min_window_rows)
    notes = (
        [
            f"{captured.rescored:,} predictions were captured more than once by one version: the latest is used."
        ]
        if captured.rescored
        else []
    )
    report = _store(
        f"{name}: realized {metric} from {labels_ref.location}",
        decision_text,
        windows,
        metric,
        counts,
        bad_frame,
        notes,
        joined,
    )
    predictions_ref = DatasetRef(
        name="predictions",
        uri=str(folder),
        digest=content_digest(str(folder)),
        format="parquet",
        rows=len(captured.frame),
    )
    event = event_id = None
    if newest is not None and decision is not None and champion is not None:
        event = QUALITY_DROPPED_EVENT if decision.retrain else QUALITY_OK_EVENT
        event_id = _emit(
            event,
            name,
            champion,
            newest,
            decision,
            metric,
            report,
            {
                "labels_read": len(labels),
                "labels_matched": matched,
                "labels_not_used": counts,
                "labels_uri": labels_ref.location,
                "labels_digest": labels_ref.digest,
            },
            predictions_ref.digest,
        )
        client.set_model_version_tag(name, champion, QUALITY_LAST_VERDICT_TAG, decision_text)
        client.set_model_version_tag(name, champion, QUALITY_LAST_REPORT_TAG, report.report_uri)
    lineage.set_tags(
        client,
        run.run_id,
        {
            MODEL_VERSION_TAG: champion or "",
            POLICY_TAG: POLICY.text,
            LABELLED_ROWS_TAG: str(len(joined)),
            EVENT_TAG: event or "none",
            EVENT_ID_TAG: event_id or "not emitted",
            **labels_ref.lineage_tags("labels", "input"),
            **predictions_ref.lineage_tags("predictions", "input"),
            **report.joined.lineage_tags("joined", "output"),
        },
    )
    lineage.log_dataset_inputs(
        client, run.run_id, {"labels": labels_ref, "predictions": predictions_ref, "joined": report.joined}
    )
    lineage.log_metrics(
        client,
        run.run_id,
        {
            "labels_read": len(labels),
            "labels_joined": len(joined),
            "labels_not_used": len(bad_frame),
            "windows": len(windows),
        },
    )
    _announce(name, metric, windows, counts, bad_frame, decision_text, report.link)
    lineage.note("Decision", decision_text)
    lineage.note("Report", "windows, picture and the labels not used", report.link)
    lineage.note("Event", f"{event or 'none'} ({event_id or 'not emitted'})")
    return LabelResult(
        model_name=name,
        champion=champion,
        labels=labels_ref.model_copy(update={"rows": len(labels)}),
        labels_read=len(labels),
        matched=matched,
        problems=counts,
        metric=metric,
        windows=windows,
        decision=decision_text,
        event=event,
        event_id=event_id,
        report_link=report.link,
        joined_uri=report.joined.uri,
        mlflow_run_id=run.run_id,
        prefect_flow_run=lineage.prefect_flow_run_tags(),
    )


def _captured(folder: Path, name: str, params: LabelParams) -> gt.CapturedPredictions:
    try:
        captured = gt.captured_predictions(folder, name, params.time_column)
    except KeyError as exc:
        raise DataValidationError(
            params.predictions,
            "a scoring output lacks a column the check needs (keep it when scoring: --keep-columns)",
            params.time_column,
        ) from exc
    if captured.frame.empty:
        raise DataValidationError(
            params.predictions, f"no scoring output of {name} with rows is in this folder"
        )
    return captured


class StoredReport(BaseModel):
    report_uri: str
    link: str
    joined: DatasetRef


def _store(  # what the report shows
    title: str,
    decision_text: str,
    windows: list[gt.WindowQuality],
    metric: str,
    counts: dict[str, int],
    bad: pd.DataFrame,
    notes: list[str],
    joined: pd.DataFrame,
) -> StoredReport:
    """The report, the tables, the picture and the joined data, logged with the run."""
    run = current_pipeline()
    client = run.client()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / ARTIFACT_DIR
        quality_report.write_report(out, title, decision_text, windows, metric, counts, bad, notes)
        joined.to_parquet(out / "joined.parquet", index=False)
        digest = content_digest(str(out / "joined.parquet"))
        client.log_artifacts(run.run_id, str(out), ARTIFACT_DIR)
    base = client.get_run(run.run_id).info.artifact_uri.rstrip("/")
    report_uri = f"{base}/{ARTIFACT_DIR}/report.html"
    return StoredReport(
        report_uri=report_uri,
        link=lineage.artifact_link(
            run.tracking_uri, run.experiment_id, run.run_id, report_uri, f"{ARTIFACT_DIR}/report.html"
        ),
        joined=DatasetRef(
            name="joined",
            uri=f"{base}/{ARTIFACT_DIR}/joined.parquet",
            digest=digest,
            format="parquet",
            rows=len(joined),
            columns=tuple(joined.columns),
        ),
    )


def _emit(  # noqa: PLR0913, PLR0917  # the event's facts
    event: str,
    name: str,
    champion: str,
    newest: gt.WindowQuality,
    decision: Decision,
    metric: str,
    report: StoredReport,
    labels: dict[str, Any],
    predictions_digest: str,
) -> str | None:
    """The verdict as an event about the champion's version. The same verdict on the same labels and
    predictions has the same id, which Prefect's server keeps once: a file sent twice retrains once."""
    assert newest.signal is not None
    payload = {
        "policy": decision.policy,
        "retrain": decision.retrain,
        "reasons": decision.reasons or [newest.signal.line()],
        "metric": metric,
        "value": newest.metrics.get(metric),
        "threshold": newest.signal.threshold,
        "window_start": newest.start,
        "window_end": newest.end,
        "window_rows": newest.rows,
        **labels,
        "report_uri": report.report_uri,
        "report_link": report.link,
        "mlflow_run_id": current_pipeline().run_id,
    }
    key = "|".join([event, name, champion, labels["labels_digest"], predictions_digest, newest.start, metric])
    related = [
        {
            "prefect.resource.id": report.link,
            "prefect.resource.role": "quality-report",
            "prefect.resource.name": f"model quality of {name} v{champion}",
        }
    ]
    return emit_about_version(
        event, name, champion, finite(payload), related, event_id=uuid.uuid5(QUALITY_EVENT_IDS, key)
    )


def _baseline(client, name: str, version: str) -> ChampionBaseline:
    try:
        return load_baseline(client, name, version)
    except NotInRegistry as exc:
        raise DataValidationError(f"--model-name {name}", str(exc)) from exc


def _calibrated_window(baseline: ChampionBaseline) -> str:
    """The chunk the version's ranges were calibrated on, when it is a period (not a number of
    rows); else a week."""
    calibration = baseline.profile.calibration
    try:
        chunk = parse_chunk(calibration.chunk) if calibration is not None else None
    except ValueError:
        chunk = None
    return chunk.text if chunk is not None and chunk.period is not None else "7D"


def _announce(name, metric, windows, counts, bad, decision_text: str, link: str) -> None:
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    create_link_artifact(
        key="quality-report",
        link=link,
        link_text=f"model quality of {name}",
        description="windows, picture, bad labels",
    )
    create_markdown_artifact(
        key="quality-windows",
        markdown=f"### {markdown.text(decision_text)}\n\n"
        + quality_report.windows_markdown(windows, metric)
        + "\n\n#### Labels not used\n\n"
        + quality_report.problems_markdown(counts, bad),
        description=f"realized {metric} per window of {name}'s predictions",
    )


def main(argv: Sequence[str] | None = None) -> int:
    return label.main(argv)


if __name__ == "__main__":
    exit_process(main())
