"""The pipeline author's API: decorators bare and with arguments, DataFrames stored as references,
return values that cannot be passed on refused with a way out, steps read from code, `@pipeline`'s
command line and plan, the git commit of the author's repository. Against the Prefect test harness
and a real MLflow store; the Dask cluster is never opened (no step asks for it)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import dask.dataframe as dd
import pandas as pd
import pytest
from pydantic import BaseModel, Field, ValidationError

from tasks.steps import (
    CacheConfig,
    Check,
    DatasetRef,
    ExecutionOptions,
    ModelRef,
    condition,
    current_pipeline,
    fail,
    lineage,
    load_model,
    log_model,
    pipeline,
    processing_step,
    training_step,
)
from tasks.steps.cache import UnstorableOutput
from tasks.steps.discover import steps_of
from tasks.steps.integrity import ModelIntegrityError, verified_folder
from tasks.steps.models import MLFLOW_PIP_VERSION_WARNING
from tasks.steps.tags import STEP_TAG
from tests.conftest import mlflow_client

CALLED: list[str] = []


@processing_step
def make_table(rows: int) -> pd.DataFrame:
    return pd.DataFrame({"x": range(rows), "y": [i * 2 for i in range(rows)]})


@processing_step(cache=CacheConfig())
def split_table(table: DatasetRef) -> dict[str, pd.DataFrame]:
    frame = pd.read_parquet(table.uri)
    return {"head": frame[:3], "tail": frame[3:]}


@processing_step
def doubled(table: DatasetRef) -> dd.DataFrame:
    frame = dd.read_parquet(table.uri)
    return frame.assign(y=frame.y * 2).repartition(npartitions=2)


@training_step(name="sum-of-y")
def total(table: DatasetRef) -> float:
    return float(pd.read_parquet(table.uri).y.sum())


@processing_step
def returns_an_object(rows: int):
    CALLED.append("returns_an_object")
    return object()


@processing_step
def annotated_unstorable(rows: int) -> pd.Series:
    CALLED.append("annotated_unstorable")
    return pd.Series(range(rows))


class TableParams(ExecutionOptions):
    rows: int = 5
    bad: str = ""


def helper_that_gates(value: float) -> None:
    outcome = condition("gate", [Check("total", value, ">=", "zero", 0.0)])
    if not outcome.passed:
        fail("gate-failed", outcome.message)


@pipeline(name="sdk-pipeline", params=TableParams)
def sdk_pipeline(params: TableParams) -> dict[str, object]:
    parts = split_table(make_table(params.rows))
    value = total(doubled(parts["tail"]))
    helper_that_gates(value)
    if params.bad == "object":
        returns_an_object(params.rows)
    elif params.bad == "annotation":
        annotated_unstorable(params.rows)
    return {"execution": current_pipeline().run_id, "parts": parts, "total": value}


def test_decorators_work_bare_and_with_arguments_and_refuse_anything_else():
    assert make_table.name == "make-table" and split_table.name == "split-table" and total.name == "sum-of-y"
    assert split_table.cache.enabled and not make_table.cache.enabled
    with pytest.raises(TypeError, match="takes the step's function, or keyword arguments"):
        processing_step("data/x.csv")  # type: ignore[call-overload]


def test_the_steps_of_a_pipeline_are_read_from_its_code_in_order():
    assert sdk_pipeline.steps == (
        "split-table",
        "make-table",
        "sum-of-y",
        "doubled",
        "gate",
        "gate-failed",
        "returns-an-object",
        "annotated-unstorable",
    )
    assert steps_of(helper_that_gates) == ("gate", "gate-failed")


def test_the_command_line_refuses_unknown_steps_and_selection_without_an_execution(capsys):
    with pytest.raises(SystemExit) as exit_:
        sdk_pipeline.main(["--force-steps", "nope"])
    assert exit_.value.code == 2
    assert "unknown steps ['nope']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        sdk_pipeline.main(["--selected-steps", "make-table"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        sdk_pipeline.main(["--help"])
    assert exit_.value.code == 0
    assert "--rows" in capsys.readouterr().out


@pytest.mark.usefixtures("prefect_harness", "state")
def test_dataframes_are_stored_as_parquet_references_and_recorded_as_lineage():
    result = sdk_pipeline(TableParams(rows=5))
    parts = result["parts"]
    assert set(parts) == {"head", "tail"} and all(isinstance(p, DatasetRef) for p in parts.values())
    assert parts["head"].rows == 3 and parts["tail"].rows == 2 and parts["tail"].columns == ("x", "y")
    assert Path(parts["tail"].uri).parent.name == "split-table"
    assert Path(parts["tail"].uri).parent.parent.name == result["execution"]
    assert result["total"] == 28.0  # y = 6 + 8, doubled by a Dask DataFrame stored as two files
    client = mlflow_client()
    runs = client.search_runs(
        [client.get_run(result["execution"]).info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{result['execution']}'",
    )
    by_step = {r.data.tags[STEP_TAG]: r for r in runs}
    assert by_step["make-table"].data.tags["keel.output.output.rows"] == "5"
    stored = Path(by_step["doubled"].data.tags["keel.output.output.uri"])
    assert (
        len(list(stored.glob("*.parquet"))) == 2
        and by_step["doubled"].data.tags["keel.output.output.rows"] == "2"
    )
    assert [
        t.value
        for i in by_step["sum-of-y"].inputs.dataset_inputs
        for t in i.tags
        if t.key == "mlflow.data.context"
    ] == ["table"]
    again = sdk_pipeline(TableParams(rows=5))  # the stored frames are checked and reused
    assert again["parts"] == parts


@pytest.mark.usefixtures("prefect_harness", "state")
def test_a_return_value_that_cannot_be_passed_on_says_what_to_return():
    CALLED.clear()
    with pytest.raises(UnstorableOutput, match=r"Series.*return a reference"):
        sdk_pipeline(TableParams(rows=5, bad="annotation"))
    assert "annotated_unstorable" not in CALLED  # refused before its work
    with pytest.raises(UnstorableOutput, match=r"object.*DataFrame is stored as Parquet for you"):
        sdk_pipeline(TableParams(rows=5, bad="object"))


def test_the_git_commit_recorded_is_that_of_the_pipelines_own_repository(tmp_path):
    git = ["git", "-c", "user.name=u", "-c", "user.email=u@example.invalid"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "flow.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "."], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout
    tags = lineage.git_commit(tmp_path / "flow.py")
    assert tags == {"mlflow.source.git.commit": head.strip(), "keel.git_dirty": "False"}
    (tmp_path / "flow.py").write_text("x = 2\n")
    assert lineage.git_commit(tmp_path / "flow.py")["keel.git_dirty"] == "True"
    outside = tmp_path.parent / "not-a-repository"
    outside.mkdir(exist_ok=True)
    assert lineage.git_commit(outside / "flow.py")["mlflow.source.git.commit"] == "unknown"


class Unconstructible(BaseModel):
    needed: int


def test_a_pipeline_whose_parameters_need_values_has_no_default():
    @pipeline(params=Unconstructible)
    def needs(params: Unconstructible) -> int:
        return params.needed

    assert needs.name == "needs"
    assert needs.parameters.required == ["params"]


def test_parameter_groups_are_nested_in_the_model_and_flat_everywhere_else(capsys):
    """Groups are sections in the Prefect UI (nested JSON schema) and plain flags on the command
    line; flat names route into their group wherever parameters are made, and resumed parameters
    (stored nested, or flat by an earlier version) merge with new flat values."""
    from tasks.steps import ParamGroup, Params
    from tasks.steps.cli import parse_params
    from tasks.steps.params import flatten, nest

    class Split(ParamGroup):
        """The split."""

        valid_fraction: float = Field(default=0.2, gt=0, lt=0.5)

    class Fit(ParamGroup):
        """The fit."""

        trees: int = Field(default=100, ge=1)
        seed: int = 1

    class Knobs(Params):
        name: str = "m"
        split: Split = Field(default_factory=Split)
        fit: Fit = Field(default_factory=Fit)

    schema = Knobs.model_json_schema()
    assert set(schema["properties"]) == {"name", "split", "fit"}  # nested: one form section each
    made = Knobs(trees=7, valid_fraction=0.3)
    assert made.fit.trees == 7 and made.fit.seed == 1 and made.split.valid_fraction == 0.3
    assert Knobs(fit={"trees": 5}, seed=9).fit == Fit(trees=5, seed=9)  # a flat value joins its group
    assert made.updated(seed=3).fit == Fit(trees=7, seed=3)
    with pytest.raises(ValidationError):
        made.updated(trees=0)  # checked like new parameters
    stored = made.model_dump()
    assert Knobs.model_validate(nest(Knobs, {**flatten(Knobs, stored), "trees": 8})).fit.trees == 8
    assert Knobs.model_validate({"trees": 2, "name": "old"}).fit.trees == 2  # stored flat, before groups

    parsed = parse_params(Knobs, ["--trees", "3", "--valid-fraction", "0.1"], "prog", "")
    assert parsed.fit.trees == 3 and parsed.split.valid_fraction == 0.1
    with pytest.raises(SystemExit):
        parse_params(Knobs, ["--trees", "0"], "prog", "")
    assert "--trees:" in capsys.readouterr().err  # the flag, not fit.trees

    with pytest.raises(TypeError, match="'trees' is both in fit and in other"):

        class Ambiguous(Params):  # every field in two groups: --trees would mean either
            fit: Fit = Field(default_factory=Fit)
            other: Fit = Field(default_factory=Fit)


@training_step
def fit_two(table: DatasetRef) -> dict[str, ModelRef]:
    import lightgbm as lgb
    from sklearn.linear_model import LinearRegression

    frame = pd.read_parquet(table.uri)
    features = frame[["x"]].astype("float64")
    booster = lgb.train({"verbose": -1, "min_data_in_leaf": 1}, lgb.Dataset(features, frame.y), 5)
    return {
        "sklearn": log_model(LinearRegression().fit(features, frame.y), input_example=features[:2]),
        "lightgbm": log_model(booster, input_example=features[:2], task="regression"),
    }


@processing_step
def predict_both(models: dict[str, ModelRef], table: DatasetRef) -> dict[str, list[float]]:
    features = pd.read_parquet(table.uri)[["x"]].astype("float64")
    return {name: [float(v) for v in load_model(ref).predict(features)] for name, ref in models.items()}


@pipeline(name="sdk-models", params=TableParams)
def models_pipeline(params: TableParams) -> dict[str, object]:
    table = make_table(params.rows)
    models = fit_two(table)
    return {"models": models, "predictions": predict_both(models, table)}


@pytest.mark.usefixtures("prefect_harness", "state")
def test_a_logged_model_loads_in_a_later_step_and_only_as_it_was_logged(capfd):
    result = models_pipeline(TableParams(rows=20))
    # Without pip installed (uv's environments), MLflow warned of pip's version at every model logged.
    assert MLFLOW_PIP_VERSION_WARNING not in capfd.readouterr().err
    predictions = result["predictions"]
    assert predictions["sklearn"] == pytest.approx([2.0 * x for x in range(20)])
    assert len(predictions["lightgbm"]) == 20

    ref = result["models"]["sklearn"]
    stored = mlflow_client().get_logged_model(ref.model_id).artifact_location.removeprefix("file://")
    (Path(stored) / "model.skops").write_bytes(b"not the model")
    verified_folder.cache_clear()
    with pytest.raises(ModelIntegrityError, match=r"changed: model\.skops"):
        load_model(ref)
