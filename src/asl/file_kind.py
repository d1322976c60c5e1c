"""Regular files only: what a path that is not one is, in words (the one wording of the scripts' refusals of
pipes, devices and sockets, which would block a read or never end it), and opening a file only if it is one."""
from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

__all__ = ["describe_mode", "open_regular", "NotRegularFileError"]


class NotRegularFileError(OSError):
    """:func:`open_regular` of a path that is no regular file; ``strerror`` says what it is."""


def open_regular(path) -> BinaryIO:
    """Opens ``path`` for reading (links followed) only if it is a regular file: a FIFO or a device would block the
    reader forever, or never end. The file is opened without blocking and checked on the open descriptor, so
    nothing can swap it in between. :class:`NotRegularFileError` otherwise; other failures are ``OSError``."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(errno.EINVAL, f"not a regular file: it is {describe_mode(mode)}")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def describe_mode(mode: int) -> str:
    """The kind of file ``mode`` (an ``st_mode``) stands for, as a noun phrase: "a named pipe (FIFO)"..."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"
