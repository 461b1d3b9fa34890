"""Our drift tests from a stored profile give Evidently's own verdicts (Evidently runs here too)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from tasks.monitoring import drift_stats
from tasks.monitoring.drift_report import build_report
from tests.conftest import BIKE_CSV

BIKE_NUMERIC = [
    "season", "yr", "mnth", "hr", "holiday", "weekday", "workingday", "weathersit",
    "temp", "atemp", "hum", "windspeed", "cnt",
]  # fmt: skip


def ours(
    reference: pd.DataFrame, current: pd.DataFrame, numeric: list[str], categorical: list[str], parts: int = 3
):
    profiles = {c: drift_stats.profile_column(reference[c], c, "numeric") for c in numeric}
    profiles |= {c: drift_stats.profile_column(reference[c], c, "categorical") for c in categorical}
    summaries = drift_stats.merge_frames(
        [drift_stats.summarise_frame(part, profiles) for part in np.array_split(current, parts)]
    )
    return {c: drift_stats.column_drift(profiles[c], summaries[c]) for c in profiles}


def evidently(reference, current, numeric, categorical):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_report(reference, current, numeric, categorical).verdicts


@pytest.fixture(scope="module")
def bike() -> pd.DataFrame:
    return pd.read_csv(BIKE_CSV)


@pytest.mark.parametrize(
    "week", ["2011-02-07", "2011-04-11", "2011-07-04", "2012-01-02", "2012-06-04", "2012-11-05"]
)
def test_real_data_weeks_match_evidently(bike, week):
    reference = bike[bike.dteday < "2011-04-01"]
    start = pd.Timestamp(week)
    current = bike[(bike.dteday >= week) & (bike.dteday < str((start + pd.Timedelta(days=7)).date()))]
    mine, theirs = ours(reference, current, BIKE_NUMERIC, []), evidently(reference, current, BIKE_NUMERIC, [])
    for column in BIKE_NUMERIC:
        assert mine[column].method == theirs[column].method, column
        assert mine[column].drifted == theirs[column].drifted, column
        # Discrete columns are exact; `cnt` (hundreds of values) goes through the quantile grid.
        tolerance = 1e-9 if column != "cnt" else 0.005 * max(1.0, theirs[column].score)
        assert mine[column].score == pytest.approx(theirs[column].score, abs=tolerance), column


def test_continuous_and_categorical_columns_match_evidently():
    rng = np.random.default_rng(7)
    n = 20_000
    reference = pd.DataFrame({f"x{i}": rng.normal(0, 1 + i, n) for i in range(6)})
    reference["c"] = rng.choice(list("abcd"), n)
    shifts = [0.0, 0.02, 0.07, 0.14, 0.3, 1.0]  # either side of the 0.1 threshold, in units of the std
    current = pd.DataFrame({f"x{i}": rng.normal(s * (1 + i), 1 + i, n) for i, s in enumerate(shifts)})
    current["c"] = rng.choice(list("abcde"), n, p=[0.3, 0.3, 0.2, 0.1, 0.1])  # one unseen category
    numeric = [f"x{i}" for i in range(6)]
    mine, theirs = ours(reference, current, numeric, ["c"]), evidently(reference, current, numeric, ["c"])
    for column in [*numeric, "c"]:
        assert (mine[column].method, mine[column].drifted) == (
            theirs[column].method,
            theirs[column].drifted,
        ), column
        assert mine[column].score == pytest.approx(theirs[column].score, rel=0.01, abs=1e-3), column
    assert [mine[c].drifted for c in numeric] == [False, False, False, True, True, True]
    assert mine["c"].drifted


def test_partition_summaries_add_up_to_the_whole(bike):
    reference, current = bike[bike.dteday < "2011-06-01"], bike[bike.dteday >= "2012-01-01"]
    whole, split = (
        ours(reference, current, BIKE_NUMERIC, [], parts=1),
        ours(reference, current, BIKE_NUMERIC, [], parts=7),
    )
    for column in BIKE_NUMERIC:
        assert split[column].score == pytest.approx(whole[column].score, rel=1e-12, abs=1e-12)


def test_missing_and_infinite_values_are_left_out_as_evidently_does():
    rng = np.random.default_rng(3)
    reference = pd.DataFrame({"x": rng.normal(0, 1, 5000)})
    current = pd.DataFrame(
        {"x": np.concatenate([rng.normal(0.2, 1, 3000), [np.nan] * 50, [np.inf, -np.inf]])}
    )
    mine, theirs = ours(reference, current, ["x"], []), evidently(reference, current, ["x"], [])
    assert mine["x"].current_rows == 3000 and mine["x"].current_missing == 52
    assert mine["x"].score == pytest.approx(theirs["x"].score, rel=0.01)


def test_a_column_with_no_values_is_an_error_not_a_verdict():
    reference = pd.DataFrame({"x": np.arange(2000.0)})
    profile = drift_stats.profile_column(reference["x"], "x", "numeric")
    summary = drift_stats.summarise_column(pd.Series([np.nan] * 10), profile)
    with pytest.raises(ValueError, match="no values"):
        drift_stats.column_drift(profile, summary)


def test_small_references_are_refused():
    profile = drift_stats.profile_column(pd.Series(np.arange(500.0)), "x", "numeric")
    summary = drift_stats.summarise_column(pd.Series(np.arange(100.0)), profile)
    with pytest.raises(ValueError, match="1000 or fewer"):
        drift_stats.column_drift(profile, summary)
