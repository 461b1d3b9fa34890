"""The drift monitor on batches built from the real data, against a champion trained here: verdicts,
reports that open, lineage to the model version, and bad batches that stop before any event."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest

from flows.monitor import MonitorParams, main, monitor
from flows.pipeline import PipelineParams, training_pipeline
from tasks.baseline import load_baseline
from tests.conftest import BIKE_CSV, mlflow_client

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

MODEL = "bike-monitor"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dask_cluster, prefect_harness):
    """A champion trained on January-April 2011, in its own state directory."""
    state = tmp_path_factory.mktemp("monitor") / ".keel"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KEEL_STATE_DIR", str(state))
        patch.setenv("DASK_SCHEDULER_ADDRESS", dask_cluster.address)
        result = training_pipeline(
            PipelineParams(
                data=str(BIKE_CSV),
                end="2011-04-30",
                n_trials=2,
                num_boost_round=80,
                model_name=MODEL,
                min_r2=0.3,
            )
        )
        assert result.registered and result.registered.champion
        yield state, result


@pytest.fixture
def env(trained, dask_cluster, monkeypatch):
    monkeypatch.setenv("KEEL_STATE_DIR", str(trained[0]))
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", dask_cluster.address)
    return trained[1]


def bike() -> pd.DataFrame:
    return pd.read_csv(BIKE_CSV)


def local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://"))


def test_baseline_is_found_through_the_registry(env):
    champion = load_baseline(mlflow_client(), MODEL, with_reference=True)
    version = mlflow_client().get_model_version(MODEL, champion.version)
    assert champion.profile.train.uri == version.tags["dataset.train.uri"]
    assert champion.profile.train.digest == version.tags["dataset.train.digest"]
    assert {"temp", "hr", "cnt", "prediction"} <= set(champion.profile.columns)
    assert champion.profile.columns["temp"].count == champion.profile.train.rows
    assert len(champion.reference) == champion.profile.sample_rows > 1000


def test_a_batch_from_the_training_period_does_not_drift(env, tmp_path):
    data = bike()
    batch = data[data.dteday < "2011-03-15"].sample(n=1500, random_state=1).drop(columns=["cnt"])
    path = tmp_path / "from-training-period.csv"
    batch.to_csv(path, index=False)

    result = monitor(MonitorParams(batch=str(path), model_name=MODEL))

    check = result.check
    assert not check.drift_detected, check.reasons
    assert result.event == "keel.drift.not-detected" and result.event_id
    assert check.rows == 1500 and check.target is None and not check.quality
    assert check.drifted_share < 0.5 and not check.prediction.drifted
    assert result.report.evidently_agrees
    html = local_path(result.report.html_uri).read_text()
    assert html.lstrip().startswith("<!DOCTYPE html>") and "Drifted Columns" in html and len(html) > 100_000
    metrics = json.loads(local_path(result.report.json_uri).read_text())["metrics"]
    assert any("DriftedColumnsCount" in m["metric_name"] for m in metrics)


def test_a_shifted_batch_drifts_and_is_linked_to_the_model_version(env, tmp_path):
    data = bike()
    path = tmp_path / "june-2012.parquet"
    data[(data.dteday >= "2012-06-04") & (data.dteday < "2012-06-18")].to_parquet(path, index=False)

    result = monitor(MonitorParams(batch=str(path), model_name=MODEL, must_not_drift=["temp"]))

    check = result.check
    assert check.drift_detected and result.event == "keel.drift.detected"
    assert {"temp", "atemp", "yr"} <= set(check.drifted_columns)
    assert check.prediction.drifted and check.target is not None and check.target.drifted
    assert any(r.startswith("temp drifted") for r in check.reasons)
    assert set(check.quality) == {"rmse", "mae", "r2"} and check.champion_quality
    assert result.report.evidently_agrees
    version = mlflow_client().get_model_version(MODEL, check.version)
    assert version.tags["drift.last_verdict"] == "drift"
    assert version.tags["drift.last_report"] == result.report.html_uri
    run = mlflow_client().get_run(result.mlflow_run_id)
    assert run.data.tags["keel.event"] == "keel.drift.detected"
    assert run.data.tags["keel.event_id"] == result.event_id
    columns = local_path(result.report.html_uri).parent / "columns.md"
    assert "| temp | feature | wasserstein |" in columns.read_text()
    deadline = time.monotonic() + 20
    while not (found := [e for e in _events_about(MODEL) if e["id"] == result.event_id]):
        assert time.monotonic() < deadline, "the drift event never reached the Prefect server"
        time.sleep(0.5)
    event = found[0]
    assert event["event"] == "keel.drift.detected"
    assert event["resource"]["prefect.resource.id"] == f"keel.model.{MODEL}.v{check.version}"
    assert event["payload"]["drifted_columns"] == check.drifted_columns
    assert event["payload"]["report_uri"] == result.report.html_uri
    assert event["payload"]["batch_digest"] == check.batch.digest


def test_latest_picks_the_last_file_of_a_folder(env, tmp_path):
    data = bike()
    landing = tmp_path / "landing"
    landing.mkdir()
    data[data.dteday < "2011-03-01"].sample(800, random_state=2).to_parquet(landing / "2011-02.parquet")
    data[(data.dteday >= "2012-07-01") & (data.dteday < "2012-07-08")].to_parquet(landing / "2012-07.parquet")
    result = monitor(MonitorParams(batch=str(landing), latest=True, model_name=MODEL))
    assert result.check.batch.uri.endswith("2012-07.parquet") and result.check.drift_detected


def bad_batches(tmp_path: Path) -> dict[str, tuple[Path, str, str]]:
    """name -> (file, column named in the error, rule in the error)."""
    week = bike().iloc[:168]
    cases = {}
    path = tmp_path / "missing-column.csv"
    week.drop(columns=["temp"]).to_csv(path, index=False)
    cases["missing column"] = (path, "temp", "required columns are missing")
    path = tmp_path / "wrong-type.csv"
    week.assign(hum=["humid"] * 10 + list(week.hum[10:])).to_csv(path, index=False)
    cases["wrong type"] = (path, "hum", "10 of 168 values are not numbers")
    path = tmp_path / "header-only.csv"
    week.head(0).to_csv(path, index=False)
    cases["header only"] = (path, "", "the batch has no rows")
    path = tmp_path / "empty.csv"
    path.write_text("")
    cases["empty file"] = (path, "", "file is empty")
    path = tmp_path / "all-null.parquet"
    week.assign(windspeed=float("nan")).to_parquet(path, index=False)
    cases["all null"] = (path, "windspeed", "every value is missing")
    path = tmp_path / "bad-times.csv"
    week.assign(dteday="someday").to_csv(path, index=False)
    cases["bad times"] = (path, "dteday", "not dates/times")
    return cases


def test_bad_batches_fail_with_file_column_and_rule_and_emit_nothing(env, tmp_path, capsys):
    client = mlflow_client()
    cases = bad_batches(tmp_path)
    for name, (path, column, rule) in cases.items():
        code = main(["--batch", str(path), "--model-name", MODEL])
        err = capsys.readouterr().err
        assert code == 2, (name, err)
        assert "bad input, nothing checked, no event emitted" in err, name
        assert str(path) in err and rule in err, (name, err)
        if column:
            assert f"column {column!r}" in err, (name, err)
    runs = client.search_runs(
        [client.get_experiment_by_name("keel").experiment_id],
        "tags.`keel.pipeline` = 'drift-monitor' and attributes.status = 'FAILED'",
    )
    assert len(runs) >= len(cases) and not any("keel.event" in r.data.tags for r in runs)
    time.sleep(3)  # events travel asynchronously: give a wrongly emitted one time to arrive
    checked = {e["payload"]["batch_uri"] for e in _events_about(MODEL)}
    assert checked and not checked & {str(path) for path, _, _ in cases.values()}


def _events_about(model: str) -> list[dict]:
    """Drift verdict events about `model` in the test's Prefect server."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    body = {"filter": {"event": {"prefix": ["keel.drift."]}}, "limit": 50}
    with httpx.Client(base_url=PREFECT_API_URL.value(), timeout=10) as http:
        events = http.post("/events/filter", json=body).json()["events"]
    return [e for e in events if e["resource"].get("keel.model.name") == model]


def test_data_quality_violations_are_reported_and_fail_the_run_only_on_request(env, tmp_path, capsys):
    data = bike()
    batch = data[data.dteday < "2011-03-15"].sample(n=500, random_state=2)
    batch = batch.assign(temp=batch["temp"] * 40)  # Celsius where the model saw a 0..1 scale
    path = tmp_path / "celsius.csv"
    batch.to_csv(path, index=False)

    result = monitor(MonitorParams(batch=str(path), model_name=MODEL))  # default: warn
    assert [(v.column, v.rule) for v in result.quality.violations] == [("temp", "range")]
    assert result.quality.checked_against and result.quality.checked_against.version == "1"
    assert result.event_id  # the drift check went on

    code = main(["--batch", str(path), "--model-name", MODEL, "--on-quality-violation", "fail"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"column 'temp' of {path}: range:" in err and "nothing checked, no event emitted" in err
