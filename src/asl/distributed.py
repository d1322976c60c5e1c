"""torchrun support: process-group setup, rank helpers and gathering predictions back into dataset order.

A single process is the default and needs nothing: every helper here is a no-op when the process group is
not initialised, so the same code paths serve one CPU, one GPU and ``torchrun --nproc_per_node=N``.

Environment (set by torchrun): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``.
Backend: ``nccl`` for CUDA devices, ``gloo`` for CPU.

Exact evaluation under DDP: ``DistributedSampler`` pads the dataset so every rank gets the same number of
items (repeating the first ones). :func:`gather_by_index` collects every rank's rows together with their
dataset indices and keeps one row per index, sorted, so the metrics see exactly the rows a single process
would see, in the same order.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from .errors import UsageError

__all__ = [
    "DistInfo", "select_device", "init_distributed", "destroy_distributed", "is_dist", "per_rank_batch", "barrier",
    "all_reduce_sum", "all_gather_varlen", "gather_by_index", "broadcast_object", "main_process_first", "unwrap_model",
    "ResumableDistributedSampler", "broadcast_module_state",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands. ``world_size == 1`` means "not distributed"."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def select_device(name: str = "auto", local_rank: Optional[int] = None) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Under torchrun ``local_rank`` picks this process's GPU when the name gives no index. Raises
    :class:`~asl.errors.UsageError` when the device is not on this machine.
    """
    key = (name or "auto").strip().lower()
    if key == "auto":
        key = "cuda" if torch.cuda.is_available() else "cpu"
    if key == "cpu":
        return torch.device("cpu")
    if key.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        device = torch.device(key)
        if device.index is None:
            device = torch.device("cuda", local_rank or 0)
        if device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
        return device
    if key == "mps" and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    raise UsageError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def init_distributed(device: str | torch.device = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Initialises the default process group when launched by torchrun, and picks this process's device.

    ``device`` is ``auto|cpu|cuda|cuda:N`` (see :func:`select_device`) or a ``torch.device``.
    Under torchrun with CUDA, each process uses ``cuda:LOCAL_RANK``. Without torchrun's variables (or
    with ``WORLD_SIZE=1``) nothing is initialised and a single-process :class:`DistInfo` is returned.
    """

    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if isinstance(device, torch.device):
        dev = device
    else:
        dev = select_device(device, local_rank=local_rank if world_size > 1 else None)
    if world_size <= 1:
        return DistInfo(device=dev)
    if dev.type == "cuda":
        if isinstance(device, str) and device.strip().lower() in ("auto", "cuda"):
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        kwargs: dict[str, Any] = dict(backend=backend, world_size=world_size, rank=rank, timeout=timeout)
        kwargs.update(_restart_safe_store(world_size, timeout) or {"init_method": "env://"})
        if backend == "nccl":
            kwargs["device_id"] = dev  # binds the communicator to this GPU (avoids a guess by NCCL)
        dist.init_process_group(**kwargs)
    logger.debug("process group: rank %d/%d, local rank %d, %s on %s", rank, world_size, local_rank, backend, dev)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, backend=backend)


def _restart_safe_store(world_size: int, timeout: datetime.timedelta) -> Optional[dict[str, Any]]:
    """Under ``torchrun --max-restarts``, the workers of every round share the agent's key-value store, and the
    keys the previous round wrote (each rank's address, for gloo) are still there: a restarted rank can read a
    dead peer's address and fail with "Connection refused" (one restart in three here). Keys under a prefix of
    the round's number keep the rounds apart. ``None`` outside torchrun's restarts (the plain ``env://``)."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False,
                          timeout=timeout)
    return {"store": dist.PrefixStore(f"asl/round_{restart}", agent)}


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def per_rank_batch(batch_size: int, world_size: int, exact: bool = True) -> int:
    """Each process's share of the global batch ``-b``. Training (``exact``) needs an even split, or the recipe's
    batch would change; evaluation rounds up, since the batch size cannot change its result."""
    if not exact:
        return -(-batch_size // world_size)
    if batch_size % world_size:
        raise UsageError(f"-b {batch_size} is not divisible by the {world_size} processes")
    return batch_size // world_size


def barrier() -> None:
    if is_dist():
        dist.barrier()


def _comm_device(tensor: torch.Tensor) -> torch.device:
    """NCCL moves CUDA tensors only; gloo moves CPU tensors."""
    if is_dist() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a copy; the input is untouched). Identity without a process group."""
    if not is_dist():
        return tensor.clone()
    t = tensor.detach().to(_comm_device(tensor), copy=True)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.to(tensor.device)


def all_gather_varlen(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (first dimension may differ between ranks), in rank order, on the input's device."""
    if not is_dist():
        return [tensor]
    dev = _comm_device(tensor)
    local = tensor.detach().to(dev).contiguous()
    n = torch.tensor([local.shape[0]], device=dev, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    counts = [int(s.item()) for s in sizes]
    max_n = max(counts)
    # all_gather needs equal shapes: pad to the longest, cut after.
    padded = local.new_zeros((max_n,) + tuple(local.shape[1:]))
    padded[: local.shape[0]] = local
    out = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(out, padded)
    return [o[:c].to(tensor.device) for o, c in zip(out, counts)]


def gather_by_index(indices: torch.Tensor, values: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor,
                                                                                         dict[str, torch.Tensor]]:
    """Collects rows from all ranks and returns them sorted by dataset index, one row per index.

    ``indices`` is a 1-D long tensor of dataset indices; each entry of ``values`` has the same first
    dimension. Duplicates (DistributedSampler's padding repeats the first items on the last ranks) are
    dropped; they hold identical predictions, so which copy is kept does not matter. Without a process
    group this only sorts and de-duplicates. Every rank gets the full result.
    """
    idx = torch.cat(all_gather_varlen(indices.long().cpu()))
    gathered = {k: torch.cat(all_gather_varlen(v)) for k, v in values.items()}
    order = torch.argsort(idx, stable=True)
    idx_sorted = idx[order]
    keep = torch.ones_like(idx_sorted, dtype=torch.bool)
    keep[1:] = idx_sorted[1:] != idx_sorted[:-1]
    sel = order[keep]
    return idx[sel], {k: v[sel.to(v.device)] for k, v in gathered.items()}


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (e.g. a path decided by rank 0)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@contextlib.contextmanager
def main_process_first(info: DistInfo, enabled: bool = True) -> Iterator[None]:
    """Runs the block on rank 0 first, then on the other ranks, which then find its work done (a download into a
    shared cache: one download, not one per rank). When the block fails on rank 0 the others stop with one line
    instead of waiting for it, and rank 0 keeps its own error."""
    if not (enabled and info.distributed):
        yield
        return
    if info.is_main:
        try:
            yield
        except BaseException as exc:
            broadcast_object(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            raise
        broadcast_object(None)
        return
    failure = broadcast_object(None)
    if failure is not None:
        raise UsageError(f"rank 0 failed ({failure}); see its message")
    yield


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DDP and/or torch.compile wrappers (whose state-dict keys carry no prefix)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` whose epoch can start part-way, for exact mid-epoch resume.

    The order of epoch ``e`` is torch's: a permutation seeded by ``seed + e`` (the same on every rank), padded
    to a multiple of the world size and dealt out round-robin. ``set_start(k)`` drops this rank's first ``k``
    samples of the current epoch, i.e. the ``k / local_batch`` batches already trained before an interruption;
    it applies to the next iteration only (call it after ``set_epoch``). Works with one process too
    (``num_replicas=1, rank=0``), so single-process and torchrun runs share one code path.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_start(self, start: int) -> None:
        if start < 0:
            raise ValueError("start must be >= 0")
        self.start = int(start)

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


@torch.no_grad()
def broadcast_module_state(module: torch.nn.Module, src: int = 0) -> None:
    """Makes every rank's parameters and buffers equal to rank ``src``'s.

    DDP keeps parameters equal, but each rank updates its BatchNorm running statistics with its own batch
    (DDP broadcasts them only at the start of the next forward), and the EMA averages those. Synchronising
    before evaluation and before saving makes every rank evaluate, and save, exactly rank 0's model.
    """
    if not is_dist():
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dev = _comm_device(tensor)
        t = tensor.detach().to(dev)
        dist.broadcast(t, src=src)
        if t.data_ptr() != tensor.data_ptr():
            tensor.copy_(t.to(tensor.device))
