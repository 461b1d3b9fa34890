"""The processing step learns a text column's categories and a target's classes on the run's Dask
cluster without a shuffle: on the in-process cluster a small run has, Dask's default shuffle of
`unique()` wrote WARNING lines of its scheduler into the run's log for each such column."""

from __future__ import annotations

import logging

import dask.dataframe as dd
import pandas as pd
from distributed import Client, LocalCluster

from tasks.tabular.data import TableSpec
from tasks.tabular.prepare import _learn_features

SHUFFLE_LOG = "distributed.shuffle"


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_categories_and_classes_are_learned_without_a_shuffle():
    rows = 3000
    frame = pd.DataFrame(
        {
            "ts": pd.date_range("2025-01-01", periods=rows, freq="h"),
            "store": ["north", "south", "east"] * (rows // 3),
            "promo": [True, False, False] * (rows // 3),
            "units": range(rows),
            "busy": ["yes", "no"] * (rows // 2),
        }
    )
    table = TableSpec(path="sales.csv", target="busy", time_column="ts")
    kept = Kept()
    shuffle_log = logging.getLogger(SHUFFLE_LOG)
    shuffle_log.addHandler(kept)
    shuffle_log.setLevel(logging.INFO)
    try:
        with (
            LocalCluster(
                n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
            ) as cluster,
            Client(cluster),
        ):
            train = dd.from_pandas(frame, npartitions=3)
            spec, _ = _learn_features(train, table, "binary", train.columns, table.path, also=[])
    finally:
        shuffle_log.removeHandler(kept)
    assert spec.categorical == {"store": ["east", "north", "south"], "promo": ["False", "True"]}
    assert spec.classes == ["no", "yes"]
    assert spec.numeric == ["units"]
    assert kept.messages == []  # no "Shuffle ... initialized by task" from the scheduler


def test_an_id_like_text_column_is_refused_without_gathering_it_whole():
    """Each partition hands on at most MAX_CATEGORIES + 1 distinct values, so a text column of ids is
    refused (naming it and the flag that drops it) with a bounded amount gathered, not every row."""
    import pytest

    from tasks.steps.errors import DataValidationError
    from tasks.tabular.prepare import MAX_CATEGORIES, _first_distinct

    rows = 12_000
    frame = pd.DataFrame(
        {
            "ts": pd.date_range("2025-01-01", periods=rows, freq="h"),
            "order_id": [f"order-{i}" for i in range(rows)],
            "units": range(rows),
        }
    )
    part = _first_distinct(frame["order_id"])
    assert len(part) == MAX_CATEGORIES + 1 and part.name == "order_id"
    assert list(_first_distinct(pd.Series(["a", None, "b", "a"], name="x"))) == ["a", "b"]
    table = TableSpec(path="orders.csv", target="units", time_column="ts")
    with (
        LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster,
        Client(cluster),
    ):
        train = dd.from_pandas(frame, npartitions=4)
        gathered = train["order_id"].map_partitions(_first_distinct, meta=("order_id", "object")).compute()
        assert len(gathered) == 4 * (MAX_CATEGORIES + 1)  # not 12,000
        with pytest.raises(
            DataValidationError, match=r"more than 1000 distinct values \(order_id\).*--drop-columns"
        ):
            _learn_features(train, table, "regression", train.columns, table.path, also=[])
