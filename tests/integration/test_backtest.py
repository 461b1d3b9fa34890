"""Retrain policies on data with known truth (tests/streams.py), on a real Dask cluster and a real MLflow
store: the backtest flow replays each stream; the monitor checks batches with and without labels.
Then the bike backtest, and the inputs the backtest refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from flows.backtest import ALL_POLICIES, BacktestParams, backtest, main
from flows.monitor import MonitorParams, monitor
from flows.pipeline import PipelineParams, training_pipeline
from tasks.monitoring.policies import PERFORMANCE
from tests.conftest import BIKE_CSV, mlflow_client
from tests.streams import stream

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

CHANGE = "2024-04-30"  # day 120 of the streams
CALIBRATED = ("calibrated-drift", "performance", "drift-and-performance")


@pytest.fixture(scope="module")
def streams(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("streams")
    paths = {}
    for scenario in ("stationary", "minor-shift", "important-shift", "concept"):
        paths[scenario] = folder / f"{scenario}.csv"
        stream(scenario).to_csv(paths[scenario], index=False)
    return paths


def replay(path: Path, **changes) -> dict:
    result = backtest(
        BacktestParams(
            data=str(path),
            target="y",
            time_column="time",
            drop_columns=[],
            initial_days=60,
            n_trials=4,
            change_points=[CHANGE],
            **changes,
        )
    )
    return {s.policy: s for s in result.policies}


def test_a_stationary_stream_raises_no_alarm_under_the_calibrated_policies(on_cluster, streams):
    """At the defaults the drift-based calibrated policies stay silent, and performance (k = 1.5, the
    most sensitive band within the 5% false-alarm budget: 2.3% measured on longer stationary streams,
    README) fires on at most 5% of the batches, never inside the initial window; at NannyML's band
    (k = 3) none of them fires. Evidently's fixed rule fires on ordinary weeks."""
    policies = replay(streams["stationary"])
    batches = len(policies["never"].scores) + policies["never"].inside_batches
    for name in ("calibrated-drift", "drift-and-performance"):
        assert policies[name].alarms == 0 and policies[name].false_alarms == 0, name
    assert policies["performance"].alarms <= 0.05 * batches and policies["performance"].false_alarms == 0
    assert policies["drift"].alarms > 0
    assert all(p.blind == 0 for p in policies.values())  # every policy could judge every batch
    strict = replay(streams["stationary"], policies=list(CALIBRATED), performance_sd=3.0)
    for name in CALIBRATED:
        assert strict[name].alarms == 0 and strict[name].false_alarms == 0, name


def test_a_policy_that_cannot_judge_says_so_instead_of_looking_quiet(on_cluster, streams):
    """A test period of 3 days (5% of 60) holds no 7-day batch: no performance range can be
    calibrated, so `performance` can never fire. The backtest counts the batches it could not judge
    and says why, rather than showing it as quiet as `never`."""
    result = backtest(
        BacktestParams(
            data=str(streams["concept"]),
            target="y",
            time_column="time",
            drop_columns=[],
            initial_days=60,
            n_trials=1,
            test_fraction=0.05,
            policies=["never", "performance", "drift"],
        )
    )
    policies = {s.policy: s for s in result.policies}
    blind = policies["performance"]
    assert blind.blind == len(blind.scores) and blind.alarms == 0
    assert "not calibrated" in blind.blind_reason and "--test-fraction" in blind.blind_reason
    assert policies["never"].blind == 0 and policies["drift"].blind == 0
    assert "batches it could not judge" in result.table
    assert f"performance could not judge {blind.blind} of {len(blind.scores)} batches" in result.table


def test_drift_of_inputs_the_model_barely_uses_is_seen_but_retrains_nothing(on_cluster, streams):
    policies = replay(streams["minor-shift"], policies=["drift", "calibrated-drift", "performance"])
    after = [b for b in range(9, 21)]  # the batches wholly after the change
    assert set(after) <= set(policies["drift"].alarm_batches)  # the old rule fires on every one
    assert policies["calibrated-drift"].alarms == 0
    batches = len(policies["drift"].scores) + policies["drift"].inside_batches
    assert policies["performance"].alarms <= 0.05 * batches  # the model does not suffer: noise alarms only


def test_a_shift_of_an_important_input_is_detected_within_two_batches(on_cluster, streams):
    policies = replay(
        streams["important-shift"], policies=["calibrated-drift", "performance", "drift-and-performance"]
    )
    for name in CALIBRATED:
        [delay] = policies[name].detection_delays
        assert delay is not None and delay <= 2, (name, delay)
        assert policies[name].false_alarms == 0


