"""Batch scoring (flows.transform) on a real Dask cluster with a real MLflow store: the output against
`mlflow.pyfunc` predictions, stable inference ids, kept columns, lineage, a whole-or-nothing output,
bad input that writes nothing (exit 2), and the capture checked by the monitor with its own
predictions."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pytest

from flows.lineage import main as main_lineage
from flows.monitor import MonitorParams, monitor
from flows.monitor import main as monitor_main
from flows.score_pending import ScorePendingParams, score_pending
from flows.transform import TransformParams, main, transform
from infra.processes import free_port
from tasks.steps.errors import DataValidationError
from tasks.steps.integrity import logged_model_id
from tasks.steps.lineage_query import dataset_lineage, version_lineage
from tasks.steps.refs import content_digest
from tasks.steps.transform import ADDED_COLUMNS, INFERENCE_ID, read_record, row_ids
from tests.conftest import BIKE_CSV, ROOT, SCORING_MODEL, mlflow_client

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

MODEL = SCORING_MODEL


def may(tmp_path: Path) -> tuple[pd.DataFrame, Path]:
    rows = pd.read_csv(BIKE_CSV)
    rows = rows[(rows.dteday >= "2011-05-01") & (rows.dteday < "2011-06-01")].reset_index(drop=True)
    path = tmp_path / "may.csv"
    rows.to_csv(path, index=False)
    return rows, path


def pyfunc_predictions(version: str, rows: pd.DataFrame) -> pd.Series:
    with tempfile.TemporaryDirectory() as copy:  # MLflow keeps a download without dst_path
        model = mlflow.pyfunc.load_model(f"models:/{MODEL}/{version}", dst_path=copy)
        return model.predict(rows)["prediction"]


def test_scores_every_row_as_pyfunc_does_with_ids_kept_columns_and_lineage(scoring_env, tmp_path):
    rows, path = may(tmp_path)
    out = tmp_path / "scored"
    result = transform(TransformParams(model_name=MODEL, data=str(path), output=str(out)))
    champion = mlflow_client().get_model_version_by_alias(MODEL, "champion")
    assert result.version == str(champion.version) == "2"
    scored = pd.read_parquet(out).sort_values(["dteday", "hr"]).reset_index(drop=True)
    assert len(scored) == len(rows) == result.output.rows
    # default kept columns: the version's key columns
    assert list(scored.columns) == [INFERENCE_ID, "dteday", "hr", "prediction", *ADDED_COLUMNS[1:]]
    expected = pyfunc_predictions("2", rows.sort_values(["dteday", "hr"]).reset_index(drop=True))
    pd.testing.assert_series_equal(scored["prediction"], expected, check_names=False, rtol=1e-9)
    assert set(scored["model_version"]) == {"2"} and set(scored["model_name"]) == {MODEL}
    assert scored["scored_at"].nunique() == 1
    assert scored[INFERENCE_ID].is_unique
    # the same rows from a Parquet file, scored again: the same ids
    parquet = tmp_path / "may.parquet"
    rows.to_parquet(parquet, index=False)
    again = transform(
        TransformParams(model_name=MODEL, data=str(parquet), output=str(tmp_path / "again"), version="1")
    )
    assert again.version == "1"
    second = pd.read_parquet(tmp_path / "again").sort_values(["dteday", "hr"]).reset_index(drop=True)
    assert second[INFERENCE_ID].tolist() == scored[INFERENCE_ID].tolist()
    assert not (second["prediction"] == scored["prediction"]).all()  # another version, other predictions
    # lineage: one run with both datasets, the logged model and the version's tags
    run = mlflow_client().get_run(result.mlflow_run_id)
    assert run.data.tags["keel.model.version"] == "2" and run.data.tags["keel.pipeline"] == "batch-transform"
    datasets = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    assert datasets == {"data": result.input.digest[:36], "scored": result.output.digest[:36]}
    assert [m.model_id for m in run.inputs.model_inputs] == [logged_model_id(f"models:/{MODEL}/2")]
    found = mlflow_client().search_runs(
        [run.info.experiment_id],
        f"tags.`keel.pipeline` = 'batch-transform' and tags.`keel.model.name` = '{MODEL}' "
        "and tags.`keel.model.version` = '2'",
    )
    assert result.mlflow_run_id in {r.info.run_id for r in found}


def test_id_and_kept_columns_are_the_users(scoring_env, tmp_path):
    rows, path = may(tmp_path)
    out = tmp_path / "scored"
    transform(
        TransformParams(
            model_name=MODEL,
            data=str(path),
            output=str(out),
            id_columns=["instant"],
            keep_columns=["instant", "cnt"],
        )
    )
    scored = pd.read_parquet(out).sort_values("instant").reset_index(drop=True)
    assert scored[INFERENCE_ID].tolist() == rows["instant"].astype(str).tolist()
    assert scored["cnt"].tolist() == rows["cnt"].tolist()
    ids = row_ids(rows, ["dteday", "hr"])
    assert ids.is_unique and ids.str.fullmatch(r"[0-9a-f]{16}").all()


def test_a_failed_run_leaves_no_output_and_an_existing_one_is_kept(scoring_env, tmp_path, capsys):
    rows, _ = may(tmp_path)
    folder = tmp_path / "batches"
    folder.mkdir()
    rows.iloc[:300].to_csv(folder / "a.csv", index=False)
    broken = rows.iloc[300:].copy()
    broken["temp"] = "warm"  # a feature the model cannot read
    broken.to_csv(folder / "b.csv", index=False)
    out = tmp_path / "scored"
    assert main(["--model-name", MODEL, "--data", str(folder), "--output", str(out)]) == 2
    assert "column 'temp'" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".scored*"))
    # a good run, then the same output again: refused without --overwrite, replaced with it
    good = tmp_path / "good.csv"
    rows.iloc[:200].to_csv(good, index=False)
    assert main(["--model-name", MODEL, "--data", str(good), "--output", str(out)]) == 0
    before = sorted(p.name for p in out.iterdir())
    assert main(["--model-name", MODEL, "--data", str(good), "--output", str(out)]) == 2
    assert sorted(p.name for p in out.iterdir()) == before
    args = ["--model-name", MODEL, "--data", str(good), "--output", str(out), "--overwrite", "--version", "1"]
    assert main(args) == 0
    assert set(pd.read_parquet(out)["model_version"]) == {"1"}
    assert not list(tmp_path.glob(".scored*"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model-name", "no-such-model"], "no alias @champion"),
        (["--version", "9"], "no version 9"),
        (["--keep-columns", "nope"], "'nope'"),
        (["--id-columns", "nope"], "'nope'"),
        (["--keep-columns", "prediction"], "the scoring adds"),
        (["--version", "1", "--alias", "champion"], "not both"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(scoring_env, tmp_path, capsys, args, message):
    _, path = may(tmp_path)
    out = tmp_path / "scored"
    base = ["--data", str(path), "--output", str(out)]
    if "--model-name" not in args:
        base += ["--model-name", MODEL]
    try:
        code = main([*base, *args])
    except SystemExit as exc:  # refused while parsing, as argparse does
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_model_input_and_output_inside_the_data_are_refused(scoring_env, tmp_path, capsys):
    rows, _ = may(tmp_path)
    folder = tmp_path / "data"
    folder.mkdir()
    rows.drop(columns=["temp"]).to_csv(folder / "a.csv", index=False)
    assert main(["--model-name", MODEL, "--data", str(folder), "--output", str(tmp_path / "out")]) == 2
    assert "'temp'" in capsys.readouterr().err
    rows.to_csv(folder / "a.csv", index=False)
    assert main(["--model-name", MODEL, "--data", str(folder), "--output", str(folder)]) == 2
    assert "must not be the data" in capsys.readouterr().err


def test_the_monitor_checks_a_capture_with_its_own_predictions(scoring_env, tmp_path, capsys):
    _, path = may(tmp_path)
    out = tmp_path / "captured"
    transform(TransformParams(model_name=MODEL, data=str(path), output=str(out), keep_inputs=True))
    captured = monitor(MonitorParams(model_name=MODEL, batch=str(out)))
    fresh = monitor(MonitorParams(model_name=MODEL, batch=str(path)))
    scores = {c.column: c.score for c in fresh.check.verdict.columns}
    assert {c.column: c.score for c in captured.check.verdict.columns} == pytest.approx(scores)
    assert captured.check.verdict.realized == pytest.approx(fresh.check.verdict.realized)
    assert any("captured" in note for note in captured.check.notes)
    assert captured.quality.violations == fresh.quality.violations  # the added columns are no violation
    # the predictions are the capture's, not made again: changed ones change the prediction's score
    changed = pd.read_parquet(out)
    changed["prediction"] = changed["prediction"] * 3
    (tmp_path / "changed").mkdir()
    changed.to_parquet(tmp_path / "changed" / "part-00000.parquet", index=False)
    odd = monitor(MonitorParams(model_name=MODEL, batch=str(tmp_path / "changed")))
    assert odd.check.verdict.column("prediction").score != pytest.approx(scores["prediction"])
    assert odd.check.verdict.column("temp").score == pytest.approx(scores["temp"])
    # scored by v1: checked against v1, and refused against another version
    old = tmp_path / "by-v1"
    transform(
        TransformParams(model_name=MODEL, data=str(path), output=str(old), keep_inputs=True, version="1")
    )
    assert monitor(MonitorParams(model_name=MODEL, batch=str(old))).check.version == "1"
    assert monitor_main(["--model-name", MODEL, "--batch", str(old), "--version", "2"]) == 2
    assert "scored by bike-transform v1, not v2" in capsys.readouterr().err
    # a capture without the inputs cannot be checked, and says how to make one that can
    bare = tmp_path / "bare"
    transform(TransformParams(model_name=MODEL, data=str(path), output=str(bare)))
    assert monitor_main(["--model-name", MODEL, "--batch", str(bare)]) == 2
    assert "--keep-inputs" in capsys.readouterr().err


def test_pending_batches_are_scored_once_per_champion_and_input(scoring_env, tmp_path):
    rows, _ = may(tmp_path)
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    rows.iloc[:300].to_csv(inbox / "week-1.csv", index=False)
    rows.iloc[300:600].to_parquet(inbox / "week-2.parquet", index=False)
    (inbox / "notes.txt").write_text("not a batch")
    params = ScorePendingParams(model_name=MODEL, inbox=str(inbox), outbox=str(outbox))
    first = score_pending(params)
    assert first.champion == "2" and len(first.scored) == 2 and first.current == []
    out = outbox / MODEL / "week-1-csv"
    assert set(pd.read_parquet(out)["model_version"]) == {"2"} and read_record(out).rows == 300
    assert "temp" in pd.read_parquet(out).columns  # every input kept: the monitor can check it
    again = score_pending(params)
    assert again.scored == [] and sorted(again.current) == ["week-1.csv", "week-2.parquet"]
    # a changed batch is scored again, and only it
    rows.iloc[:200].to_csv(inbox / "week-1.csv", index=False)
    changed = score_pending(params)
    assert [r.input.location for r in changed.scored] == [str(inbox / "week-1.csv")]
    assert read_record(out).rows == 200
    # another champion rescores the inbox, at most --max-batches per run
    client = mlflow_client()
    client.set_registered_model_alias(MODEL, "champion", "1")
    try:
        moved = score_pending(params.model_copy(update={"max_batches": 1}))
        assert moved.champion == "1" and len(moved.scored) == 1 and moved.waiting == ["week-2.parquet"]
    finally:
        client.set_registered_model_alias(MODEL, "champion", "2")
    # a bad batch is refused, naming it, after the others were scored
    broken = rows.iloc[600:].copy()
    broken["temp"] = "warm"
    broken.to_csv(inbox / "week-3.csv", index=False)
    with pytest.raises(DataValidationError, match=r"week-3\.csv: .*column 'temp'"):
        score_pending(params)
    assert {read_record(p).model_version for p in (outbox / MODEL).iterdir()} == {"2"}
    assert not (outbox / MODEL / "week-3-csv").exists()


def test_the_inbox_and_outbox_are_folders_here_under_the_data_roots(scoring_env, tmp_path, monkeypatch):
    monkeypatch.setenv("KEEL_DATA_SCHEMES", "file,s3")
    local = str(tmp_path)
    for inbox, outbox, refused in (
        ("s3://bucket/inbox", local, "the inbox must be a folder on this machine"),
        (local, "s3://bucket/outbox", "the outbox must be a folder on this machine"),
    ):
        with pytest.raises(DataValidationError, match=refused):
            score_pending(ScorePendingParams(model_name=MODEL, inbox=inbox, outbox=outbox))
    monkeypatch.setenv("KEEL_DATA_ROOTS", str(tmp_path / "allowed"))
    with pytest.raises(DataValidationError, match="outside the allowed data roots"):
        score_pending(ScorePendingParams(model_name=MODEL, inbox=local, outbox=local))


def test_lineage_finds_what_made_a_version_and_what_used_it(scoring_env, tmp_path, capsys):
    _, path = may(tmp_path)
    scored = transform(TransformParams(model_name=MODEL, data=str(path), output=str(tmp_path / "scored")))
    client = mlflow_client()
    found = version_lineage(client, MODEL, "2")
    raw = next(d for d in found.training_data if d.name == "raw")
    assert raw.digest == content_digest(str(BIKE_CSV)) and raw.location == str(BIKE_CSV)
    assert {"train", "valid", "test"} <= {d.name for d in found.training_data}
    assert found.code["commit"] and found.execution and found.replaced == "1"
    assert {"prepare", "tune", "train", "register"} <= {s.step for s in found.steps}
    [run] = [r for r in found.scoring_runs if r.run_id == scored.mlflow_run_id]
    assert [d.digest for d in run.reads] == [scored.input.digest]
    assert [d.digest for d in run.writes] == [scored.output.digest]
    assert main_lineage(["--model", MODEL, "--version", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["scoring_runs"]
    # a dataset: who read it, who wrote it, what the executions registered
    assert main_lineage(["--dataset", str(tmp_path / "scored")]) == 0
    assert f"wrote as scored by batch-transform {scored.mlflow_run_id}" in capsys.readouterr().out
    uses = dataset_lineage(client, content_digest(str(BIKE_CSV)), str(BIKE_CSV)).uses
    assert {f"{MODEL} v1", f"{MODEL} v2"} <= {v for u in uses for v in u.registered}
    assert main_lineage(["--dataset", content_digest(str(path))[:16]]) == 0
    assert f"read as data by batch-transform {scored.mlflow_run_id}" in capsys.readouterr().out
    # bad input
    assert main_lineage(["--model", MODEL, "--version", "99"]) == 2
    assert main_lineage(["--dataset", str(tmp_path / "nothing-here")]) == 2
    assert "neither an existing file" in capsys.readouterr().err


def test_the_champion_served_over_http_answers_as_pyfunc_and_follows_the_champion(scoring_env, tmp_path):
    """deployments.serving: MLflow's scoring server on a verified copy of the champion; real HTTP
    requests against `mlflow.pyfunc`; malformed input gets a 4xx; a moved champion is served next."""
    rows, _ = may(tmp_path)
    rows = rows.iloc[:50]
    port, state = free_port(), tmp_path / "serving.json"
    temporary = tmp_path / "serving-tmp"  # where the verified copies go: one at a time, none after
    temporary.mkdir()
    server = subprocess.Popen(
        [sys.executable, "-m", "deployments.serving", "--model-name", MODEL, "--port", str(port),
         "--poll-seconds", "1", "--state-file", str(state)],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(temporary)},
    )  # fmt: skip
    copies = temporary / f"keel-process-folders-{os.getuid()}"
    url = f"http://127.0.0.1:{port}"
    client = mlflow_client()

    def served(frame: pd.DataFrame) -> list[float]:
        body = {"dataframe_split": json.loads(frame.to_json(orient="split", index=False, date_format="iso"))}
        answer = httpx.post(f"{url}/invocations", json=body, timeout=30)
        assert answer.status_code == 200, answer.text[:500]
        return [p["prediction"] for p in answer.json()["predictions"]]

    def serving(version: str) -> bool:
        try:
            return (
                json.loads(state.read_text())["version"] == version
                and httpx.get(f"{url}/ping").status_code == 200
            )
        except (OSError, ValueError, httpx.HTTPError):
            return False

    try:
        wait_until(lambda: serving("2"), 120)
        assert served(rows.iloc[:1]) == pytest.approx(pyfunc_predictions("2", rows.iloc[:1]).tolist())
        assert served(rows) == pytest.approx(pyfunc_predictions("2", rows).tolist())
        for body in (
            b"{not json",
            json.dumps(
                {"dataframe_split": json.loads(rows.drop(columns=["temp"]).to_json(orient="split"))}
            ).encode(),
            json.dumps({"dataframe_records": [{"hr": "eight"}]}).encode(),
            json.dumps({"rows": []}).encode(),
        ):
            answer = httpx.post(
                f"{url}/invocations", content=body, headers={"Content-Type": "application/json"}
            )
            assert 400 <= answer.status_code < 500, (body[:60], answer.status_code, answer.text[:300])
        client.set_registered_model_alias(MODEL, "champion", "1")  # as an approval moves it
        wait_until(lambda: serving("1"), 120)
        assert served(rows) == pytest.approx(pyfunc_predictions("1", rows).tolist())
        assert len([f for f in copies.iterdir() if f.is_dir()]) == 1, sorted(copies.iterdir())
    finally:
        client.set_registered_model_alias(MODEL, "champion", "2")
        server.terminate()
        server.wait(60)
    assert list(copies.iterdir()) == []


def test_with_a_token_the_served_model_answers_only_its_holders(scoring_env, tmp_path):
    """KEEL_SERVING_TOKEN: the token gateway answers at --port, the scoring server behind it on a
    private loopback port; with the token the answers are pyfunc's, a malformed body stays a 4xx."""
    rows, _ = may(tmp_path)
    rows = rows.iloc[:20]
    token, port, state = secrets.token_urlsafe(24), free_port(), tmp_path / "serving.json"
    server = subprocess.Popen(
        [sys.executable, "-m", "deployments.serving", "--model-name", MODEL, "--version", "1",
         "--port", str(port), "--state-file", str(state)],
        cwd=ROOT, env={**os.environ, "KEEL_SERVING_TOKEN": token},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    body = {"dataframe_split": json.loads(rows.to_json(orient="split", index=False, date_format="iso"))}
    try:
        wait_until(lambda: state.exists() and _answers(f"{url}/ping"), 120)  # the record follows /ping
        assert json.loads(state.read_text())["token_required"] is True
        assert httpx.post(f"{url}/invocations", json=body, timeout=30).status_code == 401
        auth = {"Authorization": f"Bearer {token}"}
        answer = httpx.post(f"{url}/invocations", json=body, headers=auth, timeout=30)
        assert answer.status_code == 200, answer.text[:300]
        served = [p["prediction"] for p in answer.json()["predictions"]]
        assert served == pytest.approx(pyfunc_predictions("1", rows).tolist())
        malformed = httpx.post(
            f"{url}/invocations", content=b"{not json", headers={**auth, "Content-Type": "application/json"}
        )
        assert 400 <= malformed.status_code < 500, malformed.text[:300]
    finally:
        server.terminate()
        server.wait(60)
    assert not _answers(f"{url}/ping")  # the gateway stopped with it


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.5)
