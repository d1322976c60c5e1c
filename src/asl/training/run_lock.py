"""One ``train.py`` run per output folder: a lock held for the run's life.

Two runs writing into one folder would mix their files (``args.json`` of one, the checkpoints of the other, an
interleaved ``log.txt``). The first run holds a lock on ``OUTPUT_DIR/.train.lock``, whose text names it (PID, host,
start time), so that a second run can say who holds the folder.

- POSIX: ``fcntl.lockf``, a record lock. The kernel drops it when the process ends, however it ends, so a file left
  by a killed run never blocks. Record locks belong to the process, not to the open file: the DataLoader workers
  forked from the run do not inherit them. (An ``flock`` would be inherited, and workers outlive a SIGKILLed main
  process by up to 5 s, which blocks an immediate ``--resume auto``.) The price: a second lock taken by the same
  process would succeed, and closing any descriptor of the file would drop the lock, so the process keeps a
  registry of the folders it holds and refuses the second one before opening the file.
- Windows: ``msvcrt.locking`` on one byte past the text (Windows locks are mandatory: the text stays readable);
  the system drops it when the process ends, too.
- Neither available, or a file system that refuses locks: ``OUTPUT_DIR/.train.pid``, created exclusively. A file
  that names a process of this host that no longer runs is stale and replaced.

The lock file is never followed through a symbolic link (``O_NOFOLLOW``; an ``lstat`` check where the platform has
no such flag) and must be a regular file: a link there could make the run truncate a user's file, or create one
outside the folder. Such a lock file, or a folder in its place, is refused in one line that names it.

Not the ``filelock`` package: its Unix lock opens the path with ``O_TRUNC`` and follows links (the target of a link
would be emptied), and it takes ``flock`` locks, which forked loader workers inherit (see above).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any, Optional

from ..errors import UsageError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
try:
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None  # type: ignore[assignment]

__all__ = ["RunLock", "LOCK_NAME", "PID_NAME", "NOFOLLOW"]

logger = logging.getLogger(__name__)

LOCK_NAME = ".train.lock"
PID_NAME = ".train.pid"
#: where the Windows lock sits: past any text the file can hold, so that a second run can still read it
_WINDOWS_LOCK_OFFSET = 1 << 16
#: a holder writes its text right after it locks; a second run gives it this long to appear
_READ_PATIENCE_S = 1.0
#: open flags that refuse a symbolic link in the last component (0 where the platform has none: lstat checks instead)
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
#: the most of a lock file read: its text is one short JSON line
_HOLDER_BYTES = 4096
#: the folders (real paths) this process holds: record locks cannot refuse a second lock of the same process
_held: set[str] = set()
_held_guard = threading.Lock()


class _LocksUnsupported(Exception):
    """The file system refuses OS locks (some network and FUSE file systems)."""


class RunLock:
    """Holds ``folder`` until :meth:`release` (or the end of a ``with`` block, or of the process).

    :meth:`acquire` raises :class:`~asl.errors.UsageError` naming the holder when another run holds the folder.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path: Optional[Path] = None  # the lock file, while held
        self._fd: Optional[int] = None  # the locked descriptor (OS lock mode)
        self._key: Optional[str] = None
        self._posix = fcntl is not None  # which OS lock, as taken

    @classmethod
    def acquire(cls, folder: Path) -> "RunLock":
        lock = cls(folder)
        lock._acquire()
        return lock

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._key is not None

    def _acquire(self) -> None:
        key = os.path.realpath(self.folder)
        with _held_guard:
            if key in _held:
                raise UsageError(_in_use(self.folder, {"pid": os.getpid(), "host": socket.gethostname()}, None))
            _held.add(key)
        try:
            if fcntl is None and msvcrt is None:
                self._acquire_pid_file()
            else:
                try:
                    self._acquire_os_lock()
                except _LocksUnsupported as exc:
                    logger.info("%s: the file system refuses locks (%s); using %s instead", self.folder, exc,
                                PID_NAME)
                    self._acquire_pid_file()
        except BaseException:
            with _held_guard:
                _held.discard(key)
            raise
        self._key = key

    def _acquire_os_lock(self) -> None:
        path = self.folder / LOCK_NAME
        for _ in range(20):
            fd = _open_lock_file(path, os.O_RDWR | os.O_CREAT)
            try:
                locked = _try_lock(fd)
                # A file that is no longer at the path was removed by a holder that ended meanwhile: a lock on it
                # holds nothing, so the loop tries the file now there.
                if locked and _same_file(fd, path):
                    _write_holder(fd)
                    self._fd, self.path = fd, path
                    return
                if not locked:
                    holder = _read_holder(path)
                    if _same_file(fd, path):
                        raise UsageError(_in_use(self.folder, holder, None))
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise UsageError(f"{self.folder}: could not lock {path}: other runs keep taking and releasing it")

    def _acquire_pid_file(self) -> None:
        path = self.folder / PID_NAME
        for _ in range(3):
            try:
                # O_EXCL never follows a link: one at the path counts as a file that exists.
                fd = _open_lock_file(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                if os.path.islink(path) or not os.path.isfile(path):
                    raise UsageError(_not_a_lock_file(path)) from None
                holder = _read_holder(path)
                # This process's own PID there is an earlier process's file (the registry says we hold nothing).
                if holder is not None and holder.get("host") == socket.gethostname() \
                        and (holder.get("pid") == os.getpid() or not _pid_alive(holder.get("pid"))):
                    logger.info("%s names process %s, which no longer runs: removing it", path, holder.get("pid"))
                    path.unlink(missing_ok=True)
                    continue
                raise UsageError(_in_use(self.folder, holder, path)) from None
            try:
                _write_holder(fd)
            finally:
                os.close(fd)
            self.path = path
            return
        raise UsageError(f"{self.folder}: could not create {path}: other runs keep taking and releasing it")

    def release(self) -> None:
        if self._key is None:
            return
        try:
            if self._fd is not None and self._posix:
                # Removed while still locked: a run that opened the file meanwhile finds it gone and retries.
                _unlink_quietly(self.path)
                os.close(self._fd)
            elif self._fd is not None:
                # Unlocked first: Windows frees the locks of a closed file only "eventually". It refuses to
                # remove an open file; once closed, another run may hold it, and then the removal fails harmlessly.
                try:
                    os.lseek(self._fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
                    msvcrt.locking(self._fd, msvcrt.LK_UNLCK, 1)
                except OSError:
                    pass
                os.close(self._fd)
                _unlink_quietly(self.path)
            else:
                _unlink_quietly(self.path)
        finally:
            self._fd = None
            self.path = None
            with _held_guard:
                _held.discard(self._key)
            self._key = None


def _open_lock_file(path: Path, flags: int) -> int:
    """The lock file's descriptor: never through a symbolic link, and only a regular file. Any other problem with the
    file itself (a folder in its place, a read-only file) is a :class:`UsageError` that names it."""
    if not NOFOLLOW and os.path.islink(path):
        raise UsageError(_not_a_lock_file(path))
    flags |= NOFOLLOW | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOINHERIT", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except FileExistsError:
        raise
    except OSError as exc:
        if os.path.islink(path) or os.path.isdir(path):
            raise UsageError(_not_a_lock_file(path)) from None
        raise UsageError(f"cannot open the run's lock file {path}: {exc.strerror or exc}; remove it if no train.py "
                         f"run uses the folder") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(_not_a_lock_file(path))
    return fd


def _not_a_lock_file(path: Path) -> str:
    if os.path.islink(path):
        what = "a symbolic link (the run never writes through one)"
    elif os.path.isdir(path):
        what = "a folder"
    else:
        what = "not a regular file"
    return f"the run's lock file {path} is {what}: remove it if no train.py run uses the folder"


def _try_lock(fd: int) -> bool:
    """True when locked; False when another process holds the lock."""
    try:
        if fcntl is not None:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except OSError as exc:
        busy = {errno.EACCES, errno.EAGAIN, getattr(errno, "EWOULDBLOCK", errno.EAGAIN),
                getattr(errno, "EDEADLOCK", errno.EAGAIN)}
        if exc.errno in busy:
            return False
        raise _LocksUnsupported(exc.strerror or str(exc)) from exc


def _same_file(fd: int, path: Path) -> bool:
    try:
        mine, named = os.fstat(fd), os.lstat(path)  # lstat: a link put at the path is not our file
    except FileNotFoundError:
        return False
    return (mine.st_dev, mine.st_ino) == (named.st_dev, named.st_ino)


def _write_holder(fd: int) -> None:
    text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n"
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, text.encode("utf-8"))


def _read_holder(path: Path) -> Optional[dict[str, Any]]:
    """The holder's PID, host and start, or None when the file names none (yet, or any more)."""
    deadline = time.monotonic() + _READ_PATIENCE_S
    while True:
        try:
            holder = json.loads(_read_small(path))
            if isinstance(holder, dict) and isinstance(holder.get("pid"), int):
                return holder
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def _read_small(path: Path) -> str:
    """The start of a regular file, not through a link: a FIFO or a device put there must not block or flood."""
    fd = os.open(path, os.O_RDONLY | NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return os.read(fd, _HOLDER_BYTES).decode("utf-8")
    finally:
        os.close(fd)


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # nothing to check: not provably stale
    if os.name == "nt":
        return True  # os.kill(pid, 0) would send CTRL_C_EVENT there, not test the process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs, as another user
        return True
    return True


def _in_use(folder: Path, holder: Optional[dict[str, Any]], pid_file: Optional[Path]) -> str:
    if holder is None:
        who = "another train.py run (its lock file does not say which)"
    else:
        since = f", since {holder['started']}" if holder.get("started") else ""
        who = f"another train.py run (PID {holder.get('pid')} on {holder.get('host', 'an unknown host')}{since})"
    hint = f"; if no run uses it, delete {pid_file}" if pid_file is not None else ""
    return f"{folder} is in use by {who}: wait for it to end, or choose another --output-dir{hint}"


def _unlink_quietly(path: Optional[Path]) -> None:
    if path is None:
        return
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass
