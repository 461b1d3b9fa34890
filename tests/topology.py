"""Hosts for the cluster-topology test: one network namespace per component of the compose file, on a
switch of their own, with the compose service names resolved to their addresses.

Each host is a namespace with a veth into a bridge that lives in a namespace of its own (nothing is
attached to this machine's network), an address in 10.231.0.0/24 and an `/etc/netns/<ns>/hosts`
that `ip netns exec` mounts over /etc/hosts, so `mlflow:5000` means the MLflow host, as in compose.
Everything made is recorded and removed by `Topology.close` (processes by PID, then namespaces).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

from infra.processes import stop

SUBNET = "10.231.0"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Topology:
    def __init__(self, hosts: list[str], logs: Path) -> None:
        self.prefix = f"k{uuid.uuid4().hex[:6]}"
        self.switch = f"{self.prefix}-sw"
        self.logs = logs
        self.address = {host: f"{SUBNET}.{index + 2}" for index, host in enumerate(hosts)}
        self.namespaces: list[str] = []
        self.processes: list = []
        self.logs.mkdir(parents=True, exist_ok=True)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def _build(self) -> None:
        _ip("netns", "add", self.switch)
        self.namespaces.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        hosts_file = "127.0.0.1 localhost\n" + "".join(f"{a} {h}\n" for h, a in self.address.items())
        for index, (host, address) in enumerate(self.address.items()):
            ns = self.ns(host)
            _ip("netns", "add", ns)
            self.namespaces.append(ns)
            inner, outer = f"h{index}", f"{self.prefix}p{index}"
            _ip("-n", ns, "link", "add", inner, "type", "veth", "peer", "name", outer, "netns", self.switch)
            _ip("-n", self.switch, "link", "set", outer, "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            folder = Path("/etc/netns") / ns
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text(hosts_file)

    def run(
        self,
        host: str,
        args: list[str],
        env: dict[str, str],
        name: str | None = None,
        cwd: Path | None = None,
    ):
        """Start `args` on `host` (its own process group, logged to logs/<name>.log)."""
        log = (self.logs / f"{name or host}.log").open("ab")
        proc = subprocess.Popen(  # exactly `env`: a host sees only its own variables
            ["ip", "netns", "exec", self.ns(host), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        self.processes.append(proc)
        return proc

    def call(
        self, host: str, args: list[str], env: dict[str, str], timeout: float = 600, cwd: Path | None = None
    ):
        """Run `args` on `host` to completion."""
        return subprocess.run(
            ["ip", "netns", "exec", self.ns(host), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
        )

    def close(self) -> None:
        stop(list(reversed(self.processes)), timeout=30)
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


def available() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    return None


REQUIRED = re.compile(r"\$\{(\w+):\?[^}]*\}")


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's `${NAME:?message}`: the value, or stop naming the variable (as compose does)."""

    def one(match: re.Match) -> str:
        if not variables.get(match.group(1)):
            raise KeyError(f"compose would refuse to start: {match.group(1)} is not set")
        return variables[match.group(1)]

    return REQUIRED.sub(one, value)
