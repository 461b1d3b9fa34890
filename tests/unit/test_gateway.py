"""The token gateway in front of the model server (deployments/gateway.py), over real HTTP on loopback:
who is refused and how; and serving refuses an address beyond loopback without a token. The answers
of a real scoring server through it are in tests/integration/test_transform.py."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time

import httpx
import pytest

from deployments.gateway import MIN_TOKEN_CHARS, TOKEN_VARIABLE, token_from_env
from deployments.serving import main as serving_main
from infra.processes import free_port
from tests.conftest import ROOT, clean_env

TOKEN = secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def gateway():
    """The gateway as its own process, in front of a port where nothing listens."""
    port, upstream = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "deployments.gateway", "--upstream", f"http://127.0.0.1:{upstream}",
         "--port", str(port), "--max-body-mb", "0.01"],
        cwd=ROOT, env=clean_env(**{TOKEN_VARIABLE: TOKEN}),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"{url}/ping", timeout=2)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline and process.poll() is None, "the gateway did not start"
            time.sleep(0.2)
    yield url
    process.terminate()
    process.wait(30)


@pytest.mark.parametrize(
    "header", [None, "Bearer wrong-token-of-some-length", f"Basic {TOKEN}", f"Bearer {TOKEN}x"]
)
def test_no_token_or_a_wrong_one_is_refused_with_401(gateway, header):
    headers = {"Authorization": header} if header else {}
    answer = httpx.post(f"{gateway}/invocations", json={"dataframe_records": []}, headers=headers)
    assert answer.status_code == 401 and answer.headers["www-authenticate"].startswith("Bearer")
    assert answer.json()["error_code"] == "UNAUTHENTICATED"


def test_with_the_token_a_body_too_large_is_413_and_no_model_is_503(gateway):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    large = httpx.post(f"{gateway}/invocations", content=b"x" * 20_000, headers=auth)
    assert large.status_code == 413
    answer = httpx.post(f"{gateway}/invocations", json={"dataframe_records": []}, headers=auth)
    assert answer.status_code == 503 and "no model is served" in answer.json()["message"]
    assert httpx.get(f"{gateway}/ping").status_code == 503  # probes need no token
    assert httpx.get(f"{gateway}/version").status_code == 404
    assert httpx.get(f"{gateway}/invocations").status_code == 405


def test_a_short_token_is_refused(monkeypatch):
    monkeypatch.setenv(TOKEN_VARIABLE, "x" * (MIN_TOKEN_CHARS - 1))
    with pytest.raises(ValueError, match="too short"):
        token_from_env()
    monkeypatch.delenv(TOKEN_VARIABLE)
    assert token_from_env() is None


def test_serving_beyond_loopback_without_a_token_exits_2(monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_VARIABLE, raising=False)
    with pytest.raises(SystemExit) as stopped:
        serving_main(["--model-name", "any-model", "--host", "0.0.0.0"])
    assert stopped.value.code == 2
    assert "authenticates nobody: set KEEL_SERVING_TOKEN" in capsys.readouterr().err
    assert os.environ.get(TOKEN_VARIABLE) is None
