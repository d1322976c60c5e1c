"""Stopping the DataLoader workers that a failed run leaves behind.

``seed_worker`` makes loader workers ignore SIGTERM (so that a signal sent to the whole process group reaches the
main process, which saves, rather than killing the workers under it). A run that ends with an exception keeps its
loaders alive in reference cycles through the exception's frames; at interpreter exit torch no longer shuts their
workers down, and ``multiprocessing`` sends them SIGTERM, which they ignore, then waits for them forever. The apps
call :func:`stop_worker_processes` after such a run: the error line is printed and the process exits.
"""
from __future__ import annotations

import multiprocessing

__all__ = ["stop_worker_processes"]


def stop_worker_processes() -> None:
    """Kills this process's daemonic ``multiprocessing`` children (DataLoader workers) and reaps them."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()
