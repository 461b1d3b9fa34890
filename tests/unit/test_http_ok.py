"""Health checks of servers on this machine never go through a proxy from the environment."""

from __future__ import annotations

import http.server
import threading
import urllib.error
from collections.abc import Iterator

import pytest

from infra.processes import free_port, http_ok, loopback_ok


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def dead_proxy(monkeypatch: pytest.MonkeyPatch) -> str:
    """A proxy that nothing answers on, in the environment, and no NO_PROXY."""
    proxy = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(name, proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    return proxy


def test_a_loopback_server_is_asked_directly_whatever_the_proxy(server: str, dead_proxy: str) -> None:
    assert http_ok(f"{server}/health")
    assert loopback_ok(f"{server}/health")
    assert not loopback_ok(f"{server}/missing")
    assert http_ok(f"{server.replace('127.0.0.1', 'localhost')}/health")


def test_other_urls_go_through_the_proxy_the_environment_names(dead_proxy: str) -> None:
    # 192.0.2.1 (TEST-NET-1) is never asked: the request goes to the dead proxy, which refuses it.
    with pytest.raises(urllib.error.URLError, match="refused"):
        http_ok("http://192.0.2.1/health")


def test_nothing_answering_is_false_not_an_error() -> None:
    assert not loopback_ok(f"http://127.0.0.1:{free_port()}/health")
