"""Approval decisions against a real MLflow server and a real Prefect server: the command line, the
form of a paused flow run answered through Prefect's API as its UI sends it, the events, and every
decision that must be refused without changing anything."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.servers, pytest.mark.slow]


def approve(servers, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.approve", *args],
        cwd=ROOT,
        env=servers.env(KEEL_STATE_DIR=str(servers.home / "state")),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def pending_versions(servers, name: str, count: int) -> list[str]:
    """`count` new versions of `name` as a pipeline with `--approval manual` leaves them."""
    client = servers.mlflow_client()
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    experiment = client.get_experiment_by_name("approvals")
    if experiment is None:
        experiment = client.get_experiment(client.create_experiment("approvals"))
    run = client.create_run(
        experiment.experiment_id
    )  # each version's source: files of a run, as a pipeline's
    client.log_text(run.info.run_id, "a model", "model/MLmodel")
    made = [
        client.create_model_version(
            name,
            source=f"{run.info.artifact_uri}/model",
            run_id=run.info.run_id,
            tags={"approval_status": "PendingManualApproval"},
        )
        for _ in range(count)
    ]
    return [str(v.version) for v in made]


def snapshot(servers, name: str) -> tuple[dict, str | None]:
    """Every version's tags and description, and the champion: what a refused decision must not change."""
    client = servers.mlflow_client()
    versions = {
        str(v.version): (v.tags, v.description) for v in client.search_model_versions(f"name = '{name}'")
    }
    try:
        champion = str(client.get_model_version_by_alias(name, "champion").version)
    except Exception:
        champion = None
    return versions, champion


