"""The project config (`keel.toml` or `[tool.keel]`): read, checked, paths relative to the file."""

from __future__ import annotations

import pytest

from tasks.tabular.project import ProjectConfigError, project_config


def test_keel_toml_is_read_and_relative_data_is_taken_from_its_folder(tmp_path):
    (tmp_path / "keel.toml").write_text('data = "landing/x.csv"\ntarget = "churned"\nkey_columns = ["id"]\n')
    assert project_config(tmp_path) == {
        "data": str(tmp_path / "landing" / "x.csv"),
        "target": "churned",
        "key_columns": ["id"],
    }


def test_pyproject_tool_keel_is_read_and_a_pyproject_without_it_gives_nothing(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    assert project_config(tmp_path) == {}
    (tmp_path / "pyproject.toml").write_text('[tool.keel]\nmodel_name = "churn"\ndata = "s3://b/k.parquet"\n')
    assert project_config(tmp_path) == {"model_name": "churn", "data": "s3://b/k.parquet"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('targt = "y"\n', "unknown keys \\['targt'\\]"),
        ("key_columns = 3\n", "key_columns must be a list of column names"),
        ("target = 3\n", "target must be a string"),
        ("target = \n", "not valid TOML"),
    ],
)
def test_a_config_that_cannot_be_used_is_refused_with_the_file_and_the_reason(tmp_path, text, message):
    (tmp_path / "keel.toml").write_text(text)
    with pytest.raises(ProjectConfigError, match=message) as refused:
        project_config(tmp_path)
    assert str(tmp_path / "keel.toml") in str(refused.value)


def test_the_demos_columns_are_assumed_for_the_demo_data_only(tmp_path, monkeypatch):
    from flows.pipeline import PipelineParams
    from tasks.tabular.project import DEMO_DATA

    monkeypatch.chdir(tmp_path)  # no keel.toml here
    demo = PipelineParams()
    assert demo.data == str(DEMO_DATA) and demo.target == "cnt" and demo.model_name == "bike-demand"
    assert demo.drop_columns == ["instant", "casual", "registered"] and demo.key_columns == ["dteday", "hr"]

    own = PipelineParams(data=str(tmp_path / "Sales 2026.parquet"), target="units", time_column="day")
    assert own.drop_columns == [] and own.key_columns == ["day"] and own.model_name == "Sales-2026"
    with pytest.raises(ValueError, match=r"--target is needed for .*other.csv"):
        PipelineParams(data=str(tmp_path / "other.csv"), time_column="timestamp")
    with pytest.raises(ValueError, match="--time-column is needed"):
        PipelineParams(data=str(tmp_path / "other.csv"), target="class")


def test_keel_toml_fills_what_flags_leave_out_for_every_flow(tmp_path, monkeypatch):
    from deployments.serve import ServeSettings
    from flows.backtest import BacktestParams
    from flows.monitor import MonitorParams
    from flows.pipeline import PipelineParams
    from flows.retrain import RetrainParams

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--model-name is needed"):
        MonitorParams(batch="week.csv")
    with pytest.raises(ValueError, match="--model-name is needed"):
        RetrainParams()
    (tmp_path / "keel.toml").write_text(
        'data = "landing/"\ntarget = "churned"\ntime_column = "signup"\nkey_columns = ["id"]\n'
        'drop_columns = ["id"]\nmodel_name = "churn"\n'
    )
    params = PipelineParams(time_column="updated")  # a flag wins
    assert (params.data, params.target, params.time_column) == (
        str(tmp_path / "landing"),
        "churned",
        "updated",
    )
    assert params.key_columns == ["id"] and params.drop_columns == ["id"] and params.model_name == "churn"
    assert BacktestParams().target == "churned"
    assert MonitorParams(batch="week.csv").model_name == "churn"
    assert ServeSettings(landing="landing/").model_name == "churn"
    retrain = RetrainParams(data="new/")  # the columns not configured come from the champion
    assert retrain.model_name == "churn" and retrain.target == "churned"


def test_a_resumed_execution_keeps_its_own_table_not_the_demos(state, tmp_path, monkeypatch):
    from flows.pipeline import PipelineParams, training_pipeline
    from tasks.steps import lineage
    from tasks.steps.settings import get_settings

    monkeypatch.chdir(tmp_path)
    stored = PipelineParams(data=str(tmp_path / "other.csv"), target="y", time_column="t", n_trials=5)
    with lineage.pipeline_run("training-pipeline", stored.model_dump(mode="json"), get_settings()) as run:
        pass
    given = {"reuse_from": run.run_id, "n_trials": 3}  # as on the command line: the rest is the execution's
    params = training_pipeline.with_stored_params(PipelineParams.model_validate(given), given)
    assert (params.data, params.target, params.time_column) == (str(tmp_path / "other.csv"), "y", "t")
    assert params.tuning.n_trials == 3 and params.reuse_from == run.run_id and params.model_name == "other"
