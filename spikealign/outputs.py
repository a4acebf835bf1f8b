"""Output files and directories a process owns: checked before any work, one writer at a time.

- :func:`check_output_file` / :func:`check_output_dir` turn an output path that cannot be written
  (a directory where a file is wanted, a file where a directory is wanted, an ancestor that is a
  file, a directory that is not writable) into a one-line :class:`UserError` before a long run
  starts, instead of a traceback after it.
- :class:`OutputLock` makes an output one process's: an exclusive ``fcntl.flock`` on a lock file
  beside (or in) the output. The kernel releases it when the process ends, however it ends, so a
  killed run never blocks the next one; a second process that wants the same output while the
  first runs stops at once with a one-line error naming the holder's pid.
- :func:`remove_stale_temporaries` deletes ``.NAME.<pid>.tmp`` files (atomic writes: write a
  temporary file, then rename) that a killed process left behind.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
from pathlib import Path

from spikealign.errors import UserError


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable_dir(directory: Path, flag: str, target: Path) -> None:
    """``directory`` (existing) must be a directory this process can create files in."""
    if not directory.is_dir():
        raise UserError(f"{flag} {target}: {directory} is a file, not a directory")
    try:  # a real probe: os.access is always true for root, even on a read-only file system
        tempfile.TemporaryFile(dir=directory).close()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UserError(
            f"{flag} {target}: cannot write in {directory} ({reason}); choose a writable place"
        ) from None


def check_output_file(path: str | os.PathLike | None, flag: str) -> None:
    """A file that will be (re)written at ``path``: UserError now if that cannot work."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path} is a directory; give a file name")
    _check_writable_dir(_nearest_existing(path.parent), flag, path)


def check_output_dir(path: str | os.PathLike | None, flag: str) -> None:
    """A directory that will hold output files: UserError now if that cannot work."""
    if path is None:
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; give a directory")
    _check_writable_dir(_nearest_existing(path), flag, path)


def lock_holder(lock_path: str | os.PathLike) -> int | None:
    """The pid written in a held lock file, 0 if held but unreadable, None if nobody holds it."""
    try:
        descriptor = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(descriptor, 32).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        return None
    finally:
        os.close(descriptor)


class OutputLock:
    """Exclusive ownership of an output while this process writes it (a context manager).

    ``OutputLock(lock_path, target, flag)`` takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on
    ``lock_path`` and writes the pid into it; if another process holds it, UserError naming
    ``target``, the holder's pid and ``flag``. :meth:`release` deletes the lock file; a killed
    holder leaves it behind unlocked, and the next owner simply takes it.
    """

    def __init__(self, lock_path: str | os.PathLike, target: str | os.PathLike, flag: str):
        self.lock_path = Path(lock_path)
        self._descriptor: int | None = None
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        while self._descriptor is None:
            # O_CLOEXEC (Python's default): programs this process starts do not inherit the lock
            descriptor = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(descriptor, 32).decode(errors="replace").strip() or "unknown"
                os.close(descriptor)
                raise UserError(
                    f"{target} is in use by another process (pid {holder}); wait for it to end "
                    f"or choose another {flag}"
                ) from None
            try:  # the last holder may have deleted the file between our open and flock
                same = os.stat(self.lock_path).st_ino == os.fstat(descriptor).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(descriptor)
                continue
            os.ftruncate(descriptor, 0)
            os.write(descriptor, f"{os.getpid()}\n".encode())
            self._descriptor = descriptor

    @property
    def held(self) -> bool:
        return self._descriptor is not None

    def release(self) -> None:
        """Delete the lock file and give up the lock (idempotent)."""
        if self._descriptor is None:
            return
        try:
            self.lock_path.unlink(missing_ok=True)
        finally:
            os.close(self._descriptor)
            self._descriptor = None

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def __del__(self) -> None:
        if getattr(self, "_descriptor", None) is not None:
            os.close(self._descriptor)


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to someone else
        return True
    return True


_TEMPORARY = re.compile(r"^\..+\.(\d+)\.tmp$")


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete ``.NAME.<pid>.tmp`` files in ``directory`` whose process is gone; returns them."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for path in directory.iterdir():
        match = _TEMPORARY.match(path.name)
        if match and int(match.group(1)) != os.getpid() and not process_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
