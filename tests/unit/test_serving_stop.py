"""Stopping a scoring server frees its port before the next version starts (deployments/serving.py).

`mlflow models serve` is a parent that exits at once on SIGTERM and a child (`uvicorn`) that still
answers for a moment while it shuts down. Reproduced here with real processes of the same shape: a
version served next must never be reported while the old server still answers, then vanishes (the
cause of a `Connection refused` in CI)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from deployments.serving import answers, stop_server
from infra.processes import free_port

# The child: listens, and on SIGTERM keeps answering for 1.5 s before it closes (uvicorn's shutdown
# takes less, but any delay is the same race).
CHILD = textwrap.dedent(
    """
    import signal, socket, sys, threading, time
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", int(sys.argv[1])))
    sock.listen()
    closing = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: closing.set())
    threading.Thread(target=lambda: [sock.accept()[0].close() for _ in iter(int, 1)], daemon=True).start()
    while not closing.is_set():
        time.sleep(0.05)
    time.sleep(1.5)
    """
)
# The parent: starts the child and dies on SIGTERM (the default action), as MLflow's CLI does.
PARENT = "import subprocess, sys; subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]]).wait()"


def started(port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(port)], start_new_session=True)
    deadline = time.monotonic() + 30
    while not answers(port):
        assert time.monotonic() < deadline and server.poll() is None, "the child did not listen"
        time.sleep(0.05)
    return server


def test_stopping_waits_until_the_port_no_longer_answers():
    port = free_port()
    server = started(port)
    stop_server(server, port)
    assert server.poll() is not None
    assert not answers(port), "the old server's child still answers after stop_server returned"


def test_without_the_port_the_parent_alone_is_waited_for():
    """The behaviour the fix replaced, kept visible: the parent is gone while its child still answers
    (if this ever fails, the shape of the reproduction changed, not the fix)."""
    port = free_port()
    server = started(port)
    try:
        stop_server(server)
        assert answers(port)
    finally:
        deadline = time.monotonic() + 10
        while answers(port) and time.monotonic() < deadline:
            time.sleep(0.1)
