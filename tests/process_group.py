"""A real gloo process group for tests that spawn their ranks with ``torch.multiprocessing``.

The ranks meet through a file in the test's own folder, not at a TCP port picked in advance: tests run side by side
(pytest-xdist), and a port freed by one test can be taken by another's sockets before the store binds it. They
leave together: a barrier before the group is destroyed, so that no rank tears its connections down while a peer
may still be finishing the last collective.

A rank that got through its body ends with ``os._exit(0)``, without the interpreter's finalisation. Gloo's worker
threads can still hold the last reference to a tensor of the last collective, whose Python object they must then
release under the GIL; if that happens while the interpreter is finalising, the thread is ended from inside C++ and
the process aborts ("terminate called without an active exception"; pytorch/pytorch pull request 179291). Gloo's
``shutdown`` does not stop those threads, and a group that a DDP module was built on keeps them past
``destroy_process_group``, even once the module is gone.
"""
import contextlib
import datetime
import faulthandler
import os
import socket
import sys
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from asl import distributed as D


@contextlib.contextmanager
def joined(rank: int, world: int, folder: str, timeout_s: float = 60.0) -> Iterator[D.DistInfo]:
    """Rank ``rank`` of ``world`` in a group that meets in ``folder``; yields what the package's own
    :func:`asl.distributed.init_distributed` sees (it finds the group already there)."""
    faulthandler.enable()  # an abort in torch's C++ shows where Python was
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    store = Path(folder) / "rendezvous"
    dist.init_process_group("gloo", init_method=store.as_uri(), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    info = D.init_distributed("cpu")
    failed = False
    try:
        yield info
    except BaseException:
        failed = True  # the peers may never reach a barrier now: leave without one
        raise
    finally:
        if not failed:
            dist.barrier()
        D.destroy_distributed()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    """A port free now: for the store of a ``torchrun`` that a test launches (torchrun has no file rendezvous), or a
    port where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
