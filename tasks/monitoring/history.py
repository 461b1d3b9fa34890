"""Monitoring history (Model Monitor's history view): one picture per model, redrawn by each check.

Every monitor execution logs its signals on its MLflow parent run (`point_metrics`); the
`monitoring-history` step reads them back for the model, draws one panel per signal (a point per
check, the threshold it was held to, fired checks in red) with the retrains marked, and logs the
PNG next to the report. The model version links to it (tag and model card) and so does the
execution summary in Prefect.
"""

from __future__ import annotations

import math
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from tasks.monitoring.drift import signal_metrics
from tasks.steps import current_step, lineage, markdown, processing_step
from tasks.steps.compute import dask_client
from tasks.steps.tags import (
    APPROVAL_TAG,
    HISTORY_TAG,
    MODEL_NAME_TAG,
    MODEL_VERSION_TAG,
    MONITOR_PIPELINE,
    PARENT_TAG,
    PIPELINE_TAG,
)
from tasks.tabular import model_card
from tasks.tabular.registry import made_by_retrain

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from tasks.monitoring.drift import DriftCheck, DriftReportRef

PICTURE = "monitoring/history.png"
SHOWN = ("performance", "data-drift", "prediction-drift", "quality-drop", "evidently-share")  # top to bottom
VIOLATIONS = "quality.violations"


class CheckPoint(BaseModel):
    at: datetime
    version: str
    retrain: bool
    values: dict[str, float]  # signal -> value
    thresholds: dict[str, float]
    fired: dict[str, bool]
    violations: float | None = None


class HistoryRef(BaseModel):
    uri: str
    link: str
    checks: int


def point_metrics(check: DriftCheck, violations: int) -> dict[str, float]:
    """What one check adds to the history, logged on the monitor's parent run."""
    fired = {
        f"signal.{name}.fired": float(signal.fired)
        for name, signal in check.verdict.signals.items()
        if signal.value is not None and math.isfinite(signal.value)
    }
    values = {
        "retrain": float(check.retrain),
        VIOLATIONS: float(violations),
        **signal_metrics(check.verdict),
        **fired,
    }
    return {k: v for k, v in values.items() if math.isfinite(v)}


def load_points(
    client: MlflowClient, experiment_id: str, model_name: str, limit: int = 1000
) -> list[CheckPoint]:
    """The model's last `limit` checks, oldest first (monitor executions that logged their signals:
    only their parent runs have the violations metric, so the limit counts checks, not step runs)."""
    runs = client.search_runs(
        [experiment_id],
        f"tags.`{PIPELINE_TAG}` = '{MONITOR_PIPELINE}' and tags.`{MODEL_NAME_TAG}` = '{model_name}' "
        f"and metrics.`{VIOLATIONS}` >= 0",
        max_results=limit,
        order_by=["attributes.start_time DESC"],
    )
    points = []
    for run in runs:
        metrics = run.data.metrics
        if PARENT_TAG in run.data.tags or "retrain" not in metrics:
            continue  # a step's run, or an execution refused or failed before deciding
        names = {k.split(".")[1] for k in metrics if k.startswith("signal.")}
        points.append(
            CheckPoint(
                at=datetime.fromtimestamp(run.info.start_time / 1000, tz=UTC),
                version=run.data.tags.get(MODEL_VERSION_TAG, ""),
                retrain=bool(metrics["retrain"]),
                values={n: metrics[f"signal.{n}"] for n in names if f"signal.{n}" in metrics},
                thresholds={
                    n: metrics[f"signal.{n}.threshold"] for n in names if f"signal.{n}.threshold" in metrics
                },
                fired={n: bool(metrics.get(f"signal.{n}.fired", 0)) for n in names},
                violations=metrics.get(VIOLATIONS),
            )
        )
    return sorted(points, key=lambda p: p.at)


def retrains(client: MlflowClient, model_name: str) -> list[tuple[datetime, str, str]]:
    """When each version a retrain registered appeared: (time, version, approval status)."""
    versions = client.search_model_versions(f"name = '{model_name}'", max_results=1000)
    return sorted(
        (
            datetime.fromtimestamp(v.creation_timestamp / 1000, tz=UTC),
            str(v.version),
            v.tags.get(APPROVAL_TAG, ""),
        )
        for v in versions
        if made_by_retrain(v)
    )


