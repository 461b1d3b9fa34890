"""Late labels (flows.label) on a real MLflow store, with predictions captured by flows.transform on a
real Dask cluster: the realized metric per window and version against a direct computation, the
verdict and its event, every unusable label counted and listed (escaped), and bad input (exit 2)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from flows.label import LabelParams, label, main
from flows.transform import TransformParams, transform
from tasks.steps.lineage_query import dataset_lineage, version_lineage
from tests.conftest import BIKE_CSV, SCORING_MODEL, mlflow_client

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

MODEL = SCORING_MODEL
HOSTILE = "<script>alert(1)</script>"


@pytest.fixture
def scored(scoring_env, tmp_path) -> tuple[pd.DataFrame, Path]:
    """May 2011 scored by v1 and by v2 (the champion), ids from `instant`, the date kept."""
    bike = pd.read_csv(BIKE_CSV)
    may = bike[(bike.dteday >= "2011-05-01") & (bike.dteday < "2011-06-01")].reset_index(drop=True)
    data = tmp_path / "may.csv"
    may.to_csv(data, index=False)
    outbox = tmp_path / "scored"
    for version in ("1", "2"):
        transform(
            TransformParams(
                model_name=MODEL,
                version=version,
                data=str(data),
                output=str(outbox / f"may-v{version}"),
                id_columns=["instant"],
                keep_columns=["dteday", "hr"],
            )
        )
    return may, outbox


def labels_file(tmp_path: Path, frame: pd.DataFrame, name: str = "labels.csv") -> Path:
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def test_far_labels_drop_near_ones_do_not_and_each_window_is_each_versions_metric(scored, tmp_path):
    may, outbox = scored
    predictions = pd.read_parquet(outbox / "may-v2")
    truth = may[["instant", "cnt"]].rename(columns={"instant": "order", "cnt": "demand"})
    far = truth.assign(demand=truth.demand * 4 + 50)
    result = label(
        LabelParams(
            labels=str(labels_file(tmp_path, far)),
            predictions=str(outbox),
            model_name=MODEL,
            id_column="order",
            label_column="demand",
            time_column="dteday",
            window="7D",
        )
    )
    assert result.champion == "2" and result.metric == "rmse"
    assert result.labels_read == len(may) and result.matched == len(may) and result.problems == {}
    assert result.event == "keel.quality.dropped" and result.event_id
    assert result.decision.startswith("RETRAIN (policy performance): v2's window from ")
    assert {w.version for w in result.windows} == {"1", "2"}
    # each window's rmse: that version's predictions against the labels of the days in it
    joined = predictions.assign(order=predictions.inference_id.astype(int)).merge(far, on="order")
    days = pd.to_datetime(joined.dteday, utc=True)
    for window in (w for w in result.windows if w.version == "2"):
        inside = joined[(days >= pd.Timestamp(window.start)) & (days < pd.Timestamp(window.end))]
        assert window.rows == len(inside)
        expected = math.sqrt(((inside.demand - inside.prediction) ** 2).mean())
        assert window.metrics["rmse"] == pytest.approx(expected, rel=1e-9)
        assert window.dropped
    assert sum(w.rows for w in result.windows) == 2 * len(may)
    # what is stored: the joined data, the report, the picture and the tables, and the verdict
    client = mlflow_client()
    run = client.get_run(result.mlflow_run_id)
    assert run.data.tags["keel.event"] == "keel.quality.dropped"
    assert run.data.tags["keel.labelled.rows"] == str(2 * len(may))
    stored = pd.read_parquet(result.joined_uri)
    assert len(stored) == 2 * len(may) and set(stored.model_version) == {"1", "2"}
    artifacts = {f.path for f in client.list_artifacts(result.mlflow_run_id, "quality")}
    assert {
        f"quality/{n}" for n in ("report.html", "windows.png", "windows.csv", "bad_labels.csv")
    } <= artifacts
    version = client.get_model_version(MODEL, "2")
    assert version.tags["quality.last_verdict"] == result.decision
    # lineage: the check is one of the version's monitoring checks; the label file's readers include it
    assert result.mlflow_run_id in {r.run_id for r in version_lineage(client, MODEL, "2").monitoring_checks}
    readers = dataset_lineage(client, result.labels.digest, result.labels.location).uses
    assert (result.mlflow_run_id, "read") in {(u.run.run_id, u.role) for u in readers}

    near = truth.assign(
        demand=predictions.set_index(predictions.inference_id.astype(int))
        .loc[truth.order, "prediction"]
        .to_numpy()
        + 1
    )
    ok = label(
        LabelParams(
            labels=str(labels_file(tmp_path, near, "near.csv")),
            predictions=str(outbox / "may-v2"),
            model_name=MODEL,
            id_column="order",
            label_column="demand",
        )
    )
    assert ok.event == "keel.quality.ok" and ok.event_id != result.event_id
    assert {w.version for w in ok.windows} == {"2"}
    assert all(w.metrics["rmse"] == pytest.approx(1.0) for w in ok.windows)


def test_unusable_labels_are_counted_listed_and_escaped_never_dropped_silently(scored, tmp_path):
    may, outbox = scored
    ids = may.instant.astype(str).tolist()
    good = pd.DataFrame({"instant": ids[:200], "cnt": may.cnt.head(200).tolist()})
    same, conflicting, text, unlabelled = ids[300:304]
    bad = pd.DataFrame(
        {
            "instant": [None, unlabelled, same, same, conflicting, conflicting, "99999999", HOSTILE, text],
            "cnt": [5, None, 3, 3, 1, 2, 4, 4, "lots"],
        }
    )
    frame = pd.concat([good, bad], ignore_index=True)
    result = label(
        LabelParams(
            labels=str(labels_file(tmp_path, frame)),
            predictions=str(outbox / "may-v2"),
            model_name=MODEL,
            id_column="instant",
            min_window_rows=1000,  # too few labels in any window: reported, nothing judged
        )
    )
    assert result.problems == {
        "no captured prediction has this id": 2,
        "id given more than once with different labels (none is used)": 2,
        "no id": 1,
        "no label": 1,
        "id given again with the same label (the first is used)": 1,
        "not a finite number (the model is a regression)": 1,
    }
    assert result.matched == 200 + 1  # the good ones, and the id given twice with the same label
    assert result.event is None and "no event" in result.decision
    client = mlflow_client()
    table = pd.read_csv(
        client.download_artifacts(result.mlflow_run_id, "quality/bad_labels.csv", str(tmp_path))
    )
    assert len(table) == sum(result.problems.values()) and HOSTILE in set(table.inference_id)
    page = Path(
        client.download_artifacts(result.mlflow_run_id, "quality/report.html", str(tmp_path))
    ).read_text()
    assert HOSTILE not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "too few labels to judge" in page


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--id-column", "instant", "--label-column", "nope"], "nope"),
        (["--id-column", "hr"], "matches a prediction"),
        (["--id-column", "instant", "--window", "soon"], "not a time period"),
        (["--id-column", "instant", "--window", "30"], "is a number of rows"),
        (["--id-column", "instant", "--performance-metric", "auc"], "is not a metric of this model"),
    ],
)
def test_bad_input_exits_2(scored, tmp_path, capsys, args, message):
    may, outbox = scored
    labels = labels_file(tmp_path, may[["instant", "hr", "cnt"]].assign(hr=may.hr + 10_000))
    runs_before = _runs()
    assert (
        exit_code(["--labels", str(labels), "--predictions", str(outbox), "--model-name", MODEL, *args]) == 2
    )
    assert message in capsys.readouterr().err
    assert _runs() - runs_before <= 1  # at most the refused run itself, which stores nothing


def test_a_folder_without_the_models_predictions_exits_2(scored, tmp_path, capsys):
    may, _ = scored
    empty = tmp_path / "nothing-scored"
    empty.mkdir()
    labels = labels_file(tmp_path, may[["instant", "cnt"]])
    assert (
        main(
            [
                "--labels",
                str(labels),
                "--predictions",
                str(empty),
                "--model-name",
                MODEL,
                "--id-column",
                "instant",
            ]
        )
        == 2
    )
    assert "no scoring output of" in capsys.readouterr().err


def exit_code(argv: list[str]) -> int:
    """The command line's exit code (flags argparse refuses exit at once)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def _runs() -> int:
    client = mlflow_client()
    return sum(
        len(client.search_runs([e.experiment_id], max_results=50_000)) for e in client.search_experiments()
    )


def test_ids_are_text_a_leading_zero_is_kept(scored, tmp_path, capsys):
    """ "0012" in a label file is not the id "12": ids are compared as text, never parsed as numbers."""
    may, outbox = scored
    frame = may[["instant", "cnt"]].head(100).assign(instant=lambda f: f.instant.map(lambda v: f"00{v}"))
    labels = labels_file(tmp_path, frame)
    assert (
        main(
            [
                "--labels",
                str(labels),
                "--predictions",
                str(outbox),
                "--model-name",
                MODEL,
                "--id-column",
                "instant",
            ]
        )
        == 2
    )
    assert "matches a prediction" in capsys.readouterr().err
