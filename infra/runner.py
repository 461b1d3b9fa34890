"""The warm pool's runner: a process with the libraries already imported that runs commands for
others, so a run in the pool does not spend its first seconds importing Prefect, MLflow, pandas...

    KEEL_WARM_POOL=10m python -m flows.monitor ...   # handed to the runner when the pool has one

A new Python process spends 4-5 s importing what a run needs before it does anything (issue 17). The
runner imports it once, then for each command forks: the child takes the caller's standard streams
(passed over the socket), working directory, environment and arguments, and runs the module as
`python -m` would; the caller waits, forwards its signals, and exits with the child's exit code. The
command runs the same code as without the runner; only the imports are already done.

What it takes, and when it says no (the caller then runs the command itself, as before):
- Only its own user: a Unix socket in a private folder (0700), and the peer's uid checked on both
  sides. The socket's path is in the pool's `runner-socket` file (0600).
- Only a caller whose interpreter, module path (`sys.path`), interpreter flags and options (`-O`,
  `-W`, `-X`...) and the environment libraries read when loaded (`OMP_*`, `LD_*`, `PYTHON*`,
  locale...) are the runner's.
- Not while the project code it imported is older than the files on disk: it restarts itself (same
  PID) and takes commands again once imported.
- It learns: a run in the pool tells it at exit which modules it imported; the runner imports those
  it has not (never one that starts a thread: forking a process with threads is unsafe; checked
  before every fork).
What a library read from the environment when imported is read again in the child: Prefect's
settings and logging, Dask's config, the temporary folder, the time zone; numpy's global random state
is seeded anew (Python's `random` is by the fork itself).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec

SOCKET_FILE = "runner-socket"  # in the pool's folder: the path of the runner's socket
FOLDER_PREFIX = "keel-runner-"  # the runner's private folder in the temporary folder, with its socket
# Environment variables that libraries read when they are loaded: a caller whose values differ from
# the runner's runs on its own.
LOAD_TIME_PREFIXES = ("PYTHON", "LD_", "OMP_", "OPENBLAS_", "MKL_", "MALLOC_", "ARROW_", "LC_", "LANG")
STD_STREAMS = (0, 1, 2)
# The caller's signals and what the command gets for each. Ctrl-Z and `fg` stop and continue the
# command with its caller: the command's process group has no parent in its session, so the kernel
# would discard a SIGTSTP sent to it; it gets SIGSTOP.
FORWARDED_SIGNALS = {
    signal.SIGINT: signal.SIGINT,
    signal.SIGTERM: signal.SIGTERM,
    signal.SIGHUP: signal.SIGHUP,
    signal.SIGTSTP: signal.SIGSTOP,
    signal.SIGCONT: signal.SIGCONT,
}
INSIDE = False  # True in a command the runner runs: it does not hand itself off again
STALE = "the project's code changed since the runner imported it; it restarts"
_HEADER = struct.Struct("!I")


# -- the caller's side (standard library only: it runs before any heavy import) ------------------


def hand_off(spec: ModuleSpec | None) -> None:
    """Run this process's command (`python -m <spec.name>`) in the warm pool's runner and exit with
    its exit code; return if there is no runner or it declines (the caller then runs it itself).
    Call it first thing under `if __name__ == "__main__":` with the module's `__spec__`."""
    if INSIDE or spec is None or not os.environ.get("KEEL_WARM_POOL"):
        return
    fds = [fd for fd in STD_STREAMS if _is_open(fd)]
    if len(fds) != len(STD_STREAMS):
        return
    try:
        sock = _connect(default_home(), timeout=5)
    except FileNotFoundError:  # no runner (or one restarting): run here
        return
    except OSError as exc:  # a runner registered but not answering: say so, run here
        print(f"warm pool runner: not answering ({exc}); running here", file=sys.stderr)
        return
    request = {"kind": "run", "module": spec.name, **caller_identity()}
    request.update(argv=sys.argv, cwd=os.getcwd(), env=dict(os.environ))
    message = _framed(request)
    try:
        sent = socket.send_fds(sock, [message], fds)
        if sent < len(message):  # never an empty send: a runner that already declined has closed
            sock.sendall(message[sent:])
    except OSError as exc:  # the request did not arrive whole (the runner drops it): run here
        print(f"warm pool runner: the command could not be sent ({exc}); running here", file=sys.stderr)
        sock.close()
        return
    # From here on the runner may be running the command: it never runs here as well.
    sock.settimeout(None)  # the runner may first be importing what a run taught it
    reader = sock.makefile("rb")
    try:
        first = json.loads(reader.readline() or b"{}")
    except (OSError, ValueError):
        first = {}
    if "pid" not in first:  # declined, or the runner ended before starting it
        print(f"warm pool runner: {first.get('declined', 'no answer')}; running here", file=sys.stderr)
        sock.close()
        return
    os._exit(_wait_for(sock, reader))


