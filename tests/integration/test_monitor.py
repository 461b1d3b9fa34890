"""The drift monitor on batches built from the real data, against a champion trained here: calibrated
verdicts and policies, reports that open, lineage to the model version, and bad batches that stop
before any event."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest

from flows.monitor import MonitorParams, main, monitor
from flows.pipeline import PipelineParams, training_pipeline
from tasks.monitoring.baseline import load_baseline
from tasks.monitoring.calibration import DRIFT_SD, Calibration
from tasks.monitoring.policies import (
    DATA_DRIFT,
    EVIDENTLY_SHARE,
    MUST_NOT_DRIFT,
    PERFORMANCE,
    PREDICTION_DRIFT,
)
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
    prepare = mlflow_client().search_runs(
        [mlflow_client().get_run(version.run_id).info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{version.run_id}' and tags.`keel.step` = 'prepare'",
    )[0]
    assert champion.profile.train.uri == prepare.data.tags["keel.output.output.train.uri"]
    assert champion.profile.train.digest == prepare.data.tags["keel.output.output.train.digest"]
    assert {"temp", "hr", "cnt", "prediction"} <= set(champion.profile.columns)
    assert champion.profile.columns["temp"].count == champion.profile.train.rows
    assert len(champion.reference) == champion.profile.sample_rows > 1000


def test_calibration_is_stored_with_the_version_and_survives_the_round_trip(env):
    """Thresholds, importance and the estimator are stored with the baseline at training time and
    come back whole from the registry: the monitor never re-reads the training data."""
    champion = load_baseline(mlflow_client(), MODEL)
    calibration = champion.profile.calibration
    assert calibration is not None and calibration.chunk == "7D"
    assert set(calibration.drift) == set(champion.profile.columns)  # features, target, prediction
    assert calibration.drift_chunks > 50 and all(
        n is not None and n.chunks == calibration.drift_chunks for n in calibration.drift.values()
    )
    temp = calibration.drift["temp"]
    assert temp.threshold(DRIFT_SD) == pytest.approx(temp.mean + DRIFT_SD * temp.sd)
    assert temp.mean == pytest.approx(sum(temp.scores) / len(temp.scores))
    assert set(calibration.realized) == {"rmse", "mae", "r2"} and set(calibration.estimated) == {
        "rmse",
        "mae",
    }
    assert calibration.performance_chunks == 200 and "block bootstrap" in calibration.performance_method
    assert sum(calibration.importance.values()) == pytest.approx(1.0)
    assert set(calibration.importance) == set(champion.profile.features.input_columns)
    assert max(calibration.importance, key=calibration.importance.get) == "hr"
    assert champion.profile.estimator is not None and champion.profile.estimator.loss is not None
    assert Calibration.model_validate_json(calibration.model_dump_json()) == calibration


def test_a_week_inside_the_training_window_retrains_only_under_the_old_rule(env, tmp_path):
    """The issue's case: 7-13 March 2011, inside the champion's window. Evidently's fixed rule calls it
    drift (half the columns of one week differ from months of reference); the calibrated verdicts
    do not, with labels or without."""
    data = bike()
    week = data[(data.dteday >= "2011-03-07") & (data.dteday <= "2011-03-13")]
    labelled, unlabelled = tmp_path / "march.csv", tmp_path / "march-no-labels.csv"
    week.to_csv(labelled, index=False)
    week.drop(columns=["cnt"]).to_csv(unlabelled, index=False)
    old = monitor(MonitorParams(batch=str(labelled), model_name=MODEL, policy="drift")).check
    assert old.retrain and old.verdict.signals[EVIDENTLY_SHARE].fired
    for path in (labelled, unlabelled):
        for policy in ("calibrated-drift", "performance", "drift-and-performance"):
            result = monitor(MonitorParams(batch=str(path), model_name=MODEL, policy=policy))
            check = result.check
            assert not check.retrain, (path.name, policy, check.decision.reasons)
            assert result.event == "keel.drift.not-detected" and check.drifted_columns == []
            source = "realized" if path == labelled else "estimated"
            assert source in check.verdict.signals[PERFORMANCE].basis
    assert check.verdict.estimated and not check.verdict.realized  # the last one: no labels


def test_a_batch_from_the_training_period_does_not_drift(env, tmp_path):
    data = bike()
    batch = data[data.dteday < "2011-03-15"].sample(n=1500, random_state=1).drop(columns=["cnt"])
    path = tmp_path / "from-training-period.csv"
    batch.to_csv(path, index=False)

    result = monitor(MonitorParams(batch=str(path), model_name=MODEL))

    check = result.check
    assert not check.retrain, check.decision.reasons
    assert check.decision.policy == "performance"  # the default
    assert result.event == "keel.drift.not-detected" and result.event_id
    assert check.rows == 1500 and check.verdict.column("cnt") is None and not check.verdict.realized
    assert result.report.evidently_agrees
    html = local_path(result.report.html_uri).read_text()
    assert html.lstrip().startswith("<!DOCTYPE html>") and "Drifted Columns" in html and len(html) > 100_000
    metrics = json.loads(local_path(result.report.json_uri).read_text())["metrics"]
    assert any("DriftedColumnsCount" in m["metric_name"] for m in metrics)


def test_a_shifted_batch_drifts_and_is_linked_to_the_model_version(env, tmp_path):
    data = bike()
    path = tmp_path / "june-2012.parquet"
    data[(data.dteday >= "2012-06-04") & (data.dteday < "2012-06-18")].to_parquet(path, index=False)

    result = monitor(
        MonitorParams(batch=str(path), model_name=MODEL, must_not_drift=["temp"], policy="calibrated-drift")
    )

    check = result.check
    verdict = check.verdict
    assert check.retrain and result.event == "keel.drift.detected"
    assert {"temp", "atemp", "yr"} <= set(check.drifted_columns)
    temp = verdict.column("temp")
    assert temp is not None and temp.drift and temp.model_input and temp.importance > 0.05
    assert temp.threshold == pytest.approx(
        load_baseline(mlflow_client(), MODEL).profile.calibration.drift["temp"].threshold(DRIFT_SD)
    )
    assert verdict.signals[MUST_NOT_DRIFT].fired and verdict.weighted_share == pytest.approx(
        sum(c.importance for c in verdict.features() if c.drift)
    )
    assert any(r.startswith("must-not-drift") for r in check.decision.reasons)
    assert verdict.column("cnt") is not None and verdict.column("cnt").role == "target"
    assert set(verdict.realized) == {"rmse", "mae", "r2"} and check.champion_quality
    assert verdict.signals[PERFORMANCE].fired  # with labels: realized, and far beyond its range
    assert result.report.evidently_agrees
    version = mlflow_client().get_model_version(MODEL, check.version)
    assert version.tags["drift.last_verdict"] == "retrain (policy calibrated-drift)"
    assert version.tags["drift.last_report"] == result.report.html_uri
    # the monitoring history: a picture redrawn by each check, linked from the version's card
    assert version.tags["drift.history"] == result.history.uri and result.history.checks >= 1
    assert local_path(result.history.uri).read_bytes().startswith(b"\x89PNG")
    assert "**retrain** (policy calibrated-drift)" in version.description
    assert f"{result.history.checks} check" in version.description and "so far" in version.description
    run = mlflow_client().get_run(result.mlflow_run_id)
    assert run.data.tags["keel.event"] == "keel.drift.detected"
    assert (
        run.data.tags["keel.event_id"] == result.event_id
        and run.data.tags["keel.policy"] == "calibrated-drift"
    )
    [step] = mlflow_client().search_runs(
        [run.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and tags.`keel.step` = 'drift-check'",
    )
    assert step.data.metrics["drift_threshold.temp"] == pytest.approx(temp.threshold)
    assert step.data.metrics["signal.performance"] == pytest.approx(verdict.signals[PERFORMANCE].value)
    columns = (local_path(result.report.html_uri).parent / "columns.md").read_text()
    assert "| temp | feature | **yes** |" in columns and "calibrated threshold" in columns
    assert "| performance |" in columns and "Evidently (score >= 0.1)" in columns
    deadline = time.monotonic() + 20
    while not (found := [e for e in _events_about(MODEL) if e["id"] == result.event_id]):
        assert time.monotonic() < deadline, "the drift event never reached the Prefect server"
        time.sleep(0.5)
    event = found[0]
    assert event["event"] == "keel.drift.detected"
    assert event["resource"]["prefect.resource.id"] == f"keel.model.{MODEL}.v{check.version}"
    payload = event["payload"]
    assert payload["policy"] == "calibrated-drift" and payload["retrain"] is True
    assert payload["decided_on"] == [DATA_DRIFT, PREDICTION_DRIFT, MUST_NOT_DRIFT]
    assert payload["could_not_judge"] == []  # calibrated: the policy could fire
    assert payload["signals"][DATA_DRIFT]["value"] == pytest.approx(verdict.weighted_share)
    assert payload["signals"][DATA_DRIFT]["threshold"] == 0.3
    assert payload["signals"][PERFORMANCE]["fired"] is True
    assert payload["drifted_columns"] == check.drifted_columns
    assert payload["report_uri"] == result.report.html_uri
    assert payload["batch_digest"] == check.batch.digest


def test_a_schedule_counts_the_checks_of_the_champion(env, tmp_path):
    data = bike()
    path = tmp_path / "march.csv"
    data[(data.dteday >= "2011-03-07") & (data.dteday <= "2011-03-13")].to_csv(path, index=False)
    client = mlflow_client()
    experiment = client.get_experiment_by_name("keel").experiment_id
    earlier = len(
        client.search_runs(
            [experiment],
            "tags.`keel.pipeline` = 'drift-monitor' and tags.`keel.event` LIKE 'keel.drift.%' and "
            "attributes.status = 'FINISHED'",  # the checks' parent runs, not their steps
            max_results=1000,
        )
    )
    result = monitor(MonitorParams(batch=str(path), model_name=MODEL, policy=f"schedule:{earlier + 1}"))
    assert result.check.retrain and result.check.decision.signals[0].value == earlier + 1
    later = monitor(MonitorParams(batch=str(path), model_name=MODEL, policy=f"schedule:{earlier + 3}"))
    assert not later.check.retrain


def test_latest_picks_the_last_file_of_a_folder(env, tmp_path):
    data = bike()
    landing = tmp_path / "landing"
    landing.mkdir()
    data[data.dteday < "2011-03-01"].sample(800, random_state=2).to_parquet(landing / "2011-02.parquet")
    data[(data.dteday >= "2012-07-01") & (data.dteday < "2012-07-08")].to_parquet(landing / "2012-07.parquet")
    result = monitor(MonitorParams(batch=str(landing), latest=True, model_name=MODEL))
    assert result.check.batch.uri.endswith("2012-07.parquet") and result.check.retrain


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
    path = tmp_path / "three-rows.csv"
    week.head(3).to_csv(path, index=False)
    cases["three rows"] = (path, "", "too few rows to judge: 3 (at least 30")
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
