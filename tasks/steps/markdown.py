"""Markdown for reports: values from data (column names, file paths, labels) are escaped, never trusted.

A column named `<img src=x onerror=...>` or `a|b` must show as text in a Prefect artifact or a
markdown file, not become markup or break the table.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence

_SPECIAL = re.compile(r"([\\`*_\[\]|~])")  # what breaks a table cell or starts emphasis, code, a link


def text(value: object) -> str:
    """Any value as inert markdown text: HTML entities escaped, markdown syntax backslashed, one line."""
    escaped = html.escape(str(value), quote=False)
    return _SPECIAL.sub(r"\\\1", escaped).replace("\r", " ").replace("\n", " ")


def link(label: object, url: str) -> str:
    """A link whose label is escaped text; only http(s) and file URLs become links, others stay text."""
    if not url.startswith(("http://", "https://", "file://")) or any(c in url for c in " <>()\n"):
        return f"{text(label)} ({text(url)})"
    return f"[{text(label)}]({url})"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; header cells are ours (trusted), row cells are escaped unless they are
    `Trusted` (markup we built, such as bold or a link made with `link`)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(c.markup if isinstance(c, Trusted) else text(c) for c in row) + " |")
    return "\n".join(lines)


class Trusted:
    """Markup built by us from escaped parts, to be put in a table as is."""

    def __init__(self, markup: str) -> None:
        self.markup = markup

    def __str__(self) -> str:
        return self.markup
