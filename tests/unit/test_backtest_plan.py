"""The backtest's timeline: batches after and inside the initial window, label delays, detection delays,
and the inputs it refuses before any work."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from tasks.monitoring.backtest import Batch, PolicyRun, detection_delays, parse_delay, plan_batches
from tasks.monitoring.calibration import parse_chunk
from tasks.steps.errors import DataValidationError

TIMES = (pd.Timestamp("2024-01-01") + pd.to_timedelta(np.arange(100 * 24), unit="h")).to_numpy()


def test_weekly_batches_follow_the_initial_window_and_weeks_inside_it_are_checked_too():
    replay, inside = plan_batches(TIMES, datetime(2024, 3, 1), parse_chunk("7D"), "t.csv", timedelta(0))
    assert replay[0].start == datetime(2024, 3, 1) and replay[0].end == datetime(2024, 3, 8)
    assert len(replay) == (100 - 60) // 7 and all(b.hi - b.lo == 168 for b in replay)
    assert len(inside) == 60 // 7 and all(b.inside_initial for b in inside) and inside[0].lo == 0


def test_batches_of_a_row_count():
    replay, _ = plan_batches(TIMES, datetime(2024, 3, 1), parse_chunk("200"), "t.csv", timedelta(0))
    assert (
        len(replay) == 40 * 24 // 200 and all(b.hi - b.lo == 200 for b in replay) and replay[0].lo == 60 * 24
    )


@pytest.mark.parametrize(
    ("initial_end", "every", "delay", "names"),
    [
        (datetime(2024, 5, 1), "7D", "0", "--initial-days"),  # the window outlasts the data
        (datetime(2024, 3, 25), "7D", "0", "--batch-every"),  # 2 batches left, 3 needed
        (datetime(2024, 3, 1), "7D", "60D", "--label-delay"),  # no label would arrive
    ],
)
def test_a_replay_that_cannot_be_done_is_refused_naming_the_parameter(initial_end, every, delay, names):
    with pytest.raises(DataValidationError, match=names):
        plan_batches(TIMES, initial_end, parse_chunk(every), "t.csv", parse_delay(delay))


@pytest.mark.parametrize(
    ("text", "delay"), [("0", timedelta(0)), ("7D", timedelta(days=7)), ("36h", timedelta(hours=36))]
)
def test_label_delays(text, delay):
    assert parse_delay(text) == delay


@pytest.mark.parametrize("text", ["soon", "-1D"])
def test_bad_label_delays(text):
    with pytest.raises(ValueError):
        parse_delay(text)


def test_detection_delay_counts_batches_from_the_first_batch_after_the_change_to_the_first_alarm():
    batches = [
        Batch(
            index=i,
            lo=0,
            hi=1,
            start=datetime(2024, 1, 1) + timedelta(days=7 * i),
            end=datetime(2024, 1, 8) + timedelta(days=7 * i),
        )
        for i in range(10)
    ]
    run = PolicyRun(policy="performance", alarms=[1, 6, 7])
    assert detection_delays(run, batches, [datetime(2024, 2, 1)]) == [2]  # batch 4 ends after the change
    assert detection_delays(run, batches, [datetime(2024, 3, 6)]) == [None]
