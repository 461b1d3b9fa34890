"""The drift check (Model Monitor's monitoring job): new data against the champion's baseline.

`check_drift` makes one pass over the new data on the Dask workers and applies Evidently's own
per-column tests to the stored reference profile (see `tasks.drift_stats`), so its cost grows with
the new data only. `report_drift` renders the Evidently report (HTML + JSON) from bounded row
samples of both sides, logs it to MLflow next to the champion's version, and shows it in Prefect.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pydantic import BaseModel, Field

from tasks import lineage, monitoring
from tasks.baseline import ChampionBaseline, load_baseline
from tasks.compute import dask_client
from tasks.data import read_header, read_table, table_format
from tasks.drift_stats import DEFAULT_THRESHOLD, ColumnDrift, column_drift
from tasks.errors import DataValidationError, StepFailed
from tasks.refs import DatasetRef, content_digest, file_urls
from tasks.steps import current_step, processing_step

DRIFT_DETECTED = "keel.drift.detected"
DRIFT_NOT_DETECTED = "keel.drift.not-detected"
QUALITY_METRIC = {"regression": "r2", "binary": "accuracy", "multiclass": "accuracy"}


class DriftThresholds(BaseModel):
    """When a batch counts as drifted. Any one rule is enough."""

    drift_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Share of feature columns that must drift (Evidently's drift_share).",
    )
    must_not_drift: list[str] = Field(
        default_factory=list, description="Columns whose drift alone counts as drift."
    )
    prediction_drift: bool = Field(
        default=True, description="Drift of the champion's predictions counts as drift."
    )
    max_quality_drop: float = Field(
        default=0.1,
        ge=0,
        description="Labelled batches: the largest drop of R² (regression) or accuracy (classification) "
        "below the champion's training-time test value.",
    )


class DriftCheck(BaseModel):
    """The verdict on one batch, with everything needed to explain it."""

    model_name: str
    version: str
    batch: DatasetRef
    rows: int
    features: list[ColumnDrift]
    prediction: ColumnDrift
    target: ColumnDrift | None = None
    drifted_share: float
    quality: dict[str, float] = Field(default_factory=dict)
    champion_quality: dict[str, float] = Field(default_factory=dict)
    drift_detected: bool
    reasons: list[str]
    sample: DatasetRef = Field(description="Row sample of the batch, with predictions, for the report.")

    @property
    def drifted_columns(self) -> list[str]:
        return [c.column for c in self.features if c.drifted]


def batch_files(uri: str, latest: bool) -> str:
    """The data to check: the file itself, the folder, or with `latest` the folder's last file by name."""
    files = file_urls(uri)
    if not files:
        raise DataValidationError(uri, "file does not exist (or the folder holds no data files)")
    return files[-1] if latest else uri


def batch_ref(uri: str) -> DatasetRef:
    """The batch as a reference, after cheap checks: it exists and reads (format, header, digest)."""
    fmt = table_format(uri)
    columns = read_header(uri, fmt)
    return DatasetRef(name="batch", uri=uri, digest=content_digest(uri), format=fmt, columns=tuple(columns))


def require_columns(batch: DatasetRef, required: list[str]) -> None:
    missing = [c for c in required if c not in batch.columns]
    if missing:
        raise DataValidationError(
            batch.uri, f"required columns are missing: {missing} (the model needs {required})", missing[0]
        )


