"""A run without `PREFECT_API_URL` starts its own temporary Prefect server (`infra.temporary_server`)
at its start: real runs of `python -m tests.pool_pipeline` as new processes, on new Prefect homes;
the server process on its own: started late, and declining where Prefect's settings name a server."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from infra import prefect_home
from infra.processes import pid_running
from infra.temporary_server import WARM_UP
from tests.conftest import ROOT, clean_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def run(tmp_path: Path, home: Path, data: Path, **env: str) -> dict[str, str]:
    done = subprocess.run(
        [sys.executable, "-m", "tests.pool_pipeline", "--data", str(data)],
        cwd=ROOT,
        env=clean_env(PREFECT_HOME=str(home), KEEL_STATE_DIR=str(tmp_path / ".keel"), **env),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Starting temporary server on" in done.stderr, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def answers(url: str) -> bool:
    where = urlsplit(url)
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((where.hostname, where.port)) == 0


def rows(database: Path, query: str) -> list[tuple]:
    with sqlite3.connect(database) as db:
        found = db.execute(query).fetchall()
    db.close()
    return found


def test_the_run_records_to_its_own_server_which_is_gone_with_it(tmp_path):
    data = tmp_path / "small.csv"
    data.write_text("a\n1\n")
    home = tmp_path / "prefect-home"
    result = run(tmp_path, home, data)

    assert result["prefect_api_url"].startswith("http://127.0.0.1:")
    assert not answers(result["prefect_api_url"])  # stopped with the process
    assert result["preloaded"] == "True"  # the step's `preload` was imported while the server started
    assert result["server_started_early"] == "True"  # by the `__main__` block, before the imports
    # The collector, paused while the command imported, runs again in the flow; the imports are frozen.
    assert result["collector_enabled"] == "True"
    assert int(result["collector_frozen"]) > 100_000
    database = home / "prefect.db"
    [(state,)] = rows(database, f"select state_type from flow_run where id = '{result['flow_run_id']}'")
    assert state == "COMPLETED"
    # sent before the server stopped: the run's last log line
    finished = rows(database, "select message from log where message like 'Finished in state Completed%'")
    assert finished, "the flow run's last log lines never reached the server"
    # No flow-run heartbeats: nothing reads them on a server that ends with the run.
    assert result["heartbeat_seconds"] == "None"
    assert rows(database, HEARTBEATS) == [(0,)]


HEARTBEATS = "select count(*) from events where event = 'prefect.flow-run.heartbeat'"


def test_heartbeats_the_user_asks_for_are_sent(tmp_path):
    data = tmp_path / "small.csv"
    data.write_text("a\n1\n")
    home = tmp_path / "prefect-home"
    result = run(tmp_path, home, data, PREFECT_FLOWS_HEARTBEAT_FREQUENCY="30")

    assert result["heartbeat_seconds"] == "30"
    assert rows(home / "prefect.db", HEARTBEATS) == [(1,)]  # the first, as the flow run starts


def test_a_seeded_home_does_not_register_block_types_again(tmp_path):
    template = prefect_home.template_path()
    if not template.is_file():
        pytest.skip(f"no template ({template}): `make install` builds it")
    data = tmp_path / "small.csv"
    data.write_text("a\n1\n")
    home = tmp_path / "prefect-home"
    registered = "select count(*), max(updated) from block_type"  # registering updates every row
    [(count, updated)] = rows(template, registered)

    run(tmp_path, home, data)
    assert count > 0 and rows(home / "prefect.db", registered) == [(count, updated)]


def server_process(tmp_path: Path, code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=clean_env(PREFECT_HOME=str(tmp_path / "prefect-home"), **env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_a_run_that_is_killed_takes_its_server_with_it(tmp_path):
    """SIGKILL leaves no exit handler to stop the server: it notices that its run ended (end of
    file on the pipe the run holds) and stops."""
    code = (
        "import sys\n"
        "from infra.temporary_server import start_temporary_server as start\n"
        "server = start(); url = server.wait_until_ready(120)\n"
        "print(url, server.process.pid, flush=True); sys.stdin.read()"
    )
    run = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=clean_env(PREFECT_HOME=str(tmp_path / "prefect-home")),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url, pid = run.stdout.readline().split()
        assert answers(url)
        run.kill()
        run.wait()
        assert wait_for(lambda: not answers(url) and not pid_running(int(pid)), 30), (
            "the server outlived its run"
        )
    finally:
        run.kill()


def test_ctrl_c_ends_a_run_in_seconds_and_its_server_with_it(tmp_path):
    """A terminal's Ctrl-C reaches the whole foreground process group; the server, in a session of
    its own, stays up while the run records how it ended, then stops with it (when it was in the
    run's group it stopped first, and the run retried it for 3-4 minutes)."""
    log = tmp_path / "run.log"
    # As in a terminal, whatever this test runs under: a shell's background job (`cmd &`) ignores
    # SIGINT, and an ignored signal stays ignored in every process started from it (a handled one
    # is reset to the default).
    ignored = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        run = subprocess.Popen(
            [sys.executable, "-m", "flows.pipeline"],
            cwd=ROOT,
            env=clean_env(
                PREFECT_HOME=str(tmp_path / "prefect-home"), KEEL_STATE_DIR=str(tmp_path / ".keel")
            ),
            stdin=subprocess.DEVNULL,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal's foreground group, of its own
        )
    finally:
        signal.signal(signal.SIGINT, ignored)
    try:
        assert wait_for(lambda: "Beginning flow run" in log.read_text(), 300), log.read_text()[-3000:]
        url = re.search(r"Starting temporary server on (http://\S+)", log.read_text()).group(1)
        time.sleep(2)
        started = time.monotonic()
        for _ in range(3):
            # An interrupt is now and then lost (Python drops one that lands in a garbage-collector
            # callback, and Dask installs one): with no sign of it after 3 s, a user presses Ctrl-C
            # again, before the run finishes by itself.
            os.killpg(run.pid, signal.SIGINT)
            if wait_for(lambda: run.poll() is not None or "by an interrupt signal" in log.read_text(), 3):
                break
        run.wait(120)
        assert time.monotonic() - started < 60, log.read_text()[-3000:]
        assert run.returncode != 0 and wait_for(lambda: not answers(url), 30)
        assert "Connection refused" not in log.read_text(), log.read_text()[-3000:]
        [(state,)] = rows(tmp_path / "prefect-home" / "prefect.db", "select state_type from flow_run")
        assert state == "CRASHED"  # recorded by the run, on its server, as it ended
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)


