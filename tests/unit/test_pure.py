"""Pure functions: references, features, the CLI, the training-mode choice."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from flows.pipeline import PipelineParams, quality_checks
from tasks.steps.cli import parse_params
from tasks.steps.compute import workers_on_loopback
from tasks.steps.params import flat_fields
from tasks.steps.refs import content_digest, data_files
from tasks.tabular.evaluate import Evaluation
from tasks.tabular.featurize import FeatureSpec, encode_target, model_matrix, predictions_frame
from tasks.tabular.train import TrainingSpec, choose_mode


def test_digest_follows_content_not_path(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("x\n1\n")
    b.write_text("x\n1\n")
    assert content_digest(str(a)) == content_digest(str(b))
    before = content_digest(str(a))
    a.write_text("x\n2\n")
    assert content_digest(str(a)) != before


def test_folder_digest_covers_every_part_and_ignores_hidden_files(tmp_path):
    tmp_path = tmp_path / ".state" / "split"  # a hidden folder above the data (the default `.keel`) is fine
    tmp_path.mkdir(parents=True)
    (tmp_path / "part.0.parquet").write_bytes(b"one")
    (tmp_path / "part.1.parquet").write_bytes(b"two")
    first = content_digest(str(tmp_path))
    (tmp_path / "_SUCCESS").write_bytes(b"")
    (tmp_path / ".crc").write_bytes(b"x")
    assert content_digest(str(tmp_path)) == first
    assert [p.rsplit("/", 1)[-1] for p in data_files(str(tmp_path))] == ["part.0.parquet", "part.1.parquet"]
    (tmp_path / "part.1.parquet").write_bytes(b"TWO")
    assert content_digest(str(tmp_path)) != first


SPEC = FeatureSpec(
    target="y",
    time_column="t",
    task="regression",
    numeric=["n"],
    categorical={"c": ["a", "b"]},
    time_parts=["hour", "dayofweek"],
)


def test_features_are_row_local_and_categories_fixed():
    frame = pd.DataFrame(
        {
            "t": pd.to_datetime(["2024-01-01 05:00", "2024-01-02 07:00"]),
            "n": [1, 2],
            "c": ["b", "unseen"],
            "y": [1.0, 2.0],
        }
    )
    matrix = model_matrix(frame, SPEC)
    assert list(matrix.columns) == ["n", "c", "t_hour", "t_dayofweek"]
    assert list(matrix["c"].cat.categories) == ["a", "b"]
    assert matrix["c"].isna().tolist() == [False, True]
    # each row's features depend on that row alone
    pd.testing.assert_frame_equal(model_matrix(frame.iloc[[1]], SPEC), matrix.iloc[[1]])


def test_missing_input_column_is_named():
    with pytest.raises(KeyError, match=r"missing columns \['c'\]"):
        model_matrix(pd.DataFrame({"t": ["2024-01-01"], "n": [1]}), SPEC)


def test_classifier_labels_and_probabilities():
    spec = SPEC.model_copy(update={"task": "binary", "classes": ["0", "1"]})
    assert encode_target(pd.Series([1.0, 0.0, 1.0]), spec).tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="not seen in training"):
        encode_target(pd.Series([2.0]), spec)
    out = predictions_frame(pd.Series([0.8, 0.1]).to_numpy(), spec)
    assert out["prediction"].tolist() == ["1", "0"]
    assert out["probability_1"].tolist() == [0.8, 0.1]


def test_training_mode_follows_data_size():
    spec = TrainingSpec()
    assert choose_mode(spec, rows=10_000, n_features=20, worker_memory=4 * 2**30)[0] == "single"
    assert choose_mode(spec, rows=10_000_000, n_features=20, worker_memory=4 * 2**30)[0] == "distributed"
    assert choose_mode(TrainingSpec(mode="distributed"), 10, 2, 4 * 2**30)[0] == "distributed"


def test_the_reason_for_one_worker_names_its_limit_or_says_there_is_none():
    assert choose_mode(TrainingSpec(), 10_000, 20, 4 * 2**30)[1].endswith("(limit 1024 MiB)")
    mode, why = choose_mode(TrainingSpec(), 10_000, 20, worker_memory=0)  # in-process workers: no limit
    assert mode == "single" and why.endswith("(the workers have no memory limit)")


def test_auto_never_opens_lightgbm_ports_for_workers_on_loopback():
    big = {"rows": 10_000_000, "n_features": 20, "worker_memory": 4 * 2**30}
    mode, why = choose_mode(TrainingSpec(), **big, on_loopback=True)
    assert mode == "single" and "every network interface" in why
    assert choose_mode(TrainingSpec(mode="distributed"), **big, on_loopback=True)[0] == "distributed"
    assert workers_on_loopback(["tcp://127.0.0.1:40123", "tcp://[::1]:40124", "inproc://10.0.0.1/1/2"])
    assert workers_on_loopback(["tcp://localhost:1"])
    assert not workers_on_loopback(["tcp://127.0.0.1:40123", "tcp://10.1.2.3:40124"])
    assert not workers_on_loopback(["tls://worker-1.cluster.internal:8786"])
    assert not workers_on_loopback([])


def test_cli_lists_and_parses_every_parameter(capsys):
    with pytest.raises(SystemExit):
        parse_params(PipelineParams, ["--help"], "prog", "")
    help_text = capsys.readouterr().out
    flags = {"--" + name.replace("_", "-") for name in flat_fields(PipelineParams)}
    assert flags >= {
        "--data",
        "--n-trials",
        "--valid-fraction",
        "--min-r2",
        "--on-quality-violation",
        "--approval",
    }
    for flag in flags:
        assert flag in help_text
    for group in ("quality:", "split:", "tuning:", "training:", "registry:"):
        assert group in help_text  # a section per parameter group
    params = parse_params(
        PipelineParams,
        [
            "--n-trials",
            "3",
            "--drop-columns",
            "a",
            "b",
            "--start",
            "2011-02-01",
            "--space",
            '{"num_leaves": {"low": 4, "high": 8, "integer": true}}',
        ],
        "prog",
        "",
    )
    assert (
        params.tuning.n_trials == 3
        and params.drop_columns == ["a", "b"]
        and str(params.split.start) == "2011-02-01"
    )
    assert params.tuning.space["num_leaves"].high == 8


def test_cli_rejects_bad_values_with_the_flag_name(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_params(PipelineParams, ["--valid-fraction", "0.9"], "prog", "")
    assert exit_info.value.code == 2
    assert "--valid-fraction" in capsys.readouterr().err


def test_gate_checks_threshold_and_champion_margin():
    params = PipelineParams(min_r2=0.5, champion_margin=0.01)
    alone = quality_checks(Evaluation(metrics={"r2": 0.8}, gate_metric="r2"), params)
    assert [c.passed for c in alone] == [True]
    versus = quality_checks(
        Evaluation(
            metrics={"r2": 0.8}, champion_metrics={"r2": 0.795}, champion_version="3", gate_metric="r2"
        ),
        params,
    )
    assert [c.passed for c in versus] == [True, False]
    assert "champion v3" in versus[1].right_name


def test_retry_policy_waits_and_failure_kinds():
    from distributed import KilledWorker
    from mlflow.exceptions import MlflowException, RestException

    from tasks.steps import RetryPolicy
    from tasks.steps.errors import DataValidationError

    policy = RetryPolicy(attempts=4, interval_seconds=2, backoff_rate=3)
    assert policy.delays() == [2, 6, 18]
    assert RetryPolicy().delays() == []
    down = MlflowException(
        "API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/create failed with exception boom"
    )
    assert policy.retries(down)
    assert policy.retries(RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "busy"}))
    assert not policy.retries(RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "no"}))
    assert not policy.retries(MlflowException("Registered Model with name=x not found"))
    assert policy.retries(KilledWorker("task", SimpleNamespace(address="tcp://127.0.0.1:1"), 3))
    assert not policy.retries(ValueError("a bug"))
    assert RetryPolicy(retry_on=("any",)).retries(ValueError("a bug"))
    assert not RetryPolicy(retry_on=("any",)).retries(DataValidationError("f.csv", "bad"))
