"""Atomic file writes: a reader (or a run killed mid-write) sees the old file or the new one, never half of one."""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable, Union

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "stale_temporaries"]

#: bytes of the final name kept in the temporary one (255 minus the PID, random part and dots)
_TMP_NAME_BYTES = 200


def atomic_write(path: Union[str, Path], write: Callable[[BinaryIO], None]) -> None:
    """``write(file)`` into a temporary file beside ``path``, flushed to disk, then renamed over ``path``.

    The parent folder is created if needed. On any failure the temporary file is removed and the error raised;
    ``path`` keeps its old content.
    """
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    # The temporary name adds about 20 characters: a legal name near the file system's limit (255 bytes) is
    # shortened for it, so that any name the final file can have, the temporary one can too.
    stem = path.name.encode("utf-8")[:_TMP_NAME_BYTES].decode("utf-8", "ignore")
    tmp = directory / f".{stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        # 'xb' rather than tempfile.mkstemp, so the file gets the usual permissions (umask), not 0600.
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # e.g. a read-only file system: the error that matters is the one being raised
            pass
        raise
    _fsync_directory(directory)


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_directory(directory: Path) -> None:
    """Makes the rename itself durable where the platform allows it (POSIX); best effort."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def stale_temporaries(directory, final_name_glob: str) -> list[Path]:
    """The temporary files :func:`atomic_write` left in ``directory`` (a write that was killed) for final names
    that match ``final_name_glob``."""
    return sorted(Path(directory).glob(f".{final_name_glob}.*.tmp"))