@processing_step(name="drift-check")
def check_drift(
    batch: DatasetRef, model_name: str, version: str | None, thresholds: DriftThresholds, output_uri: str
) -> DriftCheck:
    """Summarise the batch on the workers and judge every column against the champion's baseline."""
    from prefect import get_run_logger

    logger = get_run_logger()
    step = current_step()
    pipeline = lineage.current_pipeline()
    champion = load_baseline(step.client, model_name, version)
    spec = champion.profile.features
    require_columns(batch, spec.input_columns)
    step.set_tags({"keel.model.name": model_name, "keel.model.version": champion.version})
    unknown = [c for c in thresholds.must_not_drift if c not in champion.profile.columns]
    if unknown:
        raise StepFailed(
            f"--must-not-drift names columns {model_name} v{champion.version} does not monitor: {unknown} "
            f"(it monitors {sorted(champion.profile.columns)})"
        )

    model = monitoring.ModelLocation(
        uri=champion.model_uri, tracking_uri=pipeline.tracking_uri, registry_uri=pipeline.registry_uri
    )
    summary = monitoring.summarise_batch(
        dask_client(), read_table(batch), champion.profile.columns, spec, model
    )
    _reject_bad_values(batch, summary, spec.time_column)
    logger.info(
        "drift check of %s rows of %s against %s v%s",
        f"{summary.rows:,}",
        batch.uri,
        model_name,
        champion.version,
    )

    judged = {
        name: column_drift(champion.profile.columns[name], col, DEFAULT_THRESHOLD)
        for name, col in summary.columns.items()
    }
    features = [judged[c] for c in [*spec.numeric, *spec.categorical]]
    prediction = judged[monitoring.PREDICTION]
    target = judged.get(spec.target)
    drifted_share = sum(c.drifted for c in features) / len(features)
    quality = summary.quality.metrics(spec.task)
    verdict, reasons = _verdict(features, prediction, drifted_share, quality, champion, thresholds)

    sample_uri = f"{output_uri}/sample.parquet"
    if "://" not in output_uri:
        Path(output_uri).mkdir(parents=True, exist_ok=True)
    summary.sample.to_parquet(sample_uri, index=False)
    sample = DatasetRef(
        name="batch-sample",
        uri=sample_uri,
        digest=content_digest(sample_uri),
        format="parquet",
        rows=len(summary.sample),
    )
    check = DriftCheck(
        model_name=model_name,
        version=champion.version,
        batch=batch.model_copy(update={"rows": summary.rows}),
        rows=summary.rows,
        features=features,
        prediction=prediction,
        target=target,
        drifted_share=drifted_share,
        quality=quality,
        champion_quality={k: v for k, v in champion.metrics.items() if k in quality},
        drift_detected=verdict,
        reasons=reasons,
        sample=sample,
    )
    step.log_metrics(
        {
            "rows": summary.rows,
            "drifted_share": drifted_share,
            "drifted_columns": len(check.drifted_columns),
            "prediction_drift_score": prediction.score,
            **{f"drift_score.{c.column}": c.score for c in features},
            **{f"batch_{k}": v for k, v in quality.items()},
        }
    )
    step.set_tags(
        {"keel.drift.detected": str(verdict).lower(), "keel.drift.reasons": "; ".join(reasons)[:5000]}
    )
    logger.info(
        "%s: %d of %d feature columns drifted (share %.2f), prediction score %.3f%s",
        "DRIFT" if verdict else "no drift",
        len(check.drifted_columns),
        len(features),
        drifted_share,
        prediction.score,
        f"; {'; '.join(reasons)}" if reasons else "",
    )
    return check


def _reject_bad_values(batch: DatasetRef, summary: monitoring.BatchSummary, time_column: str) -> None:
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


def _verdict(
    features: list[ColumnDrift],
    prediction: ColumnDrift,
    share: float,
    quality: dict[str, float],
    champion: ChampionBaseline,
    thresholds: DriftThresholds,
) -> tuple[bool, list[str]]:
    reasons = []
    if share >= thresholds.drift_share:
        drifted = sum(c.drifted for c in features)
        reasons.append(
            f"{drifted} of {len(features)} feature columns drifted (share {share:.2f} >= {thresholds.drift_share:g})"
        )
    for column in thresholds.must_not_drift:
        found = next((c for c in [*features, prediction] if c.column == column), None)
        if found and found.drifted:
            reasons.append(f"{column} drifted ({found.method} {found.score:.3f} >= {found.threshold:g})")
    if thresholds.prediction_drift and prediction.drifted:
        reasons.append(
            f"predictions drifted ({prediction.method} {prediction.score:.3f} >= {prediction.threshold:g})"
        )
    metric = QUALITY_METRIC[champion.profile.features.task]
    if metric in quality and metric in champion.metrics:
        drop = champion.metrics[metric] - quality[metric]
        if drop > thresholds.max_quality_drop:
            reasons.append(
                f"{metric} {quality[metric]:.3f} is {drop:.3f} below the champion's test {metric} "
                f"{champion.metrics[metric]:.3f} (allowed drop {thresholds.max_quality_drop:g})"
            )
    return bool(reasons), reasons


class DriftReportRef(BaseModel):
    """Where the report went: MLflow artifact URIs, and a link people can open."""

    html_uri: str
    json_uri: str
    link: str
    run_id: str
    evidently_share: float
    evidently_agrees: bool = Field(description="Evidently's verdict per column on the samples equals ours.")


