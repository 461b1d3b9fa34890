"""Process folders (verified model copies) are removed when their process ends, however it ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tasks.steps import process_folders
from tasks.steps.process_folders import process_folder, sweep

HOLD = """
import sys, time
from tasks.steps.process_folders import process_folder
folder = process_folder("keel-test")
(folder / "model.bin").write_bytes(b"x" * 1000)
print(folder, flush=True)
if sys.argv[1] == "wait":
    time.sleep(120)
elif sys.argv[1] == "until-told":
    sys.stdin.readline()
"""


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    return tmp_path


def holder(how: str) -> tuple[subprocess.Popen, Path]:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, how], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    return child, Path(child.stdout.readline().strip())


def test_a_killed_process_leaves_its_folder_until_the_next_process_asks_for_one(private_tmp):
    killed, left = holder("wait")
    running, kept = holder("wait")
    try:
        os.kill(killed.pid, signal.SIGKILL)  # no exit handler runs
        killed.wait(timeout=10)
        assert (left / "model.bin").exists()

        mine = process_folder("keel-test")

        assert not left.exists() and not Path(f"{left}.lock").exists()
        assert (kept / "model.bin").exists(), "a running process's folder was removed"
        assert mine.is_dir() and oct(mine.stat().st_mode & 0o777) == oct(0o700)
    finally:
        running.kill()
        running.wait(timeout=10)


def test_a_process_that_exits_removes_its_folder(private_tmp):
    child, folder = holder("exit")
    assert child.wait(timeout=30) == 0
    assert not folder.exists() and not Path(f"{folder}.lock").exists()


def test_a_process_that_exits_also_removes_what_processes_killed_meanwhile_left(private_tmp):
    exiting, _ = holder("until-told")
    killed, left = holder("wait")
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait(timeout=10)
    assert (left / "model.bin").exists()
    exiting.communicate("done\n", timeout=30)
    assert exiting.returncode == 0
    assert not left.exists() and not Path(f"{left}.lock").exists()


def test_a_sweep_leaves_the_folders_of_this_process(private_tmp):
    folder = process_folder("keel-test")
    assert sweep(folder.parent) == []
    assert folder.is_dir()


def test_a_shared_root_that_others_can_write_is_refused(private_tmp):
    root = private_tmp / f"keel-process-folders-{os.getuid()}"
    root.mkdir(mode=0o777)
    root.chmod(0o777)
    with pytest.raises(PermissionError, match="mode 0700"):
        process_folder("keel-test")
    root.rmdir()
    root.symlink_to(private_tmp)
    with pytest.raises(PermissionError, match="mode 0700"):
        process_folders.process_folder("keel-test")


def test_a_released_folder_is_gone_at_once_with_its_lock_and_its_descriptor(private_tmp):
    """A long-lived process (the serving loop) replaces its folder at each new version: the old one
    goes now, not at exit, and leaves no open file behind."""
    before = len(os.listdir("/proc/self/fd"))
    folder = process_folder("keel-test")
    (folder / "model.bin").write_bytes(b"x")

    process_folders.release(folder)

    assert not folder.exists() and not Path(f"{folder}.lock").exists()
    assert len(os.listdir("/proc/self/fd")) == before
    with pytest.raises(ValueError, match="not a process folder of this process"):
        process_folders.release(folder)


CHURN = """
import atexit
from tasks.steps import process_folders
first = process_folders.process_folder("keel-test")
before = atexit._ncallbacks()
for _ in range(20):  # a serving loop switching versions
    process_folders.release(process_folders.process_folder("keel-test"))
kept = process_folders.process_folder("keel-test")
print(atexit._ncallbacks() - before, first, kept, flush=True)
"""


def test_folders_that_come_and_go_add_no_exit_handler_and_the_kept_ones_go_at_exit(private_tmp):
    done = subprocess.run(
        [sys.executable, "-c", CHURN], capture_output=True, text=True, check=True, timeout=60
    )
    added, first, kept = done.stdout.split()
    assert added == "0"  # one handler, registered with the first folder
    assert not Path(first).exists() and not Path(kept).exists()
    assert not list(Path(kept).parent.glob("*.lock"))