def test_concept_drift_is_detected_by_realized_performance(on_cluster, streams):
    policies = replay(streams["concept"], policies=["calibrated-drift", "performance"])
    [delay] = policies["performance"].detection_delays
    assert delay is not None and delay <= 2
    assert (
        policies["performance"].reasons[policies["performance"].alarm_batches[0]][0].startswith("performance")
    )
    assert policies["calibrated-drift"].detection_delays == [None]  # no input moved


def test_without_labels_the_estimate_sees_a_hurtful_shift_but_not_a_concept_change(
    on_cluster, streams, tmp_path
):
    """The monitor on one post-change week, labelled and not: an important input concentrated near the
    decision boundary is seen either way (CBPE: the model becomes unsure); a flipped relation only
    with labels."""
    training_pipeline(
        PipelineParams(
            data=str(streams["stationary"]),  # the streams share every row before the change
            target="y",
            time_column="time",
            drop_columns=[],
            key_columns=["time"],
            end="2024-04-20",
            n_trials=4,
            model_name="stream",
            min_auc=0.6,
        )
    )
    seen = {}
    for scenario in ("important-shift", "concept"):
        rows = pd.read_csv(streams[scenario], parse_dates=["time"])
        week = rows[(rows.time >= "2024-05-06") & (rows.time < "2024-05-13")]
        for labelled in (True, False):
            path = tmp_path / f"{scenario}-{labelled}.csv"
            (week if labelled else week.drop(columns=["y"])).to_csv(path, index=False)
            check = monitor(MonitorParams(batch=str(path), model_name="stream", policy="performance")).check
            seen[(scenario, labelled)] = check.retrain
            source = "realized" if labelled else "estimated"
            assert source in check.verdict.signals[PERFORMANCE].basis
    assert seen == {
        ("important-shift", True): True,
        ("important-shift", False): True,
        ("concept", True): True,
        ("concept", False): False,
    }


def test_the_bike_backtest_compares_every_policy_and_shows_it(on_cluster):
    result = backtest(BacktestParams(data=str(BIKE_CSV), n_trials=4, batch_every="14D"))
    assert [
        s.policy for s in sorted(result.policies, key=lambda s: ALL_POLICIES.index(s.policy))
    ] == ALL_POLICIES
    assert result.batches == 45 and result.inside_batches == 6 and result.metric == "rmse"
    by_name = {s.policy: s for s in result.policies}
    assert by_name["always"].retrains == result.batches - 1 and by_name["never"].retrains == 0
    assert by_name["schedule:4"].retrains == (result.batches - 1) // 4
    assert by_name["never"].mean > by_name["always"].mean  # a model that never learns the growth loses
    assert result.models_trained <= result.batches  # one model per distinct training window
    assert all(len(s.scores) == result.batches for s in result.policies)
    assert "| policy | mean rmse (lower is better) | vs always |" in result.table
    run = mlflow_client().get_run(result.mlflow_run_id)
    assert run.data.tags["keel.pipeline"] == "backtest"
    assert run.data.metrics["always.retrains"] == by_name["always"].retrains
    folder = Path(result.plot_uri.removeprefix("file://")).parent
    assert (folder / "metric_over_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    details = json.loads((folder / "results.json").read_text())
    assert {p["policy"] for p in details["policies"]} == set(ALL_POLICIES)
    assert "| policy |" in (folder / "results.md").read_text()


def bad(args: list[str], capsys) -> str:
    code = main(["--data", str(BIKE_CSV), "--n-trials", "1", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "nothing replayed" in err
    return err


def test_a_backtest_that_cannot_be_done_exits_2_naming_the_parameter(on_cluster, capsys, tmp_path):
    assert "--initial-days: the initial window ends on 2013-03-11" in bad(["--initial-days", "800"], capsys)
    assert "--batch-every: 1 complete batches of 7D" in bad(["--initial-days", "720"], capsys)
    assert "--label-delay 60 days" in bad(["--initial-days", "680", "--label-delay", "60D"], capsys)
    rows = pd.read_csv(BIKE_CSV)
    rows.loc[rows.dteday >= "2012-06-01", "cnt"] = None
    gone = tmp_path / "target-gone.csv"
    rows.to_csv(gone, index=False)
    with pytest.raises(SystemExit) as exit_:  # a copy of the demo's data: its columns must be said
        main(["--data", str(gone)])
    assert exit_.value.code == 2 and "--target is needed for" in capsys.readouterr().err
    columns = [
        "--target",
        "cnt",
        "--time-column",
        "dteday",
        "--drop-columns",
        "instant",
        "casual",
        "registered",
    ]
    err = bad(["--data", str(gone), *columns], capsys)
    assert "column 'cnt'" in err and "has no values of the target" in err
    with pytest.raises(SystemExit) as exit_:
        main(["--policies", "sometimes"])
    assert exit_.value.code == 2 and "--policies" in capsys.readouterr().err
