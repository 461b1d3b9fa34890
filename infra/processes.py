"""Start real servers on 127.0.0.1 and stop them by PID: shared by `infra.stack` and the tests."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from http import HTTPStatus
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if absent): one process at a time gets in."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pid_running(pid: int) -> bool:
    """Whether process `pid` runs on this machine (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return True


def start(
    args: list[str], log: Path, env: dict[str, str] | None = None, append: bool = False
) -> subprocess.Popen:
    """Start a process in its own process group (so stopping it stops its children), logging to `log`."""
    handle = log.open("ab" if append else "wb")
    return subprocess.Popen(
        args,
        stdout=handle,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )


def wait_until(
    ready: Callable[[], bool],
    what: str,
    timeout: float,
    procs: list[subprocess.Popen],
    log: Path | None,
) -> None:
    """Poll `ready` until it is true; fail with the end of `log` if a process exits or time runs out."""
    tail = (lambda: f":\n{log.read_text()[-3000:]}") if log else (lambda: "")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}{tail()}")
        try:
            if ready():
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout}s{tail()}")


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def http_ok(url: str, json_body: str | None = None, timeout: float = 2) -> bool:
    """Whether `url` answers 200 (raises while nothing answers); with `json_body`, to a POST of it.
    A server on this machine is asked directly: a proxy from the environment (`HTTP_PROXY` without
    `NO_PROXY`) would answer for it, or not at all; other URLs go as the environment says."""
    host = urllib.parse.urlsplit(url).hostname or ""
    opener = _DIRECT if host in _LOOPBACK else urllib.request.build_opener()
    data = None if json_body is None else json_body.encode()
    headers = {} if data is None else {"Content-Type": "application/json"}
    with opener.open(urllib.request.Request(url, data=data, headers=headers), timeout=timeout) as response:
        return bool(response.status == HTTPStatus.OK)


def loopback_ok(url: str) -> bool:
    """`http_ok` for a server on this machine that may not be up yet: False while it does not answer."""
    try:
        return http_ok(url)
    except OSError:
        return False


def stop(procs: list[subprocess.Popen], timeout: float = 20) -> None:
    """SIGTERM each process group by PID, then SIGKILL whatever is left."""
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
