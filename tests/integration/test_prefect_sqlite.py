"""The stack's Prefect server on SQLite (`python -m infra.prefect_sqlite`) under concurrent writes:
paused runs are resumed while logs keep arriving, as when someone answers the approval form in the
UI while flows run. Unpatched, most requests here answered 503 ("database is locked")."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from infra.processes import BIN, free_port, http_ok, start, stop, wait_until
from tests.conftest import clean_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CYCLES = 40


def test_runs_resume_and_are_created_while_logs_are_written(tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    log = tmp_path / "prefect.log"
    server = start(
        [str(BIN / "python"), "-m", "infra.prefect_sqlite", "--host", "127.0.0.1", "--port", str(port)],
        log,
        env=clean_env(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false"),
    )
    done = threading.Event()
    answers: dict[str, list[int]] = {"create": [], "resume": [], "logs": []}

    def write_logs() -> None:
        with httpx.Client(base_url=api, timeout=90) as http:
            line = {"name": "x", "level": 20, "message": "m" * 200, "timestamp": "2026-12-04T10:00:00Z"}
            while not done.is_set():
                answers["logs"].append(http.post("/logs/", json=[line] * 5).status_code)

    writers = [threading.Thread(target=write_logs) for _ in range(2)]
    try:
        wait_until(lambda: http_ok(f"{api}/health"), "prefect server", 120, [server], log)
        with httpx.Client(base_url=api, timeout=90) as http:
            flow = http.post("/flows/", json={"name": "approval-under-load"}).raise_for_status().json()["id"]
            for writer in writers:
                writer.start()
            started = time.monotonic()
            for i in range(CYCLES):
                created = http.post("/flow_runs/", json={"flow_id": flow, "name": f"run-{i}"})
                answers["create"].append(created.status_code)
                if created.status_code != 201:
                    continue
                run = created.json()["id"]
                http.post(f"/flow_runs/{run}/set_state", json={"state": {"type": "RUNNING"}})
                paused = {"type": "PAUSED", "name": "Paused", "state_details": {"pause_reschedule": False}}
                http.post(f"/flow_runs/{run}/set_state", json={"state": paused})
                answers["resume"].append(http.post(f"/flow_runs/{run}/resume", json={}).status_code)
            elapsed = time.monotonic() - started
    finally:
        done.set()
        for writer in writers:
            if writer.is_alive():
                writer.join(120)
        stop([server])
    assert answers["create"] == [201] * CYCLES, answers["create"]
    assert answers["resume"] == [201] * CYCLES, answers["resume"]
    assert set(answers["logs"]) == {201}, sorted(set(answers["logs"]))
    assert len(answers["logs"]) > CYCLES, "the logs did not keep arriving while runs were resumed"
    assert elapsed < 120, f"{CYCLES} cycles took {elapsed:.0f} s: writers queued too long"