@processing_step(name="drift-report")
def report_drift(check: DriftCheck, thresholds: DriftThresholds, checked_at: str) -> DriftReportRef:
    """Evidently's report on the row samples, logged to MLflow with the verdict; Prefect artifacts."""
    import pandas as pd
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    from tasks import drift_report

    step = current_step()
    champion = load_baseline(step.client, check.model_name, check.version, with_reference=True)
    assert champion.reference is not None
    spec = champion.profile.features
    current = pd.read_parquet(check.sample.uri)
    report = drift_report.build_report(
        champion.reference,
        current,
        spec.numeric,
        list(spec.categorical),
        drift_share=thresholds.drift_share,
        prediction=monitoring.PREDICTION,
        target=spec.target if spec.target in current.columns else None,
        regression=spec.task == "regression",
    )
    table = drift_table(check)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "drift"
        report.save(folder / "report.html", folder / "report.json")
        (folder / "columns.md").write_text(table + "\n")
        (folder / "verdict.json").write_text(check.model_dump_json(indent=1))
        step.client.log_artifacts(step.run_id, str(folder), "drift")
    run = step.client.get_run(step.run_id)
    base = run.info.artifact_uri.rstrip("/")
    html_uri, json_uri = f"{base}/drift/report.html", f"{base}/drift/report.json"
    link = _report_link(
        lineage.current_pipeline().tracking_uri, run.info.experiment_id, step.run_id, html_uri
    )
    agrees = all(
        report.verdicts[c.column].drifted == c.drifted for c in check.features if c.column in report.verdicts
    )
    step.set_tags({"keel.model.name": check.model_name, "keel.model.version": check.version})
    for key, value in {
        "drift.last_checked": checked_at,
        "drift.last_verdict": "drift" if check.drift_detected else "no drift",
        "drift.last_report": html_uri,
        "drift.last_run_id": step.run_id,
    }.items():
        step.client.set_model_version_tag(check.model_name, check.version, key, value)
    sampled = (
        check.rows > current.shape[0] or (champion.profile.train.rows or 0) > champion.reference.shape[0]
    )
    note = (
        f"\n\nThe Evidently report is drawn from {len(champion.reference):,} reference and {len(current):,} "
        "batch rows (uniform samples); the verdicts above use every row."
        if sampled
        else ""
    )
    create_link_artifact(
        key="drift-report",
        link=link,
        link_text=f"Evidently drift report: {check.model_name} v{check.version}",
        description="HTML report (data drift, prediction drift, quality) logged to MLflow",
    )
    create_markdown_artifact(
        key="drift-columns",
        markdown=f"### {'Drift detected' if check.drift_detected else 'No drift'}: {check.batch.uri}\n\n"
        + ("".join(f"- {r}\n" for r in check.reasons) + "\n" if check.reasons else "")
        + table
        + note
        + f"\n\n[Evidently report]({link})\n",
        description=f"{check.rows:,} rows against {check.model_name} v{check.version}",
    )
    return DriftReportRef(
        html_uri=html_uri,
        json_uri=json_uri,
        link=link,
        run_id=step.run_id,
        evidently_share=report.drifted_share,
        evidently_agrees=agrees,
    )


def drift_table(check: DriftCheck) -> str:
    """Markdown: drifted columns first, each with its test, score and threshold."""
    rows = sorted(check.features, key=lambda c: (not c.drifted, -c.score))
    extra = [("prediction", check.prediction)] + ([("target", check.target)] if check.target else [])
    lines = ["| column | role | test | score | threshold | drift |", "|---|---|---|---|---|---|"]
    for role, col in [*(("feature", c) for c in rows), *extra]:
        lines.append(
            f"| {col.column} | {role} | {col.method} | {col.score:.4f} | {col.threshold:g} | "
            f"{'**yes**' if col.drifted else 'no'} |"
        )
    if check.quality:
        lines.append("")
        lines.append("| quality on the labelled batch | batch | champion at training |")
        lines.append("|---|---|---|")
        for name, value in check.quality.items():
            champ = check.champion_quality.get(name)
            lines.append(f"| {name} | {value:.4f} | {'' if champ is None else f'{champ:.4f}'} |")
    return "\n".join(lines)


def _report_link(tracking_uri: str, experiment_id: str, run_id: str, html_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}/artifacts"
    if html_uri.startswith("/"):
        return f"file://{html_uri}"
    return html_uri


def emit_verdict(check: DriftCheck, report: DriftReportRef, checked_at: str) -> str | None:
    """Emit the verdict as a Prefect event about the model version; returns the event id."""
    from prefect.events import emit_event

    event = emit_event(
        event=DRIFT_DETECTED if check.drift_detected else DRIFT_NOT_DETECTED,
        resource={
            "prefect.resource.id": f"keel.model.{check.model_name}.v{check.version}",
            "prefect.resource.name": f"{check.model_name} v{check.version}",
            "keel.model.name": check.model_name,
            "keel.model.version": check.version,
        },
        payload={
            "drift_share": round(check.drifted_share, 4),
            "drifted_columns": check.drifted_columns,
            "prediction_drift_score": round(check.prediction.score, 4),
            "reasons": check.reasons,
            "report_uri": report.html_uri,
            "report_link": report.link,
            "batch_uri": check.batch.uri,
            "batch_digest": check.batch.digest,
            "rows": check.rows,
            "checked_at": checked_at,
            "mlflow_run_id": report.run_id,
        },
    )
    return str(event.id) if event is not None else None