def test_a_process_that_did_not_start_it_early_starts_it_when_asked_and_stops_it(tmp_path):
    code = (
        "from infra.temporary_server import start_temporary_server as start\n"
        "server = start(); url = server.wait_until_ready(120); server.stop()\n"
        "print(url, server.early, server.process.returncode)"
    )
    done = server_process(tmp_path, code)
    assert done.returncode == 0, done.stderr[-3000:]
    url, early, code = done.stdout.split()
    assert url.startswith("http://127.0.0.1:") and url.endswith("/api") and early == "False"
    assert code != "None" and not answers(url)


def test_the_server_asks_itself_what_a_run_asks_first_and_writes_nothing(tmp_path):
    """`warm_up` asks each path of `WARM_UP` once the server is up: each must answer 200 on this
    Prefect (a path it has dropped would be skipped quietly, and the run would pay again), and none
    may leave a flow, a flow run or a task run in the user's database."""
    code = (
        "import time\n"
        "from infra.processes import http_ok\n"
        "from infra.temporary_server import WARM_UP, start_temporary_server as start\n"
        "server = start(); url = server.wait_until_ready(120)\n"
        "print([http_ok(url + path, json_body=body) for path, body in WARM_UP])\n"
        "time.sleep(1); server.stop()\n"
    )
    done = server_process(tmp_path, code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[0] == str([True] * len(WARM_UP))
    database = tmp_path / "prefect-home" / "prefect.db"
    for table in ("flow", "flow_run", "task_run"):
        assert rows(database, f"select count(*) from {table}") == [(0,)], table


def test_where_prefect_names_a_server_or_forbids_temporary_ones_the_server_process_declines(tmp_path):
    """It reads Prefect's settings as the run would, profiles included (the run checks only its
    environment before starting it), and exits at once without a database in the home."""
    forbidden = tmp_path / "profiles.toml"
    forbidden.write_text(
        'active = "strict"\n[profiles.strict]\nPREFECT_SERVER_ALLOW_EPHEMERAL_MODE = "false"\n'
    )
    code = "from infra.temporary_server import serve; serve()"
    for env, reason in (
        ({"PREFECT_API_URL": "http://127.0.0.1:9/api"}, "PREFECT_API_URL is set"),
        ({"PREFECT_PROFILES_PATH": str(forbidden)}, "temporary servers are disallowed"),
    ):
        done = server_process(tmp_path, code, **env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert reason in json.loads(done.stdout)["declined"]
    assert not (tmp_path / "prefect-home" / "prefect.db").exists()  # no database seeded or created