def _wait_for(sock: socket.socket, reader) -> int:
    """Forward this process's signals to the command until its exit code arrives."""

    def forward(signum: int, _frame) -> None:
        sock.sendall(json.dumps({"signal": signum}).encode() + b"\n")

    def suspend(signum: int, frame) -> None:
        forward(signum, frame)  # the command stops first, then this process, as the shell expects
        os.kill(os.getpid(), signal.SIGSTOP)  # SIGCONT (`fg`) continues both

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, suspend if signum == signal.SIGTSTP else forward)
    while True:
        try:
            line = reader.readline()
        except InterruptedError:
            continue
        if not line:
            print("warm pool runner: the command ended without an exit status", file=sys.stderr)
            return 1
        code = json.loads(line).get("exit")
        if code is not None:
            return int(code) if code >= 0 else 128 - int(code)


def caller_identity() -> dict:
    """What a command's process must share with the runner to run there."""
    return {
        "executable": sys.executable,
        "path": sys.path,
        "flags": repr(sys.flags),
        "options": {"-W": sys.warnoptions, "-X": {k: str(v) for k, v in sys._xoptions.items()}},
        "load_env": {k: v for k, v in os.environ.items() if k.startswith(LOAD_TIME_PREFIXES)},
    }


def learn(pool: Path, modules: list[str]) -> None:
    """Tell the pool's runner, if any, which modules a run imported (it imports those it has not)."""
    with contextlib.suppress(OSError), _connect(pool, timeout=2) as sock:
        sock.sendall(_framed({"kind": "learn", "modules": modules}))


def default_home() -> Path:
    """The pool of the state directory runs use (`KEEL_STATE_DIR`, default `.keel`)."""
    return Path(os.environ.get("KEEL_STATE_DIR") or ".keel") / "pool"


