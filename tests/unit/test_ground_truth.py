"""Late labels' rules (tasks.monitoring.ground_truth) on small frames: which labels are usable, the
join with `--within`, what a version can be scored on, windows, and a classifier's window metrics."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from tasks.monitoring import ground_truth as gt
from tasks.monitoring.policies import SignalSettings
from tasks.steps.errors import DataValidationError
from tasks.steps.transform import INFERENCE_ID, MODEL_VERSION_COLUMN, SCORED_AT_COLUMN
from tasks.tabular.featurize import FeatureSpec

NOW = pd.Timestamp("2026-06-30T12:00:00Z")


def labels(ids: list, values: list) -> pd.DataFrame:
    return pd.DataFrame(
        {gt.ROW: range(1, len(ids) + 1), INFERENCE_ID: pd.array(ids, dtype="string"), gt.LABEL: values}
    )


def predictions(ids: list[str], version: str = "1", scored_at: pd.Timestamp = NOW) -> pd.DataFrame:
    return pd.DataFrame(
        {
            INFERENCE_ID: ids,
            MODEL_VERSION_COLUMN: version,
            SCORED_AT_COLUMN: scored_at,
            "prediction": np.arange(len(ids), dtype=float),
        }
    )


def problems(bad: list[pd.DataFrame]) -> dict[str, list[int]]:
    table = gt.bad_table(bad)
    return {p: sorted(table.loc[table[gt.PROBLEM] == p, gt.ROW]) for p in table[gt.PROBLEM].unique()}


def test_every_unusable_label_is_kept_with_its_problem():
    frame = labels(
        ["a", None, " ", "b", "c", "c", "d", "d", "e"],
        [1.0, 2.0, 3.0, None, 5.0, 5.0, 6.0, 7.0, 8.0],
    )
    usable, bad = gt.usable_labels(frame)
    assert usable[INFERENCE_ID].tolist() == ["a", "c", "e"]
    assert problems(bad) == {
        gt.MISSING_ID: [2, 3],
        gt.MISSING_LABEL: [4],
        gt.DUPLICATED: [6],
        gt.CONFLICTING: [7, 8],
    }


def test_the_join_names_unmatched_ids_and_honours_within():
    frame = labels(["a", "b", "old", "x"], [1.0, 2.0, 3.0, 4.0])
    captured = pd.concat(
        [
            predictions(["a", "b"], "1"),
            predictions(["a"], "2"),  # scored by two versions: joined to both
            predictions(["old"], "1", NOW - pd.Timedelta("40D")),
        ],
        ignore_index=True,
    )
    joined, bad = gt.join_labels(frame, captured, None, NOW)
    assert sorted(zip(joined[INFERENCE_ID], joined[MODEL_VERSION_COLUMN], strict=True)) == [
        ("a", "1"), ("a", "2"), ("b", "1"), ("old", "1"),
    ]  # fmt: skip
    assert problems(bad) == {gt.UNMATCHED: [4]}
    joined, bad = gt.join_labels(frame, captured, pd.Timedelta("30D"), NOW)
    assert set(joined[INFERENCE_ID]) == {"a", "b"}
    assert problems(bad) == {gt.TOO_OLD: [3], gt.UNMATCHED: [4]}


def test_what_a_version_can_be_scored_on():
    regression = FeatureSpec(
        target="y", time_column="t", task="regression", numeric=[], categorical={}, time_parts=[]
    )
    values = pd.Series(["1.5", "lots", None, "inf", 3], dtype=object)
    assert gt.scorable(values, regression).tolist() == [True, False, False, False, True]
    classes = regression.model_copy(update={"task": "binary", "classes": ["no", "yes"]})
    assert gt.scorable(pd.Series(["yes", "no", "maybe"]), classes).tolist() == [True, True, False]
    numbered = regression.model_copy(update={"task": "binary", "classes": ["0", "1"]})
    assert gt.scorable(pd.Series([1.0, 0.0, 2.0]), numbered).tolist() == [True, True, False]


def test_windows_start_with_the_data_in_utc():
    times = pd.Series(["2026-06-03 10:00", "2026-06-01 17:30", "2026-06-08 00:00", "2026-06-09"])
    starts = gt.window_of(times, pd.Timedelta("7D"))
    assert (
        starts.tolist()
        == [pd.Timestamp("2026-06-01", tz="UTC")] * 2 + [pd.Timestamp("2026-06-08", tz="UTC")] * 2
    )
    hours = gt.window_of(
        pd.Series(pd.to_datetime(["2026-06-01 05:10", "2026-06-01 07:59"], utc=True)), pd.Timedelta("2h")
    )
    assert hours.tolist() == [
        pd.Timestamp("2026-06-01 04:00", tz="UTC"),
        pd.Timestamp("2026-06-01 06:00", tz="UTC"),
    ]
    with pytest.raises(DataValidationError, match="not times"):
        gt.window_of(pd.Series(["2026-06-01", "soon"], name="day"), pd.Timedelta("7D"))


def test_a_classifiers_windows_have_its_metrics_and_say_when_too_few_labels():
    spec = FeatureSpec(
        target="y",
        time_column="t",
        task="binary",
        numeric=[],
        categorical={},
        time_parts=[],
        classes=["no", "yes"],
    )
    rng = np.random.default_rng(0)
    n = 400
    truth = rng.integers(0, 2, n)
    p_yes = np.clip(truth * 0.6 + rng.uniform(0, 0.4, n), 0, 1)
    joined = pd.DataFrame(
        {
            gt.LABEL: np.where(truth == 1, "yes", "no"),
            "prediction": np.where(p_yes > 0.5, "yes", "no"),
            "probability_no": 1 - p_yes,
            "probability_yes": p_yes,
            "t": pd.to_datetime("2026-06-01")
            + pd.to_timedelta(np.r_[np.zeros(n - 10), np.full(10, 8)], unit="D"),
        }
    )
    joined[gt.WINDOW_START] = gt.window_of(joined["t"], pd.Timedelta("7D"))
    windows = gt.window_quality(joined, "3", spec, None, pd.Timedelta("7D"), 30, SignalSettings())
    assert [w.rows for w in windows] == [n - 10, 10]
    first, second = windows
    assert first.metrics["auc"] == pytest.approx(1.0, abs=1e-3)  # the scores separate the classes
    assert first.metrics["accuracy"] == pytest.approx(((p_yes > 0.5) == truth)[: n - 10].mean())
    assert first.signal is not None and not first.judged and "not calibrated" in first.signal.basis
    assert second.signal is None and not second.judged and not math.isnan(second.metrics["accuracy"])


def test_links_out_of_the_predictions_folder_are_never_read(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "_scoring.json").write_text('{"model_name": "any"}')
    predictions(["a"]).to_parquet(elsewhere / "part-00000.parquet")
    folder = tmp_path / "predictions"
    folder.mkdir()
    (folder / "linked").symlink_to(elsewhere, target_is_directory=True)  # a linked folder: not walked
    assert gt.scoring_outputs(folder) == []
    output = folder / "scored"
    output.mkdir()
    (output / "_scoring.json").write_text("{}")
    (output / "part-00000.parquet").symlink_to(elsewhere / "part-00000.parquet")  # a linked part: refused
    with pytest.raises(DataValidationError, match="resolves outside --predictions"):
        gt.captured_predictions(folder, "any", SCORED_AT_COLUMN)
