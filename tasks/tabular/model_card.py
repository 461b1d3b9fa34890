"""The model card: a version's description written for people (SageMaker's model card, in Markdown).

MLflow shows a version's description as Markdown on the version page; the same text is logged as
`model_card.md` on the execution's run. It says what the model is, how it did against the champion
it was compared with on the same test data, which data it learned from (window, rows, digests),
its approval and why, what started its training, and where to look (links into MLflow and Prefect
when they are servers). The monitor keeps one section of it current: the monitoring history.
Every value from data or from a user (column names, paths, reasons) is escaped (`tasks.steps.markdown`).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from pydantic import BaseModel

from tasks.steps import markdown
from tasks.steps.refs import DatasetRef

_MONITORING_START = "<!-- keel:monitoring -->"
_MONITORING_END = "<!-- /keel:monitoring -->"
_MONITORING = re.compile(re.escape(_MONITORING_START) + ".*?" + re.escape(_MONITORING_END), re.DOTALL)


class CardFacts(BaseModel):
    """What a card says, gathered by the ModelStep."""

    model_name: str
    version: str
    status: str
    champion: bool
    previous_champion: str | None = None
    task: str
    target: str
    inputs: list[str]
    metrics: dict[str, float]
    compared: tuple[str, dict[str, float]] | None = None
    gate_message: str
    datasets: dict[str, DatasetRef]
    boundaries: dict[str, str] = {}
    reason: str = ""
    trigger: dict[str, str] = {}
    execution_run_id: str
    execution_link: str | None = None
    flow_run_name: str = ""
    flow_run_link: str | None = None
    registered_at: str = ""


def _metric_table(facts: CardFacts) -> str:
    names = sorted(facts.metrics)
    if facts.compared is None:
        return markdown.table(
            ["metric (test period)", "this version"], [[n, f"{facts.metrics[n]:.4g}"] for n in names]
        )
    other, theirs = facts.compared
    return markdown.table(
        ["metric (test period)", "this version", f"champion v{markdown.text(other)} on the same data"],
        [[n, f"{facts.metrics[n]:.4g}", f"{theirs[n]:.4g}" if n in theirs else ""] for n in names],
    )


def split_windows(boundaries: dict[str, str]) -> dict[str, str]:
    """Each dataset's time window, by day, from the processing step's split boundaries."""
    day = {k: v[:10] for k, v in boundaries.items()}
    if not {"start", "valid_start", "test_start", "end"} <= set(day):
        return {}
    return {
        "raw": f"{day['start']} .. {day['end']}",
        "train": f"{day['start']} .. {day['valid_start']}",
        "valid": f"{day['valid_start']} .. {day['test_start']}",
        "test": f"{day['test_start']} .. {day['end']}",
    }


def _data_table(facts: CardFacts) -> str:
    rows = []
    windows = split_windows(facts.boundaries)
    for name, ref in facts.datasets.items():
        window = windows.get(name, "")
        rows.append(
            [
                name,
                f"{ref.rows:,}" if ref.rows is not None else "",
                window,
                f"{ref.digest[:16]}…",
                ref.location,
            ]
        )
    return markdown.table(["dataset", "rows", "time window", "sha256", "location"], rows)


def render(facts: CardFacts) -> str:
    """The card's Markdown."""
    title = (
        f"# {markdown.text(facts.model_name)} v{markdown.text(facts.version)}: {markdown.text(facts.status)}"
    )
    if facts.champion:
        title += ", champion"
    when = facts.registered_at or datetime.now(UTC).isoformat(timespec="seconds")
    ran = (
        markdown.link(f"execution {facts.execution_run_id}", facts.execution_link)
        if facts.execution_link
        else f"execution `{facts.execution_run_id}`"
    )
    flow_run = (
        markdown.link(f"Prefect flow run {facts.flow_run_name}", facts.flow_run_link)
        if facts.flow_run_link
        else (f"Prefect flow run {markdown.text(facts.flow_run_name)}" if facts.flow_run_name else "")
    )
    inputs = ", ".join(markdown.text(c) for c in facts.inputs)
    lines = [
        title,
        "",
        f"A LightGBM {markdown.text(facts.task)} model of **{markdown.text(facts.target)}** from "
        f"{len(facts.inputs)} input columns ({inputs}). Registered {when} by {ran}"
        + (f" ({flow_run})" if flow_run else "")
        + ".",
        "",
        "## Why it was trained",
        "",
        f"- Reason: {markdown.text(facts.reason or 'not given')}",
    ]
    for key, value in sorted(facts.trigger.items()):
        shown = (
            markdown.link(value, value) if value.startswith(("http://", "https://")) else markdown.text(value)
        )
        lines.append(f"- Trigger {markdown.text(key)}: {shown}")
    lines += [
        "",
        "## How it did",
        "",
        _metric_table(facts),
        "",
        "## Approval",
        "",
        f"- Status: **{markdown.text(facts.status)}**. Quality gate: {markdown.text(facts.gate_message)}",
        "- Champion: "
        + (
            f"this version (was v{markdown.text(facts.previous_champion)})"
            if facts.champion and facts.previous_champion and facts.previous_champion != facts.version
            else "this version"
            if facts.champion
            else f"unchanged (v{markdown.text(facts.previous_champion)})"
            if facts.previous_champion
            else "none"
        ),
        "",
        "## Data",
        "",
        _data_table(facts),
        "",
        "## Monitoring",
        "",
        _MONITORING_START,
        "Not monitored yet: `python -m flows.monitor --batch NEW_DATA` checks a batch against this version.",
        _MONITORING_END,
        "",
    ]
    return "\n".join(lines)


def with_monitoring(card: str, section: str) -> str:
    """The card with its monitoring section replaced (appended to a description without one)."""
    block = f"{_MONITORING_START}\n{section}\n{_MONITORING_END}"
    if _MONITORING.search(card):
        return _MONITORING.sub(lambda _: block, card, count=1)
    return f"{card.rstrip()}\n\n## Monitoring\n\n{block}\n"


def model_description(model_name: str, task: str, target: str, champion: str | None) -> str:
    """The registered model's own description: what it is and where its champion's card is."""
    return (
        f"# {markdown.text(model_name)}\n\nA LightGBM {markdown.text(task)} model of "
        f"**{markdown.text(target)}**, trained and registered by keel's training pipeline. "
        + (
            f"The champion is **v{markdown.text(champion)}** (alias `@champion`). "
            if champion
            else "No version is champion. "
        )
        + "Each version's description is its model card: metrics against the champion it was compared "
        "with, its data, its approval and its monitoring history."
    )
