"""The one place that talks to Evidently (0.7): its API moves between versions, so nothing else imports it.

It builds the report people open (HTML, with Evidently's own plots and the name of each statistical
test) and the JSON of its metric values, and it reads Evidently's per-column verdicts back, which
the tests and the drift benchmark compare with `tasks.monitoring.drift_stats`.
"""

from __future__ import annotations

import json
import re
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

    def save(self, html_path: Path, json_path: Path, max_bytes: int) -> bool:
        """Write the self-contained HTML report (its data made inert, `inert_data`) and the JSON of
        metric values; an HTML report over `max_bytes` is replaced by a page saying so (False)."""
        html_path.parent.mkdir(parents=True, exist_ok=True)
        html = fit_to_frame(inert_data(self.snapshot.get_html_str(as_iframe=False))).encode("utf-8")
        kept = len(html) <= max_bytes
        if not kept:
            html = TOO_LARGE.format(size=len(html) / 2**20, limit=max_bytes / 2**20).encode()
        html_path.write_bytes(html)
        self.snapshot.save_json(str(json_path))
        return kept


@dataclass(frozen=True)
class RenderedReport:
    """A report written out, as the files' bytes and the verdicts read back: what a Dask worker
    sends back (`rendered_report`)."""

    html: bytes
    json: bytes
    kept: bool  # False: `html` is the page saying the report was over the size limit
    verdicts: dict[str, EvidentlyVerdict]
    drifted_share: float


def rendered_report(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    numeric: list[str],
    categorical: list[str],
    max_bytes: int,
    **options: Any,
) -> RenderedReport:
    """`build_report` and `DriftReport.save`, for a Dask worker: importing Evidently takes about 5 s
    in a new process, so the report is written where it is imported already (a warm worker)."""
    import tempfile

    report = build_report(reference, current, numeric, categorical, **options)
    with tempfile.TemporaryDirectory() as tmp:
        html, json_file = Path(tmp) / "report.html", Path(tmp) / "report.json"
        kept = report.save(html, json_file, max_bytes)
        return RenderedReport(
            html.read_bytes(), json_file.read_bytes(), kept, report.verdicts, report.drifted_share
        )


# Evidently lays its report out about 1,300 px wide; MLflow's artifact frame is half that, and cuts
# the right half off. Narrower windows zoom the whole page out instead (Chromium, Firefox >= 126).
_FIT = "".join(
    f"@media (max-width:{width}px){{html{{zoom:{zoom}}}}}"
    for width, zoom in (
        (1300, 0.9),
        (1150, 0.8),
        (1000, 0.7),
        (860, 0.6),
        (720, 0.5),
        (600, 0.42),
        (500, 0.36),
    )
)
FIT_STYLE = f"<style>{_FIT}</style>"


def fit_to_frame(html: str) -> str:
    """The report with `FIT_STYLE` at the start of its head."""
    head = html.find("<head>")
    return html[: head + 6] + FIT_STYLE + html[head + 6 :] if head >= 0 else FIT_STYLE + html


TOO_LARGE = (
    "<!doctype html><meta charset=utf-8><title>Drift report not kept</title>"
    "<p>The Evidently report was {size:.1f} MiB, over the limit of {limit:.3g} MiB (--max-report-mb), "
    "so it was not kept. The verdict and every column's scores are beside this file: "
    "columns.md and verdict.json.</p>\n"
)


class ReportLayoutChanged(RuntimeError):
    """Evidently's HTML is not laid out as `inert_data` expects: no report is written rather than one
    that could carry script from the data."""


_DATA_START = re.compile(r"<script>\s*var (\w+) = ")
_GRAPHS_START = re.compile(r";\s*var (additional_graphs_\w+) = ")
_DATA_END = re.compile(r";\s*</script>")


def inert_json(value: Any) -> str:
    """JSON that cannot end a `<script>` or open markup: `<`, `>`, `&` and the JavaScript line
    separators written as escapes (they only occur inside strings, which decode to the same text)."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=True)
    for char, escape in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, escape)
    return text


def inert_data(html: str) -> str:
    """Evidently (0.7) writes the report's data with `json.dumps` inside an inline `<script>`, so a
    value `</script><script>...` from the data ends it and runs. The data block comes first in the
    page, before any value from the data: its two JSON values are parsed exactly where they start
    (whatever their strings hold) and written again with `inert_json`."""
    decoder = json.JSONDecoder()
    start = html.find("<script>")
    found = _DATA_START.match(html, start) if start >= 0 else None
    if found is None:
        raise ReportLayoutChanged("no data block opens the first <script> of Evidently's report")
    info, info_end = decoder.raw_decode(html, found.end())
    graphs_start = _GRAPHS_START.match(html, info_end)
    if graphs_start is None or graphs_start.group(1) != f"additional_graphs_{found.group(1)}":
        raise ReportLayoutChanged("the report's data block does not hold its graphs where expected")
    graphs, graphs_end = decoder.raw_decode(html, graphs_start.end())
    if _DATA_END.match(html, graphs_end) is None:
        raise ReportLayoutChanged("the report's data block does not end after its graphs")
    return "".join(
        [
            html[: found.end()],
            inert_json(info),
            html[info_end : graphs_start.end()],
            inert_json(graphs),
            html[graphs_end:],
        ]
    )


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
    if target is not None and labelled:
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
