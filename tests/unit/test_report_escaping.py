"""Values from data never become markup: the Evidently HTML report and our markdown tables."""

from __future__ import annotations

import html.parser
import json

import numpy as np
import pandas as pd
import pytest

from tasks.monitoring.drift_report import ReportLayoutChanged, build_report, inert_data
from tasks.tabular.quality import Violation, violations_table

HOSTILE = "</script><script>alert(document.cookie)</script>"
HOSTILE_COLUMN = "<img src=x onerror=alert(1)>|x"


class Elements(html.parser.HTMLParser):
    """Counts elements as a browser's tokenizer sees them (script content ends at `</script`)."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts = 0
        self.images = 0

    def handle_starttag(self, tag, attrs) -> None:
        self.scripts += tag == "script"
        self.images += tag == "img"


def elements(page: str) -> Elements:
    parser = Elements()
    parser.feed(page)
    return parser


def frames(hostile: bool) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    rng = np.random.default_rng(0)
    column = HOSTILE_COLUMN if hostile else "plain"
    values = [HOSTILE if hostile else "a", "b", "c"]

    def frame(n: int) -> pd.DataFrame:
        return pd.DataFrame({"x": rng.normal(size=n), column: rng.choice(values, size=n)})

    return frame(300), frame(100), column


@pytest.mark.parametrize("hostile", [False, True])
def test_the_report_holds_only_evidentlys_own_scripts(tmp_path, hostile):
    reference, current, column = frames(hostile)
    report = build_report(reference, current, ["x"], [column])
    raw = report.snapshot.get_html_str(as_iframe=False)
    assert report.save(tmp_path / "report.html", tmp_path / "report.json", 50 * 2**20)
    page = (tmp_path / "report.html").read_text()
    benign = elements(
        inert_data(build_report(*frames(False)[:2], ["x"], ["plain"]).snapshot.get_html_str(False))
    )
    if hostile:  # Evidently alone lets the value out of its data block
        assert elements(raw).scripts > benign.scripts
    found = elements(page)
    assert found.scripts == benign.scripts and found.images == 0
    assert HOSTILE not in page and "<img" not in page.split("<script>", 2)[1]
    # the data still holds the values as they are: the escapes decode to the same text
    start = page.index("= ", page.index("<script>")) + 2
    data, _ = json.JSONDecoder().raw_decode(page, start)
    assert (HOSTILE in json.dumps(data, ensure_ascii=False)) == hostile


def test_a_report_of_another_layout_is_refused_not_written():
    with pytest.raises(ReportLayoutChanged):
        inert_data("<html><head><script>var x = 1;</script></head></html>")


def test_violation_tables_escape_what_comes_from_data():
    table = violations_table(
        [Violation(column=HOSTILE_COLUMN, rule="unseen_category", observed=HOSTILE, expected="a | b")]
    )
    assert "<" not in table and "<img" not in table
    assert table.count("\n") == 2 and all(line.count(" | ") == 4 for line in table.splitlines()[2:])


def test_a_report_over_the_size_cap_is_replaced_by_a_page_saying_so(tmp_path):
    reference, current, column = frames(False)
    report = build_report(reference, current, ["x"], [column])
    assert not report.save(tmp_path / "report.html", tmp_path / "report.json", 100_000)
    page = (tmp_path / "report.html").read_text()
    assert "over the limit of 0.0954 MiB (--max-report-mb)" in page
    assert "<script" not in page and (tmp_path / "report.json").stat().st_size > 0
