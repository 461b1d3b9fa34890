"""A batch's signals, from its one-pass summary and the champion's calibrated baseline.

Per column: the drift score, Evidently's fixed verdict (score >= 0.1) and the calibrated one (score
beyond mean + k·sd of the training window's chunks), whether it is a model input and its
importance. Then the signals every policy chooses from (`tasks.monitoring.policies`): Evidently's share, the
importance-weighted share of calibrated drift (only model inputs count, `ignore_columns` never do),
prediction drift both ways, the quality drop of the old rule, and performance (realized from labels,
else estimated) against the range of the champion's test period. Pure: the monitor and the
backtest call it alike.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field

from tasks.monitoring.calibration import Calibration
from tasks.monitoring.drift_stats import ColumnProfile, ColumnSummary, column_drift
from tasks.monitoring.performance import PRIMARY
from tasks.monitoring.policies import (
    DATA_DRIFT,
    EVIDENTLY_SHARE,
    FIXED_MUST_NOT_DRIFT,
    FIXED_PREDICTION_DRIFT,
    MUST_NOT_DRIFT,
    PERFORMANCE,
    PREDICTION_DRIFT,
    QUALITY_DROP,
    Signal,
    SignalSettings,
)
from tasks.monitoring.worker import PREDICTION
from tasks.tabular.featurize import FeatureSpec

QUALITY_METRIC = {"regression": "r2", "binary": "accuracy", "multiclass": "accuracy"}
Role = Literal["feature", "target", "prediction"]


class ColumnVerdict(BaseModel):
    """One monitored column of one batch, judged both ways."""

    column: str
    role: Role
    model_input: bool
    importance: float | None = Field(default=None, description="Share of the model's gain (inputs only).")
    kind: str
    method: str
    score: float
    evidently_threshold: float
    evidently_drift: bool = Field(description="Evidently's default verdict: score >= its fixed threshold.")
    threshold: float | None = Field(default=None, description="Calibrated threshold; None: not calibrated.")
    drift: bool | None = Field(default=None, description="Calibrated verdict; None: not calibrated.")
    ignored: bool = False
    rows: int
    missing: int = 0


class Verdict(BaseModel):
    """Everything judged about one batch: columns, metrics and signals."""

    columns: list[ColumnVerdict]
    evidently_share: float = Field(
        description="Share of (not ignored) feature columns Evidently calls drifted."
    )
    weighted_share: float = Field(
        description="Importance-weighted share of inputs beyond calibrated thresholds."
    )
    realized: dict[str, float] = Field(default_factory=dict, description="Metrics from the batch's labels.")
    estimated: dict[str, float] = Field(default_factory=dict, description="Metrics estimated without labels.")
    labelled_rows: int = 0
    signals: dict[str, Signal]

    def features(self) -> list[ColumnVerdict]:
        return [c for c in self.columns if c.role == "feature"]

    def column(self, name: str) -> ColumnVerdict | None:
        return next((c for c in self.columns if c.column == name), None)


def judge(  # noqa: PLR0913, PLR0917  # every signal of one batch, and how each is judged
    summaries: dict[str, ColumnSummary],
    profiles: dict[str, ColumnProfile],
    spec: FeatureSpec,
    calibration: Calibration | None,
    realized: dict[str, float],
    estimated: dict[str, float],
    labelled_rows: int,
    champion_metrics: dict[str, float],
    settings: SignalSettings,
) -> Verdict:
    """Judge a batch (its merged column summaries and metrics) against the champion's baseline."""
    columns = _column_verdicts(summaries, profiles, spec, calibration, settings)
    signals = _drift_signals(columns, calibration, settings)
    signals[QUALITY_DROP] = _quality_drop(realized, champion_metrics, spec, settings)
    signals[PERFORMANCE] = performance_signal(realized, estimated, labelled_rows, spec, calibration, settings)
    return Verdict(
        columns=columns,
        evidently_share=signals[EVIDENTLY_SHARE].value,
        weighted_share=signals[DATA_DRIFT].value,
        realized=realized,
        estimated=estimated,
        labelled_rows=labelled_rows,
        signals=signals,
    )


def _column_verdicts(
    summaries: dict[str, ColumnSummary],
    profiles: dict[str, ColumnProfile],
    spec: FeatureSpec,
    calibration: Calibration | None,
    settings: SignalSettings,
) -> list[ColumnVerdict]:
    """Each column's drift score, against Evidently's fixed threshold and against its calibrated one."""
    k = settings.drift_sd
    importance = calibration.importance if calibration else {}
    ignored = set(settings.ignore_columns)
    roles: dict[str, Role] = {c: "feature" for c in [*spec.numeric, *spec.categorical]}
    roles[spec.target] = "target"
    roles[PREDICTION] = "prediction"
    columns = []
    for name, role in roles.items():
        if name not in summaries:
            continue  # the target of an unlabelled batch
        drift = column_drift(profiles[name], summaries[name])
        normal = calibration.drift.get(name) if calibration else None
        columns.append(
            ColumnVerdict(
                column=name,
                role=role,
                model_input=role == "feature",
                importance=importance.get(name) if role == "feature" and importance else None,
                kind=drift.kind,
                method=drift.method,
                score=drift.score,
                evidently_threshold=drift.threshold,
                evidently_drift=drift.drifted,
                threshold=None if normal is None else normal.threshold(k),
                drift=None if normal is None else normal.alarms(drift.score, k),
                ignored=name in ignored,
                rows=drift.current_rows,
                missing=drift.current_missing,
            )
        )
    return columns


