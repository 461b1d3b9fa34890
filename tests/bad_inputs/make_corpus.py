"""Writes the bad-input corpus from the bike data: `good.csv` and one file per kind of bad input.

    .venv/bin/python -m tests.bad_inputs.make_corpus

Every bad file is a copy of rows of `good.csv` with one defect, so it breaks exactly one rule.
`cases.json` says, for each, which column and which rule the error must name.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
BIKE = HERE.parent.parent / "data" / "bike_sharing_hourly.csv"
WEATHER = {1: "clear", 2: "mist", 3: "light rain", 4: "heavy rain"}

# file -> (column the error names or None for the whole file, words of the rule)
CASES: dict[str, tuple[str | None, str]] = {
    "missing_column.csv": ("temp", "present"),
    "wrong_dtype.csv": ("hum", "type"),
    "all_null_column.csv": ("windspeed", "not all missing"),
    "empty.csv": (None, "file is empty"),
    "header_only.csv": (None, "not empty"),
    "truncated.csv": ("holiday", "truncated CSV"),
    "corrupt.parquet": (None, "cannot be read as parquet"),
    "duplicated_timestamps.csv": ("dteday,hr", "unique key"),
    "negative_target.csv": ("cnt", "non-negative"),
    "unseen_category.csv": ("weather", "categories"),
    "nan_inf_features.csv": ("temp", "finite"),
    "bad_dates.csv": ("dteday", "time"),
    "duplicated_header.csv": ("temp", "names this column more than once"),
    "nested_column.parquet": ("readings", "nested values"),
    "constant_target.csv": ("cnt", "the target has one value"),
    "long_category.csv": ("weather", "characters long, over the limit of 1,000 (--max-category-length)"),
    "too_many_columns.csv": (None, "2,011 columns, over the limit of 2,000 (--max-columns)"),
    "class_only_in_test.csv": ("level", "1 class(es) appear in the validation or test period but never"),
    "class_absent_from_test.csv": ("level", "1 of 3 classes never appear in the test period"),
    "id_column.csv": ("booking_id", "more than 1000 distinct values (booking_id): it looks like an id"),
    # not a file of its own: a path that climbs out of the allowed data roots (the corpus folder)
    "../../data/bike_sharing_hourly.csv": (None, "outside the allowed data roots"),
}
# file -> the step that refuses it, where that is not one of the checks before `prepare`
STEPS = {
    "constant_target.csv": "prepare",
    "class_only_in_test.csv": "prepare",
    "class_absent_from_test.csv": "prepare",
    "id_column.csv": "prepare",
}
# file -> flags it is run with besides the corpus's own (a classification target for the class cases;
# the champion's constraints are for another target, so its violations are only reported)
LEVEL = ["--target", "level", "--on-quality-violation", "warn"]
ARGS = {"class_only_in_test.csv": LEVEL, "class_absent_from_test.csv": LEVEL}


def good() -> pd.DataFrame:
    """The first 150 days of the bike data, with a text column (weather) for category rules."""
    frame = pd.read_csv(BIKE)
    frame = frame[frame["dteday"] < "2011-05-31"].copy()
    frame.insert(frame.columns.get_loc("weathersit") + 1, "weather", frame["weathersit"].map(WEATHER))
    return frame.drop(columns=["weathersit"]).reset_index(drop=True)


def main() -> None:
    base = good()
    base.to_csv(HERE / "good.csv", index=False)
    rows = base.iloc[-600:].reset_index(drop=True)  # the last 25 days: inside every training range
    write = lambda name, frame: frame.to_csv(HERE / name, index=False)  # noqa: E731

    write("missing_column.csv", rows.drop(columns=["temp"]))
    typed = rows.astype({"hum": object})
    typed.loc[[10, 200, 300], "hum"] = "high"
    write("wrong_dtype.csv", typed)
    write("all_null_column.csv", rows.assign(windspeed=np.nan))
    (HERE / "empty.csv").write_bytes(b"")
    write("header_only.csv", rows.head(0))
    text = rows.to_csv(index=False)
    (HERE / "truncated.csv").write_text(text[: text.rindex("\n", 0, len(text) - 1) + 25])
    rows.to_parquet(HERE / "corrupt.parquet", index=False)
    data = (HERE / "corrupt.parquet").read_bytes()
    (HERE / "corrupt.parquet").write_bytes(data[: len(data) // 2])  # cut: no footer
    write("duplicated_timestamps.csv", pd.concat([rows, rows.iloc[100:124]], ignore_index=True))
    write("negative_target.csv", rows.assign(cnt=rows["cnt"].where(rows.index % 50 != 7, -rows["cnt"])))
    unseen = rows.copy()
    unseen.loc[[5, 6, 7], "weather"] = "tornado"
    write("unseen_category.csv", unseen)
    broken = rows.copy()
    broken.loc[[3, 4], "temp"] = np.inf
    broken.loc[40:80, "temp"] = np.nan
    write("nan_inf_features.csv", broken)
    dates = rows.copy()
    dates.loc[17, "dteday"] = "yesterday"
    write("bad_dates.csv", dates)
    write("duplicated_header.csv", pd.concat([rows, rows[["temp"]]], axis=1))  # pandas would read temp.1
    rows.assign(readings=[[float(t), float(h)] for t, h in zip(rows.temp, rows.hum, strict=True)]).to_parquet(
        HERE / "nested_column.parquet", index=False
    )
    write("constant_target.csv", rows.assign(cnt=100))
    wordy = rows.copy()
    wordy.loc[[9], "weather"] = "clear " * 300  # 1,800 characters: a text, not a category
    write("long_category.csv", wordy)
    wide = rows.head(48)
    extra = pd.DataFrame(0, index=wide.index, columns=[f"sensor_{i}" for i in range(2_011 - wide.shape[1])])
    write("too_many_columns.csv", pd.concat([wide, extra], axis=1))
    levels = rows.assign(level=(rows["cnt"] > rows["cnt"].median()).map({True: "high", False: "low"}))
    levels = levels.drop(columns=["cnt"])
    storm = levels.copy()
    storm.loc[storm.index[-24:], "level"] = "storm"  # the last day only: in the test period alone
    write("class_only_in_test.csv", storm)
    rare = levels.copy()
    rare.loc[rare.index[:24], "level"] = "rare"  # the first day only: never in the test period
    write("class_absent_from_test.csv", rare)
    ids = base.assign(booking_id=[f"B-{i:06d}" for i in range(len(base))])  # a text id on every row
    write("id_column.csv", ids)
    (HERE / "cases.json").write_text(
        json.dumps(
            {
                k: {
                    "column": c,
                    "rule": r,
                    **({"step": STEPS[k]} if k in STEPS else {}),
                    **({"args": ARGS[k]} if k in ARGS else {}),
                }
                for k, (c, r) in CASES.items()
            },
            indent=1,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