def drawn(points: list[CheckPoint], marks: list[tuple[datetime, str, str]], title: str) -> bytes:
    """`draw`'s PNG, for a Dask worker (where matplotlib is imported already)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "history.png"
        draw(points, marks, title, path)
        return path.read_bytes()


def draw(points: list[CheckPoint], marks: list[tuple[datetime, str, str]], title: str, path: Path) -> None:
    """One panel per signal the checks have, and one of data-quality violations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = {n for p in points for n in p.values}
    panels = [*(n for n in SHOWN if n in present), VIOLATIONS]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 1.7 * len(panels) + 0.8), sharex=True, squeeze=False)
    times = [p.at for p in points]
    for ax, name in zip(axes[:, 0], panels, strict=True):
        if name == VIOLATIONS:
            counts = [p.violations or 0 for p in points]
            ax.vlines(times, 0, counts, color="#888888", linewidth=2)
            ax.plot(times, counts, "s", color="#888888", markersize=3)
            ax.set_ylim(bottom=0, top=max([*counts, 1]) * 1.2)
            ax.set_ylabel("quality\nviolations", fontsize=8)
        else:
            ys = [p.values.get(name, math.nan) for p in points]
            ax.plot(times, ys, "-o", color="#1f77b4", markersize=3, linewidth=1)
            fired = [(p.at, p.values[name]) for p in points if p.fired.get(name) and name in p.values]
            if fired:
                ax.plot(*zip(*fired, strict=True), "o", color="#d62728", markersize=6, label="fired")
            limits = [p.thresholds.get(name, math.nan) for p in points]
            if any(math.isfinite(v) for v in limits):  # held until the next check: each version has its own
                ax.plot(
                    times,
                    limits,
                    "_--",
                    drawstyle="steps-post",
                    color="#ff7f0e",
                    markersize=14,
                    linewidth=1,
                    label="threshold",
                )
            ax.set_ylabel(name.replace("-", "\n", 1), fontsize=8)
        for when, _, status in marks:
            ax.axvline(when, color="#2ca02c" if status == "Approved" else "#bbbbbb", linewidth=1)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    top = axes[0, 0]
    for when, version, status in marks:
        top.annotate(
            f"v{version} {'promoted' if status == 'Approved' else status.lower()}",
            (when, 1),
            xycoords=("data", "axes fraction"),
            xytext=(-1, -3),  # inside the frame: the top spine does not cross the last letter
            textcoords="offset points",
            bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},
            fontsize=7,
            rotation=90,
            va="top",
            ha="right",
        )
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if handles:
        top.legend(handles, labels, fontsize=7, loc="upper left")
    retrain_checks = sum(p.retrain for p in points)
    fig.suptitle(
        f"{title}: {checks_text(len(points))}, {retrain_checks} called for a retrain, "
        f"{len(marks)} retrain{'' if len(marks) == 1 else 's'}",
        fontsize=10,
    )
    fig.autofmt_xdate()
    # Margins in inches, the same for every number of panels (`tight_layout` measured every label
    # first: half the drawing's time, 0.2 s of each check's history step on a warm worker).
    height = fig.get_figheight()
    fig.subplots_adjust(left=0.09, right=0.98, top=1 - 0.42 / height, bottom=0.55 / height, hspace=0.18)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def checks_text(count: int) -> str:
    """ "1 check", "2 checks"."""
    return f"{count} check" + ("" if count == 1 else "s")


@processing_step(name="monitoring-history", preload=("matplotlib.figure", "matplotlib.backends.backend_agg"))
def update_history(check: DriftCheck, report: DriftReportRef, checked_at: str) -> HistoryRef:
    """Redraw the model's monitoring history with this check in it; link it from the version."""
    step = current_step()
    pipeline = lineage.current_pipeline()
    client = step.client
    points = load_points(client, pipeline.experiment_id, check.model_name)
    marks = retrains(client, check.model_name)
    title = f"{check.model_name} monitoring history"
    picture = dask_client().submit(drawn, points, marks, title, pure=False).result()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(PICTURE).name
        path.write_bytes(picture)
        client.log_artifact(step.run_id, str(path), str(Path(PICTURE).parent))
    uri = step.artifact_uri(PICTURE)
    link = lineage.artifact_link(pipeline.tracking_uri, pipeline.experiment_id, step.run_id, uri, PICTURE)
    client.set_model_version_tag(check.model_name, check.version, HISTORY_TAG, uri)
    version = client.get_model_version(check.model_name, check.version)
    section = (
        f"Last check {markdown.text(checked_at)}: **{'retrain' if check.retrain else 'no retrain'}** "
        f"(policy {markdown.text(check.decision.policy)}) on {check.rows:,} rows of "
        f"{markdown.text(check.batch.location)}; {markdown.link('drift report', report.link)}. "
        f"{checks_text(len(points))} so far: {markdown.link('monitoring history', link)}."
    )
    client.update_model_version(
        check.model_name,
        check.version,
        description=model_card.with_monitoring(version.description or "", section),
    )
    lineage.note("Monitoring history", f"{checks_text(len(points))} of {check.model_name}", link)
    return HistoryRef(uri=uri, link=link, checks=len(points))