def _drift_signals(
    columns: list[ColumnVerdict], calibration: Calibration | None, settings: SignalSettings
) -> dict[str, Signal]:
    """What drift says: Evidently's share rule, the columns that must not drift, and the calibrated,
    importance-weighted data drift and prediction drift."""
    counted = [c for c in columns if c.role == "feature" and not c.ignored]
    evidently_share = sum(c.evidently_drift for c in counted) / len(counted) if counted else 0.0
    weighted = [c for c in counted if c.drift and c.model_input]
    weighted_share = sum(c.importance or 0.0 for c in weighted)
    prediction = next(c for c in columns if c.role == "prediction")
    signals: dict[str, Signal] = {}

    drifted = [c for c in counted if c.evidently_drift]
    signals[EVIDENTLY_SHARE] = Signal(
        name=EVIDENTLY_SHARE,
        value=evidently_share,
        threshold=settings.drift_share,
        fired=evidently_share >= settings.drift_share,
        basis=f"{len(drifted)} of {len(counted)} feature columns score >= 0.1 (Evidently's default)"
        + (f": {', '.join(c.column for c in drifted)}" if drifted else ""),
    )
    watched = [c for c in columns if c.column in settings.must_not_drift and not c.ignored]
    named = f": {', '.join(c.column for c in watched)}" if watched else " (none named)"
    fixed = [c for c in watched if c.evidently_drift]
    signals[FIXED_MUST_NOT_DRIFT] = Signal(
        name=FIXED_MUST_NOT_DRIFT,
        value=float(len(fixed)),
        threshold=1.0 if watched else None,
        fired=bool(fixed),
        basis=f"columns of --must-not-drift scoring >= 0.1{named}",
    )
    calibrated = [c for c in watched if c.drift]
    signals[MUST_NOT_DRIFT] = Signal(
        name=MUST_NOT_DRIFT,
        value=float(len(calibrated)),
        threshold=1.0 if watched else None,
        fired=bool(calibrated),
        basis=f"columns of --must-not-drift beyond their calibrated thresholds{named}",
    )
    signals[FIXED_PREDICTION_DRIFT] = Signal(
        name=FIXED_PREDICTION_DRIFT,
        value=prediction.score,
        threshold=prediction.evidently_threshold,
        fired=settings.prediction_drift and prediction.evidently_drift,
        basis=f"{prediction.method} of the predictions, Evidently's fixed threshold"
        + ("" if settings.prediction_drift else " (ignored: --no-prediction-drift)"),
    )
    signals[DATA_DRIFT] = Signal(
        name=DATA_DRIFT,
        value=weighted_share,
        threshold=settings.weighted_drift_share if calibration is not None else None,
        fired=calibration is not None and weighted_share >= settings.weighted_drift_share,
        basis=(
            "share of the model's importance on inputs beyond their calibrated thresholds"
            + (
                ": " + ", ".join(f"{c.column} ({c.importance or 0:.2f})" for c in weighted)
                if weighted
                else ""
            )
            if calibration is not None
            else "not calibrated (the version has no calibrated baseline)"
        ),
    )
    signals[PREDICTION_DRIFT] = Signal(
        name=PREDICTION_DRIFT,
        value=prediction.score,
        threshold=prediction.threshold,
        fired=settings.prediction_drift and bool(prediction.drift),
        basis=f"{prediction.method} of the predictions against its calibrated threshold"
        + ("" if prediction.threshold is not None else " (not calibrated)")
        + ("" if settings.prediction_drift else " (ignored: --no-prediction-drift)"),
    )
    return signals


def _quality_drop(
    realized: dict[str, float], champion: dict[str, float], spec: FeatureSpec, settings: SignalSettings
) -> Signal:
    metric = QUALITY_METRIC[spec.task]
    if metric not in realized or metric not in champion:
        return Signal(name=QUALITY_DROP, basis=f"no labels in the batch to compute {metric}")
    drop = champion[metric] - realized[metric]
    return Signal(
        name=QUALITY_DROP,
        value=drop,
        threshold=settings.max_quality_drop,
        fired=drop > settings.max_quality_drop,
        basis=f"{metric} {realized[metric]:.4f} against the champion's test {metric} {champion[metric]:.4f}",
    )


def performance_signal(
    realized: dict[str, float],
    estimated: dict[str, float],
    labelled_rows: int,
    spec: FeatureSpec,
    calibration: Calibration | None,
    settings: SignalSettings,
) -> Signal:
    """The champion's metric on the batch against its range on the test period's chunks: realized
    when the batch has labels (and the metric is defined on them), else estimated."""
    metric = settings.performance_metric or PRIMARY[spec.task]
    k = settings.performance_sd
    if calibration is None:
        return Signal(name=PERFORMANCE, basis="not calibrated (the version has no calibrated baseline)")
    for source, values, normals in (
        ("realized", realized, calibration.realized),
        ("estimated", estimated, calibration.estimated),
    ):
        value = values.get(metric)
        if value is None or math.isnan(value):
            continue
        normal = normals.get(metric)
        if normal is None:
            return Signal(
                name=PERFORMANCE,
                value=value,
                basis=f"{metric} ({source}): not calibrated on the test period ({'; '.join(calibration.notes)})",
            )
        rows = f"{labelled_rows:,} labelled rows" if source == "realized" else "no labels used"
        return Signal(
            name=PERFORMANCE,
            value=value,
            threshold=normal.threshold(k),
            fired=normal.alarms(value, k),
            basis=f"{metric} ({source}, {rows}) against its range on {normal.chunks} batches drawn from the "
            f"champion's test period (mean {normal.mean:.4g}, sd {normal.sd:.4g}, k {k:g})",
        )
    if estimated or realized:
        return Signal(name=PERFORMANCE, basis=f"{metric} is not defined on this batch (e.g. one class only)")
    return Signal(name=PERFORMANCE, basis="no labels and no estimate of performance")
