"""Bad input beyond the corpus (tests/bad_inputs) stops the pipeline before training: one clear error naming the file, the column and
the rule, a non-zero exit code, nothing registered and the champion untouched."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from flows.pipeline import main
from tests.conftest import BIKE_CSV, BIKE_FLAGS, ROOT, clean_env, mlflow_client

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

MODEL = "bike-bad"
FAST = ["--n-trials", "2", "--num-boost-round", "60", "--model-name", MODEL, "--min-r2", "0.2", *BIKE_FLAGS]


@pytest.fixture(scope="module")
def champion_state(tmp_path_factory, dask_cluster, prefect_harness):
    """One good execution registers v1 as champion; every bad input must leave it so."""
    state = tmp_path_factory.mktemp("bad-input") / ".keel"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KEEL_STATE_DIR", str(state))
        patch.setenv("DASK_SCHEDULER_ADDRESS", dask_cluster.address)
        assert main([*FAST, "--start", "2011-01-01", "--end", "2011-06-30"]) == 0
        yield state


@pytest.fixture
def bad_run(champion_state, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("KEEL_STATE_DIR", str(champion_state))

    def run(*args: str) -> str:
        code = main([*FAST, *args])
        err = capsys.readouterr().err
        assert code == 2, err
        client = mlflow_client()
        assert [str(v.version) for v in client.search_model_versions(f"name='{MODEL}'")] == ["1"]
        assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"
        assert "bad input, nothing trained or registered" in err
        return err

    return run


def bike(rows: int = 2000) -> pd.DataFrame:
    return pd.read_csv(BIKE_CSV).head(rows)


def test_missing_file(bad_run, tmp_path):
    missing = tmp_path / "nope.csv"
    assert f"{missing}: file does not exist" in bad_run("--data", str(missing))


def test_mistyped_target_column_is_caught_by_quality_then_by_processing(bad_run, tmp_path):
    path = tmp_path / "text_target.csv"
    frame = bike()
    frame["cnt"] = frame["cnt"].astype(str)
    frame.loc[5:9, "cnt"] = "many"
    frame.to_csv(path, index=False)
    err = bad_run("--data", str(path), "--task", "regression")
    assert f"column 'cnt' of {path}: type: 5 of 2,000 (0.25%) not numbers, expected numbers" in err
    assert "many" not in err  # values from the file stay out of errors (the violations table shows them)
    # With violations only reported, processing refuses the column all the same.
    err = bad_run("--data", str(path), "--task", "regression", "--on-quality-violation", "warn")
    assert f"column 'cnt' of {path}: 5 target values are not numbers (regression target)" in err


def test_split_that_leaves_a_set_empty(bad_run, tmp_path):
    err = bad_run("--start", "2011-03-01", "--end", "2011-03-01")  # one date: no time span to split
    assert "column 'dteday'" in err and "the time split leaves ['train', 'valid'] empty" in err


def test_exit_code_from_the_command_line(champion_state, dask_cluster, tmp_path):
    env = clean_env(KEEL_STATE_DIR=str(champion_state), DASK_SCHEDULER_ADDRESS=dask_cluster.address)
    proc = subprocess.run(
        [sys.executable, "-m", "flows.pipeline", *FAST, "--data", str(tmp_path / "missing.csv")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "missing.csv: file does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr  # Prefect logs the refusal in one line


@pytest.mark.parametrize(
    "args, words",
    [
        (["--model-name", "team/model"], "is not a model name keel accepts"),
        (["--model-name", "o'brien"], "is not a model name keel accepts"),
        (["--start", "2011-05-01", "--end", "2011-04-01"], "--start 2011-05-01 is after --end 2011-04-01"),
    ],
)
def test_bad_parameters_stop_before_any_run(args, words, champion_state, monkeypatch, capsys):
    monkeypatch.setenv("KEEL_STATE_DIR", str(champion_state))
    client = mlflow_client()
    runs_before = len(client.search_runs(["1"]))
    with pytest.raises(SystemExit) as stopped:
        main([*FAST, *args])
    assert stopped.value.code == 2 and words in capsys.readouterr().err
    assert len(client.search_runs(["1"])) == runs_before  # no MLflow run was even created


def test_times_with_a_zone_are_converted_to_utc_and_train(champion_state, monkeypatch, tmp_path):
    monkeypatch.setenv("KEEL_STATE_DIR", str(champion_state))
    frame = bike(3000)
    frame["dteday"] = (
        pd.to_datetime(frame["dteday"]) + pd.to_timedelta(frame["hr"], unit="h")
    ).dt.tz_localize("Europe/Lisbon", ambiguous="NaT", nonexistent="shift_forward")
    frame = frame[frame["dteday"].notna()]
    path = tmp_path / "zoned.parquet"
    frame.to_parquet(path, index=False)
    assert isinstance(pd.read_parquet(path)["dteday"].dtype, pd.DatetimeTZDtype)
    fast = [a if a != MODEL else "bike-zoned" for a in FAST]
    assert main([*fast, "--data", str(path), "--key-columns", "--end", "2011-04-15"]) == 0
    version = mlflow_client().get_model_version("bike-zoned", "1")
    assert version.tags["approval_status"] == "Approved"


def test_odd_column_names_train_and_are_monitored(champion_state, monkeypatch, tmp_path):
    """Names LightGBM refuses (brackets, commas) and MLflow refuses in metric names (°, parentheses)
    reach the model and the monitor's metrics under safe names; the user's names stay in the spec."""
    from flows.monitor import main as monitor_main

    monkeypatch.setenv("KEEL_STATE_DIR", str(champion_state))
    odd = {"temp": "temp (°C)", "hum": "hum[%]", "windspeed": "wind, speed: {m/s}"}
    frame = pd.read_csv(BIKE_CSV).rename(columns=odd)
    path = tmp_path / "odd.csv"
    frame[frame.dteday < "2011-05-01"].to_csv(path, index=False)
    fast = [a if a != MODEL else "bike-odd" for a in FAST]
    assert main([*fast, "--data", str(path)]) == 0
    batch = tmp_path / "week.csv"
    frame[frame.dteday.between("2011-05-02", "2011-05-08")].to_csv(batch, index=False)
    assert monitor_main(["--batch", str(batch), "--model-name", "bike-odd"]) == 0
    client = mlflow_client()
    [run] = client.search_runs(["1"], "tags.`keel.step` = 'drift-check'", max_results=1)
    scores = [k for k in run.data.metrics if k.startswith("drift_score.")]
    assert any(k.startswith("drift_score.temp __C_") for k in scores), scores
    from tasks.monitoring.baseline import load_baseline

    assert set(odd.values()) <= set(load_baseline(client, "bike-odd").profile.features.numeric)


@pytest.mark.parametrize(
    "labels, words",
    [
        (
            {"2011-04-20": "storm"},
            "1 class(es) appear in the validation or test period but never in the training",
        ),
        ({"2011-01-01": "rare"}, "1 of 3 classes never appear in the test period"),
    ],
)
def test_classes_the_splits_cannot_score_stop_at_prepare(labels, words, bad_run, tmp_path):
    """A class only in the test period, or a class the test period lacks (its AUC would be NaN and the
    gate could never pass): refused by prepare, before tuning, with counts, not the labels."""
    frame = pd.read_csv(BIKE_CSV)
    frame = frame[frame.dteday < "2011-05-01"].copy()
    frame["level"] = (frame["cnt"] > frame["cnt"].median()).map({True: "high", False: "low"})
    for day, label in labels.items():
        frame.loc[frame.dteday == day, "level"] = label
    path = tmp_path / "levels.csv"
    frame.drop(columns=["cnt"]).to_csv(path, index=False)
    err = bad_run("--data", str(path), "--target", "level", "--on-quality-violation", "warn")
    assert words in err and "column 'level'" in err, err
    assert "storm" not in err and "rare" not in err
