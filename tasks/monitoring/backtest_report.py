"""What the backtest shows: per policy, the table, the JSON and the picture of its metric over time."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from pydantic import BaseModel, Field

from tasks.monitoring.backtest import Batch, PolicyRun, detection_delays
from tasks.monitoring.performance import HIGHER_IS_BETTER
from tasks.steps import markdown


class PolicySummary(BaseModel):
    """One policy's figures."""

    policy: str
    mean: float = Field(description="Mean of the per-batch metric of the model in service.")
    relative_to_always: float | None = Field(default=None, description="mean / always's mean.")
    relative_to_never: float | None = None
    alarms: int
    retrains: int
    retrain_share_of_always: float | None = Field(default=None, description="retrains / always's retrains.")
    promoted: int
    false_alarms: int | None = Field(
        default=None,
        description="Alarms on batches inside the initial training window (data-driven policies).",
    )
    inside_batches: int
    detection_delays: list[int | None] = Field(default_factory=list)
    scores: list[float]
    retrain_batches: list[int]
    alarm_batches: list[int]
    reasons: dict[int, list[str]] = Field(
        default_factory=dict, description="Why the policy fired, per batch."
    )
    inside_alarm_batches: list[int] = Field(default_factory=list)
    blind: int = Field(
        default=0, description="Batches it could not judge (a signal it needs had no threshold)."
    )
    blind_reason: str = ""


def summarise_runs(
    runs: list[PolicyRun], batches: list[Batch], inside: list[Batch], change_points, data_driven: set[str]
) -> list[PolicySummary]:
    by_name = {r.policy: r for r in runs}
    always, never = by_name.get("always"), by_name.get("never")
    out = []
    for run in runs:
        mean = run.mean()
        out.append(
            PolicySummary(
                policy=run.policy,
                mean=mean,
                relative_to_always=_ratio(mean, always.mean()) if always else None,
                relative_to_never=_ratio(mean, never.mean()) if never else None,
                alarms=len(run.alarms),
                retrains=len(run.retrains),
                retrain_share_of_always=(len(run.retrains) / len(always.retrains))
                if always and always.retrains
                else None,
                promoted=len(run.promoted),
                false_alarms=len(run.inside_alarms) if run.policy in data_driven else None,
                inside_batches=len(inside),
                detection_delays=detection_delays(run, batches, change_points) if change_points else [],
                scores=run.scores,
                retrain_batches=run.retrains,
                alarm_batches=run.alarms,
                reasons=run.reasons,
                inside_alarm_batches=run.inside_alarms,
                blind=len(run.blind),
                blind_reason=run.blind_reason,
            )
        )
    return out


def _ratio(a: float, b: float) -> float | None:
    return None if math.isnan(a) or math.isnan(b) or b == 0 else a / b


def _fmt(value: float | None, digits: int = 3) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def results_table(summaries: list[PolicySummary], metric: str, change_points) -> str:
    """Markdown, one row per policy, best mean first."""
    direction = -1 if metric in HIGHER_IS_BETTER else 1
    rows = sorted(summaries, key=lambda s: (math.isnan(s.mean), direction * s.mean))
    better = "higher is better" if metric in HIGHER_IS_BETTER else "lower is better"
    header = [
        "policy",
        f"mean {metric} ({better})",
        "vs always",
        "vs never",
        "retrains",
        "of always's retrains",
        "alarms",
        "promoted",
        "false alarms (initial window)",
    ]
    if change_points:
        header.append("detection delay (batches)")
    blind = any(s.blind for s in summaries)
    if blind:
        header.append("batches it could not judge")
    body = []
    for s in rows:
        row: list[object] = [
            s.policy,
            _fmt(s.mean, 4),
            _fmt(s.relative_to_always),
            _fmt(s.relative_to_never),
            s.retrains,
            "" if s.retrain_share_of_always is None else f"{s.retrain_share_of_always:.0%}",
            s.alarms,
            s.promoted,
            "n/a (not data-driven)" if s.false_alarms is None else f"{s.false_alarms} of {s.inside_batches}",
        ]
        if change_points:
            row.append(", ".join("not detected" if d is None else str(d) for d in s.detection_delays))
        if blind:
            row.append(markdown.Trusted(f"**{s.blind}**") if s.blind else 0)
        body.append(row)
    notes = [
        f"- {markdown.text(s.policy)} could not judge {s.blind} of {len(s.scores)} batches, so it could not "
        f"fire on them ({markdown.text(s.blind_reason)})"
        for s in rows
        if s.blind
    ]
    return "\n".join([markdown.table(header, body), *(["", *notes] if notes else [])])


def plot(
    summaries: list[PolicySummary],
    batches: list[Batch],
    metric: str,
    path: Path,
    title: str,
    change_points: list | None = None,
) -> None:
    """The metric of the model in service over time, one line per policy, its retrains marked; below,
    every policy's retrains on one time axis; known change points as dashed lines on both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    starts = np.array([b.start for b in batches], dtype="datetime64[ns]")
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(12, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]}
    )
    colors = plt.get_cmap("tab10")
    for i, s in enumerate(summaries):
        color = colors(i % 10)
        top.plot(starts, s.scores, label=f"{s.policy} ({s.retrains} retrains)", color=color, linewidth=1.2)
        marks = [b for b in s.retrain_batches if b < len(starts)]
        top.scatter(starts[marks], np.asarray(s.scores)[marks], color=color, s=14, zorder=3)
        bottom.scatter(starts[marks], [i] * len(marks), color=color, marker="|", s=120)
    for index, point in enumerate(change_points or []):
        for axis in (top, bottom):
            axis.axvline(np.datetime64(point), color="black", linestyle="--", linewidth=1, label=None)
        top.annotate("known change" if index == 0 else "", (np.datetime64(point), 1.0), xycoords=("data", "axes fraction"),
                     xytext=(3, -12), textcoords="offset points", fontsize=8)  # fmt: skip
    top.set_ylabel(f"{metric} per batch ({'higher' if metric in HIGHER_IS_BETTER else 'lower'} is better)")
    top.set_title(title)
    top.legend(fontsize=8, ncol=2)
    top.grid(alpha=0.3)
    bottom.set_yticks(range(len(summaries)), [s.policy for s in summaries], fontsize=8)
    bottom.set_ylim(-0.7, len(summaries) - 0.3)
    bottom.set_title("retrains (after the batch marked)", fontsize=9)
    bottom.grid(alpha=0.3, axis="x")
    bottom.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
