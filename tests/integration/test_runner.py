"""The warm pool's runner (infra/runner.py): a real runner process, real commands handed to it.

`python -m tests.runner_probe` as the command: it reports what it got. The runner must run it as
the caller's own process would (arguments, folder, environment, standard streams, exit code,
signals), decline what it cannot run the same way, restart on changed code and leave nothing behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, clean_env

pytestmark = pytest.mark.integration

PROBE = ROOT / "tests" / "runner_probe.py"


def wait_for(check, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.fixture
def runner(tmp_path):
    """A runner for the pool folder of `KEEL_STATE_DIR`, and the environment its callers use."""
    pool = tmp_path / "state" / "pool"
    pool.mkdir(parents=True)
    env = clean_env(KEEL_STATE_DIR=str(tmp_path / "state"), KEEL_WARM_POOL="1m", PROBE="from the caller")
    proc = start_runner(pool, env, tmp_path / "runner.log", "--preload", "tests.runner_probe")
    wait_for((pool / "runner-socket").exists, f"the runner did not start: see {tmp_path / 'runner.log'}")
    yield env, pool, proc
    proc.terminate()
    proc.wait(timeout=30)


def start_runner(pool: Path, env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    """`python -m infra.runner` for the pool, in a session of its own, its output in `log`."""
    with log.open("wb") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "infra.runner", "--home", str(pool), *args],
            cwd=ROOT,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def start_sleeping_command(
    env: dict[str, str], pid_file: Path, seconds: float, *, pipes: bool = True
) -> tuple[subprocess.Popen[str], int]:
    """A caller whose command sleeps `seconds`, and the command's PID once it has started."""
    pipe = subprocess.PIPE if pipes else None
    caller = subprocess.Popen(
        [sys.executable, "-m", "tests.runner_probe", "--sleep", str(seconds), "--pid-file", str(pid_file)],
        cwd=ROOT,
        env=env,
        stdout=pipe,
        stderr=pipe,
        text=True,
    )
    try:
        wait_for(pid_file.exists, "the command did not start")
    except BaseException:
        caller.kill()
        raise
    return caller, int(pid_file.read_text())


def probe(
    env: dict[str, str], *args: str, stdin: str = "", interpreter: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *interpreter, "-m", "tests.runner_probe", *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def seen(done: subprocess.CompletedProcess[str]) -> dict:
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_runner_runs_a_command_as_the_callers_own_process(runner):
    env, _pool, proc = runner
    done = probe(env, "--stdin", "--exit", "3", "an argument", stdin="typed in\n")
    assert done.returncode == 3, done.stderr
    got = seen(done)
    assert got["inside"] is True  # run by the runner, not by the caller's process
    assert got["argv"] == ["--stdin", "--exit", "3", "an argument"]
    assert got["cwd"] == str(ROOT) and got["probe"] == "from the caller"
    assert got["stdin"] == "typed in\n"
    assert "probe: to standard error" in done.stderr and "probe" not in done.stdout.replace('"probe"', "")
    assert got["pid"] != proc.pid  # a child of the runner: the runner itself goes on
    again = seen(probe({**env, "PROBE": "changed"}))
    assert again["probe"] == "changed" and again["inside"] is True  # each caller's environment


def test_what_the_runner_cannot_run_the_same_way_runs_in_the_callers_process(runner, tmp_path):
    env, _pool, _proc = runner
    # A library reads OMP_NUM_THREADS when it is loaded: the runner's loaded libraries read another.
    other = "2" if env.get("OMP_NUM_THREADS") == "1" else "1"
    done = probe({**env, "OMP_NUM_THREADS": other})
    why = f"{done.stderr}\nthe runner's log:\n{(tmp_path / 'runner.log').read_text()}"
    assert done.returncode == 0 and seen(done)["inside"] is False, why
    assert "warm pool runner: the caller's load_env differs from the runner's; running here" in done.stderr, (
        why
    )
    # Warnings filters and -X options are the interpreter's own: another one runs on its own.
    done = probe(env, interpreter=("-W", "error"))
    assert seen(done)["inside"] is False and "the caller's options differs" in done.stderr
    # Without KEEL_WARM_POOL nothing is handed off, silently.
    done = probe({k: v for k, v in env.items() if k != "KEEL_WARM_POOL"})
    assert seen(done)["inside"] is False and "warm pool runner" not in done.stderr


def test_changed_code_restarts_the_runner_which_then_runs_it(runner):
    env, pool, proc = runner
    stat = PROBE.stat()
    try:
        os.utime(PROBE, ns=(stat.st_atime_ns, time.time_ns()))
        done = probe(env)
    finally:
        os.utime(PROBE, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert seen(done)["inside"] is False and "the project's code changed" in done.stderr
    wait_for((pool / "runner-socket").exists, "the runner did not come back")
    assert seen(probe(env))["inside"] is True
    assert proc.poll() is None  # restarted in place: the same PID, which the pool watches


def test_signals_reach_the_command_and_a_killed_caller_stops_it(runner, tmp_path):
    env, _pool, _proc = runner
    pid_file = tmp_path / "pid"
    caller, _command = start_sleeping_command(env, pid_file, 60)
    caller.send_signal(signal.SIGINT)
    _out, err = caller.communicate(timeout=60)
    assert caller.returncode == 128 + signal.SIGINT and "KeyboardInterrupt" in err

    pid_file.unlink()
    caller, command = start_sleeping_command(env, pid_file, 60, pipes=False)
    caller.kill()
    caller.wait()
    wait_for(lambda: not Path(f"/proc/{command}").exists(), "the command outlived its killed caller", 30)


def test_the_runner_stops_on_sigterm_and_leaves_nothing(runner):
    _env, pool, proc = runner
    folder = Path((pool / "runner-socket").read_text()).parent
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    assert oct((pool / "runner-socket").stat().st_mode & 0o777) == "0o600"
    proc.terminate()
    assert proc.wait(timeout=30) == 0
    assert not folder.exists() and not (pool / "runner-socket").exists()


def test_a_killed_runners_folder_is_removed_by_the_next_runner(runner, tmp_path):
    env, pool, proc = runner
    folder = Path((pool / "runner-socket").read_text()).parent
    proc.kill()  # no chance to clean up: its socket folder stays behind
    proc.wait(timeout=30)
    assert (folder / "socket").exists()
    second = start_runner(pool, env, tmp_path / "second.log")
    try:
        wait_for(lambda: Path((pool / "runner-socket").read_text()).parent != folder, "no second runner")
        assert not folder.exists()
        assert seen(probe(env))["inside"] is True
    finally:
        second.terminate()
        second.wait(timeout=30)


def process_state(pid: int) -> str:
    """The kernel's one-letter state of a process (T: stopped), or "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def test_ctrl_z_stops_the_command_with_its_caller_and_fg_continues_both(runner, tmp_path):
    env, _pool, _proc = runner
    pid_file = tmp_path / "pid"
    caller, command = start_sleeping_command(env, pid_file, 3)
    try:
        caller.send_signal(signal.SIGTSTP)  # what Ctrl-Z sends the foreground job
        wait_for(lambda: process_state(command) == "T", "the command did not stop", 30)
        wait_for(lambda: process_state(caller.pid) == "T", "the caller did not stop", 30)
        time.sleep(4)  # longer than the command's sleep: stopped, it cannot finish
        assert process_state(command) == "T" and caller.poll() is None
        caller.send_signal(signal.SIGCONT)  # what `fg` sends
        out, err = caller.communicate(timeout=60)
    finally:
        caller.kill()
    assert caller.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1])["inside"] is True