def _connect(pool: Path, timeout: float) -> socket.socket:
    """A connection to the pool's runner, whose process must be this user's (OSError otherwise)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((pool / SOCKET_FILE).read_text().strip())
        if _peer_uid(sock) != os.getuid():
            raise OSError("the runner's socket belongs to another user")
    except OSError:
        sock.close()
        raise
    return sock


def _framed(message: dict) -> bytes:
    payload = json.dumps(message).encode()
    return _HEADER.pack(len(payload)) + payload


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _peer_uid(sock: socket.socket) -> int:
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return uid


# -- the runner ---------------------------------------------------------------------------------


class Runner:
    """Imports modules once; forks a child per command. Single-threaded on purpose."""

    def __init__(self, pool: Path, preload: list[str]) -> None:
        self.pool = pool.resolve()
        self.preload = list(preload)
        self.identity = caller_identity()
        self.root = Path.cwd().resolve()
        self.skipped: set[str] = set()
        self.loaded_ns = 0
        self.listener: socket.socket | None = None
        self.cleanup = lambda: None

    def serve(self) -> None:
        """Import, then take commands until SIGTERM."""
        from infra.secrets import write_private

        listener, path = self._listen()
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        self.loaded_ns = time.time_ns()
        self.import_all(self.preload)
        write_private(self.pool / SOCKET_FILE, str(path).encode())
        print(f"runner: taking commands on {path} ({len(sys.modules)} modules loaded)", flush=True)
        while True:
            _reap_children()
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                restart = self.handle(conn)
            if restart:
                self.restart()

    def _listen(self) -> tuple[socket.socket, Path]:
        """The socket, in a private folder removed at exit (with the pool's pointer to it)."""
        import tempfile

        _remove_dead_socket(self.pool)
        folder = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX))  # 0700; short: socket paths are limited
        path = folder / "socket"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(64)
        listener.settimeout(1.0)

        def cleanup() -> None:
            listener.close()
            path.unlink(missing_ok=True)
            if folder.exists():
                folder.rmdir()
            socket_file = self.pool / SOCKET_FILE
            if socket_file.exists() and socket_file.read_text().strip() == str(path):
                socket_file.unlink()

        self.listener, self.cleanup = listener, cleanup
        atexit.register(cleanup)
        return listener, path

    def handle(self, conn: socket.socket) -> bool:
        """One connection: a command to run or modules to learn. True: the runner must restart."""
        conn.settimeout(10)
        if _peer_uid(conn) != os.getuid():
            return False
        try:
            request, fds = _read_request(conn)
        except (OSError, ValueError) as exc:
            print(f"runner: bad request: {exc}", flush=True)
            return False
        try:
            if request.get("kind") == "learn":
                conn.close()
                self.import_all([m for m in request.get("modules", []) if isinstance(m, str)])
            elif request.get("kind") == "run":
                return self.run(conn, request, fds)
            return False
        finally:
            for fd in fds:
                os.close(fd)

    def import_all(self, modules: list[str]) -> None:
        """Import what is not loaded yet, in the order given; a module that starts a thread is noted
        and the runner restarts without it (a process with threads must not fork)."""
        import importlib
        import threading

        for name in modules:
            if name in sys.modules or name in self.skipped or name.startswith("__main__"):
                continue
            try:
                importlib.import_module(name)
            except Exception:  # a module that does not import here is not preloaded
                self.skipped.add(name)
                continue
            if threading.active_count() > 1:
                print(f"runner: importing {name} started a thread; restarting without it", flush=True)
                self.skipped.add(name)
                self.restart()

    def run(self, conn: socket.socket, request: dict, fds: list[int]) -> bool:
        """Fork the command's supervisor and child, or decline; True: the runner must restart."""
        import threading

        why = self.declines(request, fds)
        if why is None and threading.active_count() > 1:
            why = "the runner has threads"
        if why is not None:
            conn.sendall(json.dumps({"declined": why}).encode() + b"\n")
            return why == STALE
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:  # the command's supervisor: it reports the exit code
            os.setsid()  # stopping the pool (its process group) never stops a running command
            atexit.unregister(self.cleanup)  # the runner's socket is the runner's to remove
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            if self.listener is not None:
                self.listener.close()
            child = os.fork()
            if child == 0:
                try:
                    _become_command(request, fds)
                finally:
                    os._exit(1)  # never back into the runner's loop
            conn.settimeout(None)
            try:
                conn.sendall(json.dumps({"pid": child}).encode() + b"\n")
            except OSError:  # the caller is gone before it heard of the command: stop it
                os.kill(child, signal.SIGTERM)
                os.waitpid(child, 0)
                os._exit(0)
            try:
                code = _supervise(conn, child)
                conn.sendall(json.dumps({"exit": code}).encode() + b"\n")
            finally:
                os._exit(0)
        return False

    def declines(self, request: dict, fds: list[int]) -> str | None:
        """Why this command cannot run here (None: it can)."""
        if len(fds) != len(STD_STREAMS):
            return "the caller's standard streams did not arrive"
        for key in ("executable", "path", "flags", "options", "load_env"):
            if request.get(key) != self.identity[key]:
                return f"the caller's {key} differs from the runner's"
        module = request.get("module")
        if not isinstance(module, str) or not _dotted(module):
            return "no module named"
        if self.stale():
            return STALE
        return None

    def stale(self) -> bool:
        """Whether a file of the project the runner imported changed after it was imported."""
        prefix = Path(sys.prefix).resolve()
        for module in list(sys.modules.values()):
            file = getattr(module, "__file__", None)
            if not file:
                continue
            path = Path(file)
            if not path.is_relative_to(self.root) or path.is_relative_to(prefix):
                continue
            try:
                if path.stat().st_mtime_ns > self.loaded_ns:
                    return True
            except OSError:
                return True
        return False

    def restart(self) -> None:
        """Start again in this process (same PID, which the pool watches) with what it learned."""
        learned = [m for m in sys.modules if m not in self.skipped and not m.startswith("__main__")]
        args = [sys.executable, "-m", "infra.runner", "--home", str(self.pool)]
        args += [f"--skip={m}" for m in sorted(self.skipped)]
        self.cleanup()
        sys.stdout.flush()
        os.execv(sys.executable, [*args, "--preload", *learned])


