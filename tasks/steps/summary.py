"""The execution summary: one Prefect Markdown artifact per flow run, the page to start from.

It links the flow run to what it made and decided: the MLflow parent run, the model version, the
report, the decision and why. The framework opens it with the execution (`lineage.pipeline_run`)
and publishes it when the execution ends, failed or not; flows and steps add facts with `note`.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.steps import markdown

SUMMARY_KEY = "execution-summary"


@dataclass(frozen=True)
class Fact:
    label: str
    value: str
    link: str | None = None


def render(title: str, facts: list[Fact]) -> str:
    """A two-column table; values are escaped text, links only for http(s) and file URLs."""
    rows = [
        [f.label, markdown.Trusted(markdown.link(f.value, f.link) if f.link else markdown.text(f.value))]
        for f in facts
    ]
    return f"### {markdown.text(title)}\n\n" + markdown.table(["", ""], rows) + "\n"


def publish(title: str, facts: list[Fact], description: str = "") -> None:
    """Create the summary artifact of the running flow run (nothing outside one)."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.runtime import flow_run

    if not flow_run.id:
        return
    create_markdown_artifact(key=SUMMARY_KEY, markdown=render(title, facts), description=description or title)
