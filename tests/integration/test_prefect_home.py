"""A new Prefect home starts from the migrated template (`infra.prefect_home`): built by a real
Prefect server, copied only where there is no database, and a server runs flows on the copy."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest

from infra import prefect_home
from tests.conftest import ROOT, clean_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FLOW = """
from prefect import flow

@flow(name="seeded-home")
def hello() -> str:
    return "ran"

print(hello())
"""


def test_the_template_seeds_new_homes_only_and_prefect_runs_on_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    template = prefect_home.build_template()
    assert template == prefect_home.template_path() and template.is_relative_to(tmp_path / "cache")
    with sqlite3.connect(template) as db:
        assert db.execute("select count(*) from alembic_version").fetchone()[0] == 1
        assert db.execute("select count(*) from flow_run").fetchone()[0] == 0
    db.close()

    home = tmp_path / "home"
    assert prefect_home.seed_new_home(home / "prefect.db")
    assert (home / "prefect.db").read_bytes() == template.read_bytes()
    assert not list(home.glob(".seed-*"))  # no partial copy left behind

    existing = tmp_path / "other" / "prefect.db"
    existing.parent.mkdir()
    existing.write_bytes(b"a database of its own")
    assert not prefect_home.seed_new_home(existing)
    assert existing.read_bytes() == b"a database of its own"

    env = clean_env(PREFECT_HOME=str(home), XDG_CACHE_HOME=str(tmp_path / "cache"))
    done = subprocess.run(
        [sys.executable, "-c", FLOW],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0 and "ran" in done.stdout, done.stderr[-2000:]
    with sqlite3.connect(home / "prefect.db") as db:
        assert db.execute("select count(*) from flow_run").fetchone()[0] == 1


def test_without_a_template_nothing_is_copied(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    assert not prefect_home.seed_new_home(tmp_path / "home" / "prefect.db")
    assert not (tmp_path / "home" / "prefect.db").exists()


SERVER = """
import os, sys
from infra import temporary_server
temporary_server._launch(dict(os.environ), early=True)
try:
    url = temporary_server._server.wait_until_ready(120)
    import httpx
    print(httpx.post(url + "/flows/", json={"name": f"side-by-side-{os.getpid()}"}, timeout=30).status_code)
finally:
    temporary_server._server.stop()
"""


def test_without_a_template_servers_side_by_side_on_a_new_home_wait_for_the_first(tmp_path):
    """Four temporary servers start at once on one new home with no template: one creates and
    migrates the database, the others wait for it and all answer. Left to Prefect, each migrated
    the new database and one in nine failed ("Online migration expected to match one row")."""
    env = clean_env(PREFECT_HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "empty-cache"))
    servers = [
        subprocess.Popen(
            [sys.executable, "-c", SERVER], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]  # fmt: skip
    for server in servers:
        out, err = server.communicate(timeout=300)
        assert server.returncode == 0 and out.strip() == "201", err[-3000:]
    with sqlite3.connect(tmp_path / "home" / "prefect.db") as db:
        assert db.execute("select count(*) from flow").fetchone()[0] == 4
    db.close()