def _dotted(name: str) -> bool:
    return all(part.isidentifier() for part in name.split("."))


def _read_request(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(conn, 1 << 16, 3)
    if len(data) < _HEADER.size:
        raise ValueError("short request")
    (size,) = _HEADER.unpack(data[: _HEADER.size])
    if size > 16 << 20:
        raise ValueError("request too large")
    body = bytearray(data[_HEADER.size :])
    while len(body) < size:
        chunk = conn.recv(min(1 << 16, size - len(body)))
        if not chunk:
            raise ValueError("request cut short")
        body += chunk
    for fd in fds:
        os.set_inheritable(fd, False)  # never into a restarted runner: the caller waits for their end
    return json.loads(bytes(body)), list(fds)


def _remove_dead_socket(pool: Path) -> None:
    """The socket folder of this pool's earlier runner, if it was killed before it could remove it
    (nothing answers there any more): only ever a `keel-runner-*` folder of the temporary folder."""
    import tempfile

    try:
        path = Path((pool / SOCKET_FILE).read_text().strip())
    except OSError:
        return
    folder = path.parent
    if folder.parent != Path(tempfile.gettempdir()) or not folder.name.startswith(FOLDER_PREFIX):
        return
    try:
        _connect(pool, timeout=1).close()
    except ConnectionRefusedError:  # a socket file with no process behind it
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            folder.rmdir()
    except OSError:
        pass


def _reap_children() -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _supervise(conn: socket.socket, child: int) -> int:
    """Wait for the command; pass on the caller's signals; stop it if the caller is gone."""
    caller_gone = False
    while True:
        pid, status = os.waitpid(child, os.WNOHANG)
        if pid:
            return os.waitstatus_to_exitcode(status)
        if caller_gone:
            select.select([], [], [], 0.1)
            continue
        readable, _, _ = select.select([conn], [], [], 0.1)
        if not readable:
            continue
        data = conn.recv(4096)
        if not data:  # the caller was killed: the command is stopped as it would have been
            caller_gone = True
            os.kill(child, signal.SIGTERM)
            continue
        for line in data.splitlines():
            signum = json.loads(line).get("signal")
            if signum in FORWARDED_SIGNALS:
                os.kill(child, FORWARDED_SIGNALS[signum])


def _become_command(request: dict, fds: list[int]) -> None:
    """In the forked child: become the caller's process (streams, folder, environment, arguments)
    and run its module as `python -m` does. Never returns."""
    global INSIDE  # noqa: PLW0603 - the flag `hand_off` reads, set once in the child
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)  # first: the runner's SIGTERM handler raises SystemExit
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=os.isatty(stream.fileno()))  # type: ignore[union-attr]
    sys.argv = list(request["argv"])
    _reload_environment()
    INSIDE = True
    import runpy
    import traceback

    sys.modules.pop(request["module"], None)  # run as a new `__main__`, as `python -m` does
    code = 0
    try:
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 128 + signal.SIGINT
    except BaseException:  # reported as Python reports an uncaught exception
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError):
            stream.flush()
    os._exit(code)


def _exit_code(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    print(value, file=sys.stderr)
    return 1


def _reload_environment() -> None:
    """What the loaded libraries read from the environment when imported, read again."""
    import tempfile

    tempfile.tempdir = None
    time.tzset()
    if "prefect.context" in sys.modules:
        from prefect.context import refresh_global_settings_context
        from prefect.logging.configuration import setup_logging

        refresh_global_settings_context()
        setup_logging(incremental=False)
    if "dask.config" in sys.modules:
        import dask.config

        dask.config.refresh()
    if "numpy" in sys.modules:
        import numpy as np

        np.random.seed()


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m infra.runner", description=__doc__)
    parser.add_argument("--home", type=Path, required=True, help="The pool's folder.")
    parser.add_argument("--skip", action="append", default=[], help="A module never to import.")
    parser.add_argument("--preload", nargs="*", default=[], help="Modules to import first.")
    args = parser.parse_args(argv)
    runner = Runner(args.home, args.preload)
    runner.skipped.update(args.skip)
    runner.serve()
    return 0


if __name__ == "__main__":
    import infra.runner  # noqa: PLW0406 - the module flows import, not this `__main__` copy: they read `INSIDE`

    sys.exit(infra.runner.main())
