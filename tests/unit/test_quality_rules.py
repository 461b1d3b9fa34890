"""The data-quality rules on their own: stats per partition merge into the table's, constraints come
from them, and each rule fires on its defect and only on it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.steps.errors import DataValidationError
from tasks.steps.refs import DatasetRef
from tasks.tabular.data import check_csv_ends
from tasks.tabular.quality import QualityRules, constraints_from, partition_stats, violations

REF = DatasetRef(name="raw", uri="/data/x.csv", digest="d", format="csv")


def frame(**changes) -> pd.DataFrame:
    base = pd.DataFrame(
        {
            "day": [f"2011-01-0{i % 9 + 1}" for i in range(40)],
            "temp": np.linspace(0.1, 0.9, 40).astype(str),
            "weather": ["clear", "mist"] * 20,
            "cnt": [str(i + 1) for i in range(40)],
        }
    )
    return base.assign(**changes)


def stats_of(data: pd.DataFrame) -> dict:
    halves = [partition_stats(part, "day") for part in (data.iloc[:20], data.iloc[20:])]
    return {c: halves[0][c].merge(halves[1][c]) for c in halves[0]}


def check(data: pd.DataFrame, **rules) -> list[tuple[str | None, str]]:
    baseline = constraints_from(REF, stats_of(frame()), "day")
    found = violations(stats_of(data), 0, [], "day", baseline, QualityRules(**rules), optional=[])
    return [(v.column, v.rule) for v in found]


def test_constraints_from_the_training_data():
    baseline = constraints_from(REF, stats_of(frame()), "day")
    assert baseline.columns["temp"].kind == "numeric"
    assert baseline.columns["temp"].min == pytest.approx(0.1) and baseline.columns[
        "temp"
    ].max == pytest.approx(0.9)
    assert baseline.columns["weather"].categories == ["clear", "mist"]
    assert baseline.columns["cnt"].non_negative
    assert baseline.columns["day"].kind == "time"
    assert check(frame()) == []


@pytest.mark.parametrize(
    ("defect", "expected"),
    [
        ({"temp": ["warm"] + ["0.5"] * 39}, ("temp", "type")),
        ({"temp": [None] * 40}, ("temp", "not all missing")),
        ({"temp": ["inf"] + ["0.5"] * 39}, ("temp", "finite")),
        ({"temp": [None] * 2 + ["0.5"] * 38}, ("temp", "completeness")),
        ({"temp": ["5.0"] + ["0.5"] * 39}, ("temp", "range")),
        ({"cnt": ["-1"] + ["3"] * 39}, ("cnt", "non-negative")),
        ({"weather": ["tornado"] + ["clear"] * 39}, ("weather", "categories")),
        ({"day": ["someday"] + ["2011-01-01"] * 39}, ("day", "time")),
    ],
)
def test_each_rule_fires_on_its_defect(defect, expected):
    assert check(frame(**defect)) == [expected]


def test_tolerances_and_missing_columns():
    assert check(frame(temp=[None] * 2 + ["0.5"] * 38), missing_tolerance=0.1) == []
    assert check(frame(temp=["1.2"] + ["0.5"] * 39)) == []  # within half the range beyond the max
    assert check(frame().drop(columns=["weather"])) == [("weather", "present")]
    baseline = constraints_from(REF, stats_of(frame()), "day")
    optional = violations(
        stats_of(frame().drop(columns=["weather"])), 0, [], "day", baseline, QualityRules(), ["weather"]
    )
    assert optional == []


def test_columns_the_model_does_not_read_are_not_held_to_the_baseline():
    """An id that grows, a target that moved: not bad data. The rules that need no baseline still hold."""
    baseline = constraints_from(REF, stats_of(frame()), "day")
    moved = frame(cnt=[str(1000 + i) for i in range(40)], weather=["tornado"] * 40)
    assert {
        (v.column, v.rule) for v in violations(stats_of(moved), 0, [], "day", baseline, QualityRules(), [])
    } == {
        ("cnt", "range"),
        ("weather", "categories"),
    }
    assert (
        violations(
            stats_of(moved), 0, [], "day", baseline, QualityRules(), [], not_features=["cnt", "weather"]
        )
        == []
    )
    # with the model's columns given (the monitor), only those are held to the baseline
    assert (
        violations(stats_of(moved), 0, [], "day", baseline, QualityRules(), [], required=["day", "temp"])
        == []
    )
    broken = frame(cnt=["inf"] + ["3"] * 39)
    found = violations(stats_of(broken), 0, [], "day", baseline, QualityRules(), [], not_features=["cnt"])
    assert [(v.column, v.rule) for v in found] == [("cnt", "finite")]


def test_the_target_may_move_but_not_break():
    """Labels beyond the champion's range: what a retrain is for. Labels that are not numbers, or
    negative counts: broken, whether or not the model reads them."""
    baseline = constraints_from(REF, stats_of(frame()), "day")

    def target_rules(data: pd.DataFrame, **given) -> list[tuple[str | None, str]]:
        found = violations(stats_of(data), 0, [], "day", baseline, QualityRules(), [], target="cnt", **given)
        return [(v.column, v.rule) for v in found]

    assert target_rules(frame(cnt=[str(1000 + i) for i in range(40)])) == []
    assert target_rules(frame(cnt=["many"] + ["3"] * 39)) == [("cnt", "type")]
    assert target_rules(frame(cnt=["-1"] + ["3"] * 39), required=["day", "temp"]) == [("cnt", "non-negative")]


def test_the_range_of_a_column_that_never_was_negative_does_not_reach_below_zero():
    baseline = constraints_from(REF, stats_of(frame()), "day")  # cnt 1 .. 40, never negative
    [(range_violation)] = violations(
        stats_of(frame(cnt=["400"] + ["3"] * 39)), 0, [], "day", baseline, QualityRules(), []
    )
    assert range_violation.expected.startswith("0 .. 59.5 ")  # not "-18.5 .. 59.5"
    assert baseline.columns["temp"].non_negative  # 0.1 .. 0.9: its range stops at 0 too


def test_a_csv_cut_off_mid_row_is_refused_and_a_missing_final_newline_is_not(tmp_path):
    whole = tmp_path / "whole.csv"
    whole.write_text("a,b,c\n1,2,3\n4,5,6")  # no final newline, but the row is complete
    check_csv_ends(str(whole), ["a", "b", "c"])
    cut = tmp_path / "cut.csv"
    cut.write_text("a,b,c\n1,2,3\n4,5")
    with pytest.raises(DataValidationError, match="truncated CSV: the last row has 2 of 3 fields") as error:
        check_csv_ends(str(cut), ["a", "b", "c"])
    assert error.value.column == "c"


@pytest.mark.parametrize("files", [1, 3])
def test_duplicated_keys_are_counted_within_a_partition_and_across_partitions(tmp_path, monkeypatch, files):
    from tasks.steps.compute import dask_cluster
    from tasks.steps.refs import content_digest
    from tasks.steps.settings import Settings
    from tasks.tabular.quality import table_stats

    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    rows = frame().assign(hour=[str(i % 24) for i in range(40)])
    rows.loc[39, ["day", "hour"]] = rows.loc[0, ["day", "hour"]].to_numpy()  # first and last: one repeat
    folder = tmp_path / "table"
    folder.mkdir()
    for i, part in enumerate(np.array_split(rows, files)):
        part.to_parquet(folder / f"part-{i}.parquet", index=False)
    data = DatasetRef(name="raw", uri=str(folder), digest=content_digest(str(folder)), format="parquet")
    with dask_cluster(Settings(state_dir=tmp_path / ".keel"), 1):
        stats, duplicates = table_stats(data, "day", ["day", "hour"])
        assert duplicates == 1
        assert stats["cnt"].rows == 40
        assert table_stats(data, "day", ["day", "hour", "cnt"])[1] == 0
