"""Bad input beyond the corpus (tests/bad_inputs) stops the pipeline before training: one clear error naming the file, the column and
the rule, a non-zero exit code, nothing registered and the champion untouched."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from flows.pipeline import main
from tests.conftest import BIKE_CSV, ROOT, clean_env, mlflow_client

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

MODEL = "bike-bad"
FAST = ["--n-trials", "2", "--num-boost-round", "60", "--model-name", MODEL, "--min-r2", "0.2"]


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
    assert f"column 'cnt' of {path}: type: 5 of 2,000 (0.25%) not numbers ('many'), expected numbers" in err
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
