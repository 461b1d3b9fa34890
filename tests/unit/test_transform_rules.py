"""The rules of batch scoring that need no cluster: inference ids, whole-or-nothing output, and
failures reported without quoting the data."""

from __future__ import annotations

import pandas as pd
import pytest

from tasks.steps.errors import DataValidationError
from tasks.steps.transform import plain_strings, row_ids, unreadable, written_whole


def test_ids_are_stable_across_file_types_and_column_order():
    frame = pd.DataFrame({"day": ["2011-01-01", "2011-01-01"], "hr": [0, 1], "temp": [0.2, 0.3]})
    from_parquet = frame.astype({"day": "string", "hr": "float64"})[["temp", "hr", "day"]]
    ids = row_ids(frame, ["day", "hr", "temp"])
    assert ids.tolist() == row_ids(from_parquet, ["temp", "hr", "day"]).tolist()
    assert ids.is_unique and ids.str.fullmatch(r"[0-9a-f]{16}").all()
    # a value moved to another column is another row
    swapped = pd.DataFrame({"a": [1.0], "b": [2.0]})
    assert (
        row_ids(swapped, ["a", "b"]).iloc[0]
        != row_ids(swapped.rename(columns={"a": "b", "b": "a"}), ["a", "b"]).iloc[0]
    )


def test_one_id_column_is_the_id_and_must_be_complete():
    frame = pd.DataFrame({"order": [17, 18]})
    assert row_ids(frame, ["order"]).tolist() == ["17", "18"]
    with pytest.raises(DataValidationError, match="missing values"):
        row_ids(pd.DataFrame({"order": ["a", None]}), ["order"])


def test_text_columns_reach_the_model_as_python_objects():
    frame = pd.DataFrame({"day": pd.array(["2011-01-01"], dtype="string"), "x": [1]})
    assert plain_strings(frame)["day"].dtype == object and plain_strings(frame)["x"].dtype == "int64"


def test_the_output_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "scored"
    with pytest.raises(RuntimeError), written_whole(out, overwrite=False) as staging:
        (staging / "part-00000.parquet").write_text("half")
        raise RuntimeError("a worker died")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with written_whole(out, overwrite=False) as staging:
        (staging / "part-00000.parquet").write_text("first")
    with pytest.raises(DataValidationError, match="exists already"), written_whole(out, overwrite=False):
        pass
    with written_whole(out, overwrite=True) as staging:
        (staging / "part-00000.parquet").write_text("second")
    assert (out / "part-00000.parquet").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["scored"]


def test_a_partitions_failure_names_the_column_never_a_value():
    enforced = ValueError(
        "Failed to enforce schema of data '  secret 42' with schema 'x'. "
        "Error: Incompatible input types for column dteday. Can not safely convert"
    )
    error = unreadable(enforced, 3, "in.csv")
    assert isinstance(error, DataValidationError) and error.column == "dteday"
    assert "partition 3" in str(error) and "secret" not in str(error)
    converted = unreadable(ValueError("Failed to convert column temp from type object to double."), 0, "x")
    assert converted.column == "temp"
    other = OSError("disk full")
    assert unreadable(other, 0, "in.csv") is other  # not the data's fault: as it is
