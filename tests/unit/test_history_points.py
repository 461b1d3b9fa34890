"""The monitoring history's points (tasks/monitoring/history.py) from a real MLflow store: the limit
counts checks, not the runs of their steps, and a check's signals come back as it logged them."""

from __future__ import annotations

import mlflow
from mlflow.entities import Metric

from tasks.monitoring.history import MONITOR_PIPELINE, VIOLATIONS, load_points
from tasks.steps.tags import MODEL_NAME_TAG, PARENT_TAG, PIPELINE_TAG


def test_the_limit_counts_checks_and_each_point_is_its_checks(tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("history", artifact_location=(tmp_path / "art").as_uri())
    tags = {PIPELINE_TAG: MONITOR_PIPELINE, MODEL_NAME_TAG: "m"}
    for check in range(5):
        parent = client.create_run(experiment, tags=tags, start_time=1_000_000 * (check + 1)).info.run_id
        client.log_batch(
            parent,
            metrics=[
                Metric("retrain", float(check == 4), 0, 0),
                Metric(VIOLATIONS, float(check), 0, 0),
                Metric("signal.data-drift", check / 10, 0, 0),
                Metric("signal.data-drift.threshold", 0.3, 0, 0),
            ],
        )
        for _step in range(3):  # the check's steps: same tags, and one logs `retrain` too
            step = client.create_run(experiment, tags={**tags, PARENT_TAG: parent}).info.run_id
            client.log_batch(step, metrics=[Metric("retrain", 0.0, 0, 0)])
    other = client.create_run(experiment, tags={**tags, MODEL_NAME_TAG: "another"}).info.run_id
    client.log_batch(other, metrics=[Metric("retrain", 1.0, 0, 0), Metric(VIOLATIONS, 0.0, 0, 0)])

    points = load_points(client, experiment, "m")
    assert [p.violations for p in points] == [0, 1, 2, 3, 4]  # every check, oldest first
    assert [p.retrain for p in points] == [False] * 4 + [True]
    assert points[2].values == {"data-drift": 0.2} and points[2].thresholds == {"data-drift": 0.3}
    last = load_points(client, experiment, "m", limit=2)
    assert [p.violations for p in last] == [3, 4]  # the last two checks, not two runs of steps
