"""Private folders that live as long as the process that made them, even when it is killed.

A folder removed at exit (`atexit`) stays behind when its process is stopped by a signal, as a
Dask worker of the local stack or of a warm pool is: each verified model copy (3 MiB) was left in the
temporary directory, a thousand of them after a day of test runs. Here each folder has a lock file
beside it that its process holds (`flock`) for its whole life; the kernel releases the lock when the
process ends, however it ends, and the next process that asks for a folder, or that made one and
exits, removes every folder whose lock it can take.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import secrets
import shutil
import stat
import tempfile
from pathlib import Path

_LOCK_SUFFIX = ".lock"
_held: dict[Path, int] = {}  # each folder's lock file descriptor: open while the folder is in use
_cleans_at_exit: list[Path] = []  # the root, once this process has made a folder in it


def process_folder(prefix: str) -> Path:
    """A new folder (mode 0700) for this process: removed at exit, or after the process dies by
    the next call in any process of this user."""
    root = _root()
    sweep(root)
    while True:
        name = f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"
        lock = _lock_of(root / name)
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except FileExistsError:
            continue
        fcntl.flock(descriptor, fcntl.LOCK_EX)  # waits for a sweeper that took it first...
        try:
            mine = os.stat(lock).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            mine = False
        if not mine:  # ... which removed it: take another name
            os.close(descriptor)
            continue
        folder = root / name
        folder.mkdir(mode=0o700)
        if not _cleans_at_exit:  # one exit handler, however many folders come and go
            atexit.register(_clean_at_exit, root)
            _cleans_at_exit.append(root)
        _held[folder] = descriptor
        return folder


def release(folder: Path) -> None:
    """Remove a folder of this process now, before it exits (a served version replaced by the next),
    and let go of its lock; ValueError if this process did not make it."""
    descriptor = _held.pop(folder, None)
    if descriptor is None:
        raise ValueError(f"{folder} is not a process folder of this process")
    _remove(folder, _lock_of(folder))
    os.close(descriptor)


def sweep(root: Path) -> list[str]:
    """Remove the folders of `root` whose process has ended (their lock is free); their names."""
    removed = []
    for lock in sorted(root.glob(f"*{_LOCK_SUFFIX}")):
        try:
            descriptor = os.open(lock, os.O_RDWR)
        except FileNotFoundError:  # another sweeper was first
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its process runs
            os.close(descriptor)
            continue
        try:
            _remove(lock.parent / lock.name.removesuffix(_LOCK_SUFFIX), lock)
            removed.append(lock.name.removesuffix(_LOCK_SUFFIX))
        finally:
            os.close(descriptor)
    return removed


def _clean_at_exit(root: Path) -> None:
    """This process's folders, then what processes that died meanwhile left (a test's killed
    workers). A child forked with this handler leaves its parent's folders: a name holds its pid."""
    mine = str(os.getpid())
    for folder in [f for f in _held if f.name.split("-")[-2] == mine]:
        _remove(folder, _lock_of(folder))
    with contextlib.suppress(OSError):
        sweep(root)


def _lock_of(folder: Path) -> Path:
    return folder.with_name(f"{folder.name}{_LOCK_SUFFIX}")


def _remove(folder: Path, lock: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    lock.unlink(missing_ok=True)  # last: a lock without its folder is swept again


def _root() -> Path:
    """This user's folder for process folders in the temporary directory, refused unless it is this
    user's own and private (another user could otherwise swap files that were verified)."""
    root = Path(tempfile.gettempdir()) / f"keel-process-folders-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        root.mkdir(mode=0o700)
    found = os.lstat(root)
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o077:
        raise PermissionError(
            f"{root} must be a directory of user {os.getuid()} with mode 0700 (it holds verified model "
            "copies); it is not: remove it, and it is made again"
        )
    return root
