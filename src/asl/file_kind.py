"""What a path that is not a regular file is, in words: the one wording of the scripts' refusals of pipes,
devices and sockets, which would block a read or never end it."""
from __future__ import annotations

import stat

__all__ = ["describe_mode"]


def describe_mode(mode: int) -> str:
    """The kind of file ``mode`` (an ``st_mode``) stands for, as a noun phrase: "a named pipe (FIFO)"..."""
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"
