"""What a label check shows people: the realized metric per window and version against each version's
range (a picture and a table), and the labels that could not be used (a table, every one counted).
Values from the label file (ids, labels) are escaped wherever they reach HTML or Markdown."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.monitoring.ground_truth import PROBLEM, WindowQuality
from tasks.steps import markdown

TABLE_ROWS = 200  # bad labels listed in the HTML report and the Prefect artifact (the CSV has all)


def _number(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4g}"


def verdict_of(window: WindowQuality) -> str:
    if window.signal is None:
        return "too few labels to judge"
    if not window.judged:
        return window.signal.basis
    return "DROPPED" if window.dropped else "within range"


def window_rows(windows: Sequence[WindowQuality], metric: str) -> list[list[str]]:
    return [
        [
            f"v{w.version}",
            w.start[:19],
            w.end[:19],
            f"{w.rows:,}",
            _number(w.metrics.get(metric)),
            _number(w.signal.threshold if w.signal else None),
            verdict_of(w),
        ]
        for w in windows
    ]


WINDOW_HEADER = ["version", "window from", "to", "labelled", "metric", "threshold", "verdict"]


def windows_markdown(windows: Sequence[WindowQuality], metric: str) -> str:
    header = [*WINDOW_HEADER[:4], metric, *WINDOW_HEADER[5:]]
    return markdown.table(header, window_rows(windows, metric))


def problems_markdown(counts: dict[str, int], bad: pd.DataFrame) -> str:
    lines = [markdown.table(["problem", "labels"], [[p, f"{n:,}"] for p, n in counts.items()])]
    if len(bad):
        shown = bad.head(TABLE_ROWS)
        lines += [
            "",
            markdown.table(list(bad.columns), shown.astype("string").fillna("").to_numpy().tolist()),
        ]
        if len(bad) > TABLE_ROWS:
            lines.append(f"\n(the first {TABLE_ROWS} of {len(bad):,}; all are in bad_labels.csv)")
    return "\n".join(lines)


def draw(windows: Sequence[WindowQuality], metric: str, title: str, path: Path) -> None:
    """The metric per window, a line per version, with each version's threshold dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 4), dpi=100)
    for version in sorted({w.version for w in windows}, key=int):
        mine = [w for w in windows if w.version == version]
        times = pd.to_datetime([w.start for w in mine], utc=True).tz_localize(None).to_numpy()
        values = np.array([w.metrics.get(metric, math.nan) for w in mine], dtype="float64")
        (line,) = axes.plot(times, values, marker="o", label=f"v{version}")
        dropped = np.array([w.dropped for w in mine], dtype=bool)
        if dropped.any():
            axes.scatter(
                times[dropped], values[dropped], s=120, facecolors="none", edgecolors="red", zorder=3
            )
        limits = [w.signal.threshold for w in mine if w.signal is not None and w.signal.threshold is not None]
        if limits:
            axes.axhline(limits[-1], linestyle="--", color=line.get_color(), linewidth=1)
    axes.set_title(title, fontsize=10)
    axes.set_ylabel(f"{metric} (realized)")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.autofmt_xdate()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(  # one page of everything the check found
    folder: Path,
    title: str,
    decision: str,
    windows: Sequence[WindowQuality],
    metric: str,
    counts: dict[str, int],
    bad: pd.DataFrame,
    notes: Sequence[str],
) -> None:
    """report.html (with windows.png beside it), windows.csv and bad_labels.csv in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    draw(windows, metric, title, folder / "windows.png")
    pd.DataFrame(
        [
            {
                "version": w.version,
                "window_start": w.start,
                "window_end": w.end,
                "labelled": w.rows,
                **w.metrics,
                "threshold": w.signal.threshold if w.signal else None,
                "verdict": verdict_of(w),
            }
            for w in windows
        ]
    ).to_csv(folder / "windows.csv", index=False)
    bad.to_csv(folder / "bad_labels.csv", index=False)
    shown = bad.head(TABLE_ROWS).astype("string").fillna("")
    more = (
        f"<p>The first {TABLE_ROWS} of {len(bad):,}; all are in bad_labels.csv.</p>"
        if len(bad) > TABLE_ROWS
        else ""
    )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}</style></head>
<body><h1>{html.escape(title)}</h1>
<p><b>{html.escape(decision)}</b></p>
<img src="windows.png" alt="{html.escape(metric)} per window">
<h2>Windows</h2>
{_html_table([*WINDOW_HEADER[:4], metric, *WINDOW_HEADER[5:]], window_rows(windows, metric))}
<h2>Labels not used</h2>
{_html_table(["problem", "labels"], [[p, f"{n:,}"] for p, n in counts.items()]) if counts else "<p>none: every label was used</p>"}
{_html_table(list(bad.columns), shown.to_numpy().tolist()) if len(bad) else ""}{more}
{"".join(f"<p>{html.escape(n)}</p>" for n in notes)}
</body></html>
"""
    (folder / "report.html").write_text(page)


def problem_counts(bad: pd.DataFrame) -> dict[str, int]:
    return {str(k): int(v) for k, v in bad[PROBLEM].value_counts().items()} if len(bad) else {}
