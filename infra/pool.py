"""A warm pool: Prefect's server and a Dask cluster kept running between runs, stopped when idle.

    KEEL_WARM_POOL=10m python -m flows.monitor ...  # the first run starts the pool, the next use it
    python -m infra.pool up [--idle 10m]            # or start it by hand
    python -m infra.pool status                     # also shown by `python -m infra.stack status`
    python -m infra.pool down

Without servers, each run starts Prefect's temporary server and its own Dask workers, and stops them
at its end: seconds of every small run (benchmarks/README.md, "Where the seconds of a cold run go").
SageMaker keeps a finished job's instances for the next one (warm pools); so does this. The pool is
the local stack (infra/stack.py) without MLflow's server and the deployments: the Prefect server
(database in `prefect/` of the pool's folder, behind the stack's generated auth string), the Dask
scheduler and workers (TLS with the stack's certificates), each on a free port of 127.0.0.1; a
runner (infra/runner.py) that takes the next `python -m flows...` commands with their libraries
imported already, on a Unix socket only its user reaches; and a watchdog that stops them all once no
run has used the pool for the idle time.

Runs keep their MLflow store (the embedded one in the state directory): the pool holds no run's data
except Prefect's history, which is in a database on disk, so a pool that dies loses nothing; the next
run starts a new one on the same database. A run that uses the pool holds a lease (`leases/<pid>`),
removed when it ends; a lease whose process is gone does not count. The folder's `pool-env.json`
(0600) holds the variables runs use (`tasks/steps/warm_pool.py` reads it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from infra.processes import free_port, http_ok, locked, pid_running
from infra.runner import SOCKET_FILE, default_home
from infra.secrets import StackSecrets, write_private
from infra.stack import Stack, _dask_workers, _tcp_ok, answers

ENV_FILE = "pool-env.json"
LEASES = "leases"
LOCK = ".lock"  # taken to find, start or stop the pool (tasks/steps/warm_pool.py, the watchdog)
DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h)$")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}


def idle_seconds(text: str) -> float:
    """`10m`, `90s`, `1.5h` as seconds."""
    found = DURATION.match(text.strip())
    if not found:
        raise ValueError(f"not a duration: {text!r} (e.g. 10m, 90s, 1h)")
    return float(found.group(1)) * UNIT_SECONDS[found.group(2)]


class Pool(Stack):
    """The stack's Prefect and Dask parts, kept by a watchdog while runs use them."""

    def addresses(self, state: dict) -> dict[str, str]:
        ports = state["ports"]
        return {
            "PREFECT_API_URL": f"http://127.0.0.1:{ports['prefect']}/api",
            "DASK_SCHEDULER_ADDRESS": f"tls://127.0.0.1:{ports['dask']}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }

    def env(self, state: dict) -> dict[str, str]:
        secrets = StackSecrets.load(self.home)
        return {
            **self.addresses(state),
            "PREFECT_API_AUTH_STRING": secrets.prefect_auth_string,
            **secrets.dask_tls(),
        }

    @property
    def env_file(self) -> Path:
        return self.home / ENV_FILE

    @property
    def leases(self) -> Path:
        return self.home / LEASES

    def start_pool(self, idle: float, workers: int, worker_memory: str, preload: Sequence[str] = ()) -> dict:
        """Start Prefect, Dask, the runner (importing `preload` first) and the watchdog; write
        `pool-env.json` once the servers answer (the runner takes commands once it has imported)."""
        state = self.load()
        alive = [p["name"] for p in state.get("processes", []) if pid_running(p["pid"])]
        if alive and self.answering(state):
            raise SystemExit(f"the pool in {self.home} is already running ({', '.join(alive)})")
        if alive:  # what is left of a pool whose servers died: stopped, its data kept
            self.down()
        self.logs.mkdir(parents=True, exist_ok=True)
        self.leases.mkdir(exist_ok=True)
        ports = {"prefect": free_port(), "dask": free_port(), "dask_dashboard": free_port()}
        state = {"ports": ports, "processes": [], "home": str(self.home), "idle_seconds": idle}
        self.save(state)
        secrets = StackSecrets.ensure(self.home)
        env = self.env(state)
        try:
            self._start_prefect(state, env, secrets, None, {})
            self._start_dask(state, env, secrets, workers, worker_memory)
            runner = [sys.executable, "-m", "infra.runner", "--home", str(self.home), "--preload", *preload]
            self._start(state, "runner", runner, {}, None, 0)
            watch = [sys.executable, "-m", "infra.pool", "watch", "--home", str(self.home)]
            self._start(state, "watchdog", watch, {}, None, 0)
        except BaseException:
            self.down()
            raise
        write_private(self.env_file, json.dumps(env).encode())
        return state

    def answering(self, state: dict) -> bool:
        """Whether the pool's Prefect server answers and its Dask scheduler takes connections."""
        prefect = self.addresses(state)["PREFECT_API_URL"]
        return answers(lambda: http_ok(f"{prefect}/health") and _tcp_ok(state["ports"]["dask"]))

    def joinable_env(self) -> dict[str, str] | None:
        """The variables a run uses (`pool-env.json`), if the pool answers now; None if it is not
        running, or is stopping (the file goes first)."""
        state = self.load()
        if not self.env_file.exists() or not state.get("processes") or not self.answering(state):
            return None
        return json.loads(self.env_file.read_text())

    def down(self, timeout: float = 60) -> list[str]:
        self.env_file.unlink(missing_ok=True)  # first: no new run joins a pool that is stopping
        return super().down(timeout)

    def live_leases(self) -> list[int]:
        """PIDs of the runs using the pool now (leases of ended processes are removed)."""
        pids = []
        for lease in self.leases.glob("*") if self.leases.is_dir() else []:
            if lease.name.isdigit() and pid_running(int(lease.name)):
                pids.append(int(lease.name))
            else:
                lease.unlink(missing_ok=True)
        return pids

    def idle_since(self) -> float:
        """When the last lease was taken or given back (the leases folder's modification time)."""
        return self.leases.stat().st_mtime if self.leases.is_dir() else 0.0

    def watch(self, poll: float = 2.0) -> str:
        """The watchdog's loop: stop the pool when it has been idle for its idle time, when one of
        its servers has died (the next run starts a whole new pool), or when its folder is gone (the
        processes it knew are stopped). Decides under the lock runs take to join the pool, so no run
        joins a pool that is being stopped. Returns why it stopped."""
        idle = float(self.load().get("idle_seconds", 600))
        started = time.time()
        known = self.load()
        while True:
            time.sleep(poll)
            if not self.state_file.exists():
                self._stop_orphans(known)
                return "its folder was removed"
            with locked(self.home / LOCK):  # one process at a time starts or stops the pool
                state = self.load()
                if os.getpid() not in [p["pid"] for p in state.get("processes", [])]:
                    return "another pool replaced this one"
                known = state
                others = [p for p in state["processes"] if p["pid"] != os.getpid()]
                dead = sorted({p["name"] for p in others if not pid_running(p["pid"])})
                if dead:
                    reason = f"{', '.join(dead)} stopped"
                elif not self.live_leases() and time.time() - max(self.idle_since(), started) >= idle:
                    reason = f"idle for {idle:g} s"
                else:
                    continue
                state["processes"] = others  # the watchdog does not signal itself
                self.save(state)
                self.down()
                return reason

    def _stop_orphans(self, known: dict) -> None:
        """Stop the processes of a pool whose folder was removed (read from a scratch folder)."""
        scratch = Pool(Path(tempfile.mkdtemp(prefix="keel-pool-")))
        scratch.save(
            {**known, "processes": [p for p in known.get("processes", []) if p["pid"] != os.getpid()]}
        )
        scratch.down()

    def status(self) -> list[str]:
        state = self.load()
        if not state or not state.get("processes"):
            return [f"no warm pool running in {self.home}"]
        lines = [f"warm pool in {self.home}"]
        for entry in state["processes"]:
            running = "running" if pid_running(entry["pid"]) else "stopped"
            lines.append(f"  {entry['name']:<12} pid {entry['pid']:<8} {running}")
        env = self.env(state)
        checks = {
            "prefect": lambda: http_ok(f"{env['PREFECT_API_URL']}/health"),
            "dask": lambda: _dask_workers(env) >= 0,
        }
        for name, check in checks.items():
            verdict = "answers" if answers(check) else "does not answer"
            lines.append(f"  {name:<12} {verdict} at {_address(env, name)}")
        runner = "takes commands" if (self.home / SOCKET_FILE).exists() else "is importing or stopped"
        lines.append(f"  {'runner':<12} {runner}")
        users = self.live_leases()
        idle = float(state.get("idle_seconds", 600))
        if users:
            lines.append(f"  in use by {len(users)} run(s): pids {', '.join(map(str, users))}")
        else:
            left = idle - (time.time() - self.idle_since())
            lines.append(f"  idle; stops by itself in {max(left, 0):.0f} s (idle time {idle:g} s)")
        return lines


def _address(env: dict[str, str], name: str) -> str:
    return env["PREFECT_API_URL"] if name == "prefect" else env["DASK_SCHEDULER_ADDRESS"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.pool", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=["up", "down", "status", "env", "watch"])
    parser.add_argument(
        "--home", type=Path, default=None, help="The pool's folder (default: $KEEL_STATE_DIR/pool)."
    )
    parser.add_argument(
        "--idle", default="10m", help="Stop after this long without a run (e.g. 10m, 90s, 1h)."
    )
    parser.add_argument("--workers", type=int, default=2, help="Dask worker processes.")
    parser.add_argument("--worker-memory", default="4GiB", help="Memory limit of each Dask worker.")
    parser.add_argument(
        "--preload", nargs="*", default=[], help="Modules the runner imports first (e.g. flows.monitor)."
    )
    args = parser.parse_args(argv)
    pool = Pool(args.home or default_home())
    if args.command == "up":
        try:
            idle = idle_seconds(args.idle)
        except ValueError as exc:
            parser.error(str(exc))
        print(f"starting a warm pool in {pool.home} (stops after {args.idle} without a run)", flush=True)
        pool.start_pool(idle, args.workers, args.worker_memory, args.preload)
        print("\n".join(pool.status()))
    elif args.command == "down":
        for line in pool.down():
            print(f"  stopped {line}")
    elif args.command == "status":
        print("\n".join(pool.status()))
    elif args.command == "env":
        print("\n".join(f"export {k}={shlex.quote(v)}" for k, v in pool.recorded_env().items()))
    else:
        print(f"warm pool watchdog stopped the pool: {pool.watch()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
