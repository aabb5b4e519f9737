"""One owner per run folder: an exclusive OS file lock on `RUN_DIR/.lock`.

`flock` locks belong to the open file, so the kernel drops them when the process dies, even by
`kill -9`: a crashed run never leaves its folder locked. The file holds `pid host` of the owner
for the message a second process prints. The owner removes the file when it lets go (after
checking, when taking the lock, that the locked file is still the one at the path, so a process
holding a removed file never thinks it owns the folder), and removes the folders it created
for the run if they are still empty, so a run that stops on an error leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import socket

from minimind_jax.errors import UserError

LOCK_FILE = ".lock"


def _owner(path: pathlib.Path) -> str:
    """`pid N on HOST` from a lock file, as well as it can be read."""
    try:
        pid, host = path.read_text(encoding="utf-8").split()[:2]
    except (OSError, ValueError):
        return "another process"
    return f"pid {pid} on {host}"


def _missing_parents(path: pathlib.Path) -> list[pathlib.Path]:
    """`path` and its ancestors that do not exist yet, deepest first."""
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


@contextlib.contextmanager
def hold(run_dir: str | pathlib.Path, enabled: bool = True):
    """Own `run_dir` for the `with` block (creating it if needed), or raise UserError naming
    the process that owns it. With `enabled=False` (processes other than 0) a no-op."""
    if not enabled:
        yield
        return
    run_dir = pathlib.Path(run_dir)
    created = _missing_parents(run_dir.absolute())
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    try:
        fd = _acquire(path)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still locked: nobody can take a stale file meanwhile
        os.close(fd)
        _remove_empty(created)


def _acquire(path: pathlib.Path) -> int:
    """A descriptor of `path` holding its exclusive lock."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"run folder {path.parent} is in use by {_owner(path)} (its lock "
                            f"file {path}); wait for that run to end, or use another "
                            "--out_dir") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the owner removed it as we opened it: take the new one


def _remove_empty(folders: list[pathlib.Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (the run wrote something): keep it and its parents
