"""The input is pinned once (`tasks.tabular.snapshot`): what a run checks, digests and trains on is one copy,
whatever happens to the user's file meanwhile."""

from __future__ import annotations

import pandas as pd
import pytest

from tasks.steps.access import DataAccess
from tasks.steps.errors import DataValidationError
from tasks.steps.refs import content_digest
from tasks.tabular.data import TableSpec, check_table, read_table
from tasks.tabular.snapshot import reported_as


def write(path, rows: int) -> None:
    frame = pd.DataFrame({"t": pd.date_range("2024-01-01", periods=rows, freq="h"), "x": range(rows)})
    frame.assign(y=frame.x * 2).to_csv(path, index=False)


def test_a_file_appended_to_after_the_check_changes_nothing_the_run_reads(tmp_path):
    source = tmp_path / "in.csv"
    write(source, 50)
    datasets = str(tmp_path / "datasets")
    ref = check_table(TableSpec(path=str(source), target="y", time_column="t"), DataAccess(), datasets)
    digest = content_digest(str(source))
    with source.open("a") as handle:  # another process appends while the run goes on
        handle.write("2030-01-01 00:00:00,999,1998\n")
    assert ref.location == str(source) and ref.uri != str(source)
    assert ref.digest == digest == content_digest(ref.uri)  # the recorded digest is of what is read
    assert len(read_table(ref).compute(scheduler="sync")) == 50
    # the same content is pinned once; changed content gets its own copy
    again = check_table(TableSpec(path=str(source), target="y", time_column="t"), DataAccess(), datasets)
    assert again.digest != ref.digest and content_digest(again.uri) == again.digest
    write(source, 50)
    assert (
        check_table(TableSpec(path=str(source), target="y", time_column="t"), DataAccess(), datasets).uri
        == ref.uri
    )


def test_a_folder_is_pinned_with_its_file_names_and_errors_name_the_users_file(tmp_path):
    folder = tmp_path / "landing"
    folder.mkdir()
    for day in range(3):
        pd.DataFrame(
            {"t": pd.date_range(f"2024-01-0{day + 1}", periods=24, freq="h"), "x": 1.0, "y": 2.0}
        ).to_parquet(folder / f"day-{day}.parquet", index=False)
    ref = check_table(
        TableSpec(path=str(folder), target="y", time_column="t"), DataAccess(), str(tmp_path / "d")
    )
    assert ref.format == "parquet" and ref.digest == content_digest(str(folder)) == content_digest(ref.uri)
    assert sorted(p.name for p in (tmp_path / "d").rglob("*.parquet")) == [
        f"day-{d}.parquet" for d in range(3)
    ]
    with pytest.raises(DataValidationError) as caught, reported_as(ref):
        raise DataValidationError(f"{ref.uri}/day-1.parquet", "a rule", "x")
    assert caught.value.file == f"{folder}/day-1.parquet" and caught.value.column == "x"
    # a refusal by the header check names the user's file, not the copy
    (folder / "day-3.csv").write_text("t,x\n")
    with pytest.raises(DataValidationError) as caught:
        check_table(
            TableSpec(path=str(folder), target="y", time_column="t"), DataAccess(), str(tmp_path / "d")
        )
    assert str(folder) in caught.value.file and str(tmp_path / "d") not in str(caught.value)


def test_the_same_bytes_under_another_name_are_pinned_under_that_name(tmp_path):
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    write(first, 30)
    second.write_bytes(first.read_bytes())
    datasets = str(tmp_path / "datasets")
    refs = [
        check_table(TableSpec(path=str(f), target="y", time_column="t"), DataAccess(), datasets)
        for f in (first, second)
    ]
    assert refs[0].digest == refs[1].digest and refs[0].uri != refs[1].uri
    assert all(len(read_table(r).compute(scheduler="sync")) == 30 for r in refs)