def events(servers, name: str, event: str, expected: int = 1, timeout: float = 30) -> list[dict]:
    """The events of that name about `name`'s versions, once `expected` are stored (the server
    stores events a moment after it receives them), or after `timeout`."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=servers.prefect_api, timeout=30) as http:
        while True:
            found = (
                http.post(
                    "/events/filter",
                    json={
                        "filter": {
                            "event": {"name": [event]},
                            "resource": {"id_prefix": [f"keel.model.{name}."]},
                        }
                    },
                )
                .raise_for_status()
                .json()["events"]
            )
            if len(found) >= expected or time.monotonic() > deadline:
                return found
            time.sleep(0.5)


def test_the_command_line_approves_rejects_and_refuses_illegal_decisions(servers):
    name = "approve-cli"
    v1, v2, v3 = pending_versions(servers, name, 3)
    client = servers.mlflow_client()

    done = approve(servers, name, v1, "--approve", "--reason", "card & backtest checked <b>")
    assert done.returncode == 0, done.stderr
    assert f"{name} v{v1}: PendingManualApproval -> Approved" in done.stdout and "event: " in done.stdout
    version = client.get_model_version(name, v1)
    assert version.tags["approval_status"] == "Approved"
    assert version.tags["approval.reason"] == "card & backtest checked <b>"
    assert version.tags["approval.by"] and version.tags["approval.previous_champion"] == "none"
    assert "card &amp; backtest checked &lt;b&gt;" in version.description  # escaped on the card
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1
    [event] = events(servers, name, "keel.model.approved")
    assert event["resource"]["keel.model.version"] == v1 and event["id"] == version.tags["approval.event_id"]
    assert event["payload"]["reason"] == "card & backtest checked <b>"
    assert event["payload"]["previous_champion"] is None and event["payload"]["champion"] == v1

    before = snapshot(servers, name)
    refused = {
        "the champion": ([name, v1, "--reject", "--reason", "x"], "is the champion"),
        "no reason": ([name, v2, "--approve", "--reason", "   "], "--reason is required"),
        "unknown version": ([name, "99", "--approve", "--reason", "x"], "has no version 99"),
        "not a version": ([name, "1;drop", "--approve", "--reason", "x"], "not a version number"),
        "unknown model": (["no-such-model", "1", "--approve", "--reason", "x"], "no registered model"),
        "bad model name": (["a'b", "1", "--approve", "--reason", "x"], "not a model name"),
    }
    for case, (args, message) in refused.items():
        done = approve(servers, *args)
        assert done.returncode == 2 and message in done.stderr, (case, done.stderr[-1500:])
        assert "nothing changed" in done.stderr, case
    assert snapshot(servers, name) == before

    done = approve(servers, name, v2, "--reject", "--reason", "worse on holiday weeks")
    assert done.returncode == 0, done.stderr
    assert client.get_model_version(name, v2).tags["approval_status"] == "Rejected"
    [rejected] = events(servers, name, "keel.model.rejected")
    assert rejected["payload"]["previous_champion"] == v1 and rejected["payload"]["champion"] == v1

    before = snapshot(servers, name)
    done = approve(servers, name, v2, "--approve", "--reason", "second look")
    assert done.returncode == 2 and "needs --force" in done.stderr
    assert snapshot(servers, name) == before
    done = approve(servers, name, v2, "--approve", "--reason", "second look", "--force", "--no-promote")
    assert done.returncode == 0, done.stderr
    assert client.get_model_version(name, v2).tags["approval_status"] == "Approved"
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1  # --no-promote

    done = approve(servers, name, v3, "--approve", "--reason", "newest")
    assert done.returncode == 0, done.stderr
    assert str(client.get_model_version_by_alias(name, "champion").version) == v3
    assert client.get_model_version(name, v3).tags["approval.previous_champion"] == v1
    assert "## Approval decisions" in client.get_model_version(name, v3).description


def paused_run(servers, name: str, timeout: float = 120) -> dict:
    """The await-approval flow run of `name` once it is paused with its form."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=servers.prefect_api, timeout=30) as http:
        while True:
            runs = http.post(
                "/flow_runs/filter",
                json={"flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}, "limit": 50},
            ).json()
            mine = [r for r in runs if r["parameters"]["params"]["model_name"] == name]
            if mine and mine[0]["state"]["state_details"].get("run_input_keyset"):
                return mine[0]
            assert time.monotonic() < deadline, "no paused await-approval run"
            time.sleep(0.5)


def resume(http: httpx.Client, run_id: str, answer: dict) -> None:
    """What the UI sends on "Resume"; the server must accept it. A server error (5xx) is sent again
    once, as the UI's user would click again: in one loaded run of this suite the server answered
    this request with a JSON body without a status (its code and body were not kept then)."""
    response = http.post(f"/flow_runs/{run_id}/resume", json={"run_input": answer})
    if response.status_code >= 500:
        print(f"resume answered {response.status_code}: {response.text[:2000]}; sending it again")
        time.sleep(1)
        response = http.post(f"/flow_runs/{run_id}/resume", json={"run_input": answer})
    assert response.status_code == 201 and response.json()["status"] == "ACCEPT", response.text


def test_the_form_in_prefects_ui_decides_as_the_command_line_does(servers):
    name = "approve-form"
    [version] = pending_versions(servers, name, 1)
    waiting = subprocess.Popen(
        [sys.executable, "-m", "flows.approve", name, version, "--wait", "--timeout-minutes", "5"],
        cwd=ROOT,
        env=servers.env(KEEL_STATE_DIR=str(servers.home / "state")),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        run = paused_run(servers, name)
        keyset = run["state"]["state_details"]["run_input_keyset"]
        with httpx.Client(base_url=servers.prefect_api, timeout=30) as http:
            # what the UI reads to draw the form, then what it sends on "Resume"
            schema = http.get(f"/flow_runs/{run['id']}/input/{keyset['schema']}").raise_for_status().json()
            assert set(schema["properties"]) >= {"decision", "reason", "decided_by", "promote"}
            assert "description" in keyset
            answer = {"decision": "approve", "reason": " ", "decided_by": "Ann", "promote": True}
            resume(http, run["id"], answer)
            again = paused_run(servers, name)  # a refused answer (a blank reason) asks again, saying why
            assert again["id"] == run["id"]
            description = http.get(
                f"/flow_runs/{run['id']}/input/{again['state']['state_details']['run_input_keyset']['description']}"
            ).json()
            assert "refused" in description and "--reason is required" in description
            assert servers.mlflow_client().get_model_version(name, version).tags["approval_status"] == (
                "PendingManualApproval"
            )
            answer["reason"] = "checked in the UI"
            resume(http, run["id"], answer)
        out, err = waiting.communicate(timeout=120)
        assert "PendingManualApproval -> Approved by Ann" in out
    finally:
        waiting.kill()
    assert waiting.returncode == 0, err[-2000:]
    client = servers.mlflow_client()
    decided = client.get_model_version(name, version)
    assert decided.tags["approval_status"] == "Approved"
    assert decided.tags["approval.by"].startswith("Ann (Prefect UI, flow run ")
    assert decided.tags["approval.reason"] == "checked in the UI"
    assert str(client.get_model_version_by_alias(name, "champion").version) == version
    [event] = events(servers, name, "keel.model.approved")
    assert event["payload"]["decided_by"] == decided.tags["approval.by"]
    with httpx.Client(base_url=servers.prefect_api, timeout=30) as http:
        assert http.get(f"/flow_runs/{run['id']}").json()["state"]["type"] == "COMPLETED"


def test_a_form_nobody_answers_leaves_the_version_pending_and_says_so(servers):
    name = "approve-timeout"
    [version] = pending_versions(servers, name, 1)
    done = approve(servers, name, version, "--wait", "--timeout-minutes", "0.1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "timed-out (PendingManualApproval)" in done.stdout
    tags = servers.mlflow_client().get_model_version(name, version).tags
    assert tags["approval_status"] == "PendingManualApproval"
    assert "stays PendingManualApproval" in tags["approval.waiting"]
    assert events(servers, name, "keel.model.approved", timeout=3) == []

    refused = approve(servers, name, "7", "--wait")
    assert refused.returncode == 2 and "has no version 7" in refused.stderr
