"""The one place that talks to Evidently (0.7): its API moves between versions, so nothing else imports it.

It builds the report people open (HTML, with Evidently's own plots and the name of each statistical
test) and the JSON of its metric values, and it reads Evidently's per-column verdicts back, which
the tests and the drift benchmark compare with `tasks.drift_stats`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

METHOD_NAMES = {"Wasserstein distance (normed)": "wasserstein", "Jensen-Shannon distance": "jensenshannon"}


@dataclass(frozen=True)
class EvidentlyVerdict:
    column: str
    method: str  # our short name where we know it, else Evidently's own
    score: float
    threshold: float

    @property
    def drifted(self) -> bool:
        return self.score >= self.threshold


@dataclass
class DriftReport:
    verdicts: dict[str, EvidentlyVerdict]
    drifted_share: float
    metrics: list[dict[str, Any]]
    snapshot: Any

    def save(self, html_path: Path, json_path: Path) -> None:
        """Write the self-contained HTML report and the JSON of metric values."""
        html_path.parent.mkdir(parents=True, exist_ok=True)
        self.snapshot.save_html(str(html_path))
        self.snapshot.save_json(str(json_path))


def build_report(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    numeric: list[str],
    categorical: list[str],
    *,
    drift_share: float = 0.5,
    prediction: str | None = None,
    target: str | None = None,
    regression: bool = True,
) -> DriftReport:
    """DataDriftPreset over `numeric + categorical`, drift of `prediction`, and, when the current
    data has labels, RegressionPreset (regression) — Evidently's default test for each column."""
    from evidently import DataDefinition, Dataset, Regression, Report
    from evidently.metrics import ValueDrift
    from evidently.presets import DataDriftPreset, RegressionPreset

    columns = [*numeric, *categorical]
    categorical = list(categorical)
    extra_numeric: list[str] = []
    metrics: list[Any] = [DataDriftPreset(columns=columns, drift_share=drift_share)]
    regressions = []
    if prediction is not None:
        metrics.append(ValueDrift(column=prediction))
        (extra_numeric if regression else categorical).append(prediction)
    labelled = target is not None and target in current.columns and target in reference.columns
    if labelled:
        metrics.append(ValueDrift(column=target))
        (extra_numeric if regression else categorical).append(target)
        if regression and prediction is not None:
            regressions = [Regression(target=target, prediction=prediction)]
            metrics.append(RegressionPreset())
    definition = DataDefinition(
        numerical_columns=[*numeric, *extra_numeric],
        categorical_columns=list(dict.fromkeys(categorical)),
        regression=regressions or None,
    )
    keep = list(dict.fromkeys([*columns, *extra_numeric, *categorical]))
    with warnings.catch_warnings():  # Evidently's internals warn about constant columns and tiny samples
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", UserWarning)
        snapshot = Report(metrics).run(
            Dataset.from_pandas(current[keep], data_definition=definition),
            Dataset.from_pandas(reference[keep], data_definition=definition),
        )
    values = snapshot.dict()["metrics"]
    verdicts: dict[str, EvidentlyVerdict] = {}
    share = 0.0
    for metric in values:
        config = metric.get("config", {})
        kind = config.get("type", "")
        if kind.endswith(":ValueDrift"):
            method = config.get("method", "")
            verdicts[config["column"]] = EvidentlyVerdict(
                column=config["column"],
                method=METHOD_NAMES.get(method, method),
                score=float(metric["value"]),
                threshold=float(config.get("threshold", 0.1)),
            )
        elif kind.endswith(":DriftedColumnsCount"):
            share = float(metric["value"]["share"])
    return DriftReport(verdicts=verdicts, drifted_share=share, metrics=values, snapshot=snapshot)
