"""Reading WebDataset shards as a dataset: the same tensors as the folder route, split across ranks and workers.

:func:`open_shard_dataset` reads and checks ``SPLIT.json`` (:mod:`asl.data.shards_format`) from any
:class:`~asl.data.shards_source.ShardSource`; :func:`create_shard_loader` wires the dataset to a DataLoader. Tar
parsing is WebDataset's (``tar_file_iterator`` and ``group_by_keys``); decoding and the transforms are the folder
route's (:mod:`asl.data.transforms`), and a sample's augmentation is drawn from ``item_rng(seed, epoch, index)``,
so the same picture gives the same tensor by either route.

Who reads what (``slots`` = ranks x DataLoader workers; slot = ``worker * world_size + rank``):

- shards >= slots: slot ``s`` reads shards ``s, s + slots, ...`` whole;
- shards < slots: slot ``s`` reads shard ``s % shards`` and keeps every ``k``-th sample of it, where ``k`` slots
  share that shard; every sample is still kept by exactly one slot (each of them reads the whole shard, though).

Evaluation (``train=False``) reads each sample exactly once over all slots, in file order, and the items carry
their index, so predictions are gathered by index as for folders (:func:`asl.distributed.gather_by_index`).

Training: the assignment is fixed by the shard sizes, and each epoch permutes shards of equal size among their
positions (seeded by ``(seed, epoch)``), so every slot holds as many samples each epoch while the shards it reads
change. Within a slot the shard order and a sample buffer (``shuffle_buffer``) are shuffled with generators seeded
by ``(seed, epoch, rank, worker)``. The number of batches per epoch is the same on every rank (computed from the
counts): a rank that has fewer of its own batches fills the rest with full batches read again from its own
shards, in another order (wrap-around), so ranks stay in lockstep and never wait for each other at the end of an
epoch. One process reads every sample exactly once per epoch (no wrap-around; up to one smaller batch per worker).
``set_start(k)`` skips the first ``k`` batches of the epoch (the samples are read but not decoded), which gives
exact mid-epoch resume with the same world size and ``-j``.
"""
from __future__ import annotations

import http.client
import io
import itertools
import json
import logging
import random
import tarfile
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import shuffle as wds_shuffle
from webdataset.tariterators import group_by_keys, tar_file_iterator

from .base import DatasetError, create_loader
from .open_images import resolve_unannotated
from .shards_format import SplitMeta, decode_target, parse_split_meta
from .shards_source import ShardError, ShardSource
from .transforms import EvalTransform, TrainTransform, UnreadableImageError, decode_rgb, item_rng, resize_square

__all__ = ["ShardDataset", "Portion", "open_shard_dataset", "create_shard_loader", "slot_portions",
           "batches_per_worker", "resume_plan", "ShardLoader", "DEFAULT_SHUFFLE_BUFFER"]

logger = logging.getLogger(__name__)

DEFAULT_SHUFFLE_BUFFER = 1000


@dataclass(frozen=True)
class Portion:
    """Samples ``offset, offset + stride, ...`` (positions in the file) of shard number ``shard``."""

    shard: int
    stride: int = 1
    offset: int = 0

    def size(self, counts) -> int:
        return len(range(self.offset, counts[self.shard], self.stride))


def slot_portions(num_shards: int, slots: int, slot: int) -> list[Portion]:
    """What slot ``slot`` of ``slots`` reads (see the module docstring); shard numbers are positions in the order."""
    if num_shards == 0:
        return []
    if num_shards >= slots:
        return [Portion(j) for j in range(slot, num_shards, slots)]
    j = slot % num_shards
    return [Portion(j, len(range(j, slots, num_shards)), slot // num_shards)]


def batches_per_worker(available: list[list[int]], batch: int) -> list[list[int]]:
    """``available[r][w]``: the samples of rank ``r``'s worker ``w``. Returns each worker's batch count, equal
    totals on every rank: a rank's missing batches go, one by one, to its workers that hold samples (read again)."""
    own = [[-(-a // batch) for a in rank] for rank in available]
    steps = max((sum(rank) for rank in own), default=0)
    out = []
    for rank_available, rank_own in zip(available, own):
        counts = list(rank_own)
        feeders = [w for w, a in enumerate(rank_available) if a > 0]
        if not feeders and steps:
            raise ShardError("a rank has no sample to read: fewer samples than processes")
        for k in range(steps - sum(rank_own)):
            counts[feeders[k % len(feeders)]] += 1
        out.append(counts)
    return out


def resume_plan(batch_counts: list[int], done: int) -> tuple[list[int], int]:
    """For a DataLoader that takes one batch from each worker in turn, passing over the workers that have finished:
    how many of each worker's batches are among its first ``done`` batches, and which worker's batch comes next."""
    left, skipped = list(batch_counts), [0] * len(batch_counts)
    position = 0
    while done > 0 and any(left):
        if left[position]:
            left[position] -= 1
            skipped[position] += 1
            done -= 1
        position = (position + 1) % len(left)
    return skipped, position


class ShardDataset(IterableDataset):
    """A split read from shards; see the module docstring. Build it with :func:`open_shard_dataset`."""

    def __init__(self, source: ShardSource, meta: SplitMeta, *, image_size: int, train: bool, seed: int = 0,
                 with_index: bool = False, strict: bool = False, cutout_factor: float = 0.5,
                 unannotated: Optional[str] = None, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER):
        unannotated = resolve_unannotated(unannotated, train)
        if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
            raise DatasetError(f"shuffle_buffer must be a whole number >= 0, not {shuffle_buffer!r}")
        self.source, self.meta = source, meta
        self.name, self.split = "webdataset", meta.split
        self.classes = list(meta.classes)
        self.num_classes = len(self.classes)
        self.image_size, self.train, self.seed = int(image_size), bool(train), int(seed)
        self.with_index, self.strict = bool(with_index), bool(strict)
        self.unknown_as = 0.0 if unannotated == "negative" else -1.0
        self.shuffle_buffer = int(shuffle_buffer)
        self.transform = TrainTransform(cutout_factor) if self.train else EvalTransform()
        self.counts = [s.count for s in meta.shards]
        self.first = meta.first
        self.num_missing = 0
        self.rank, self.world_size, self.workers, self.batch_size = 0, 1, 1, 1
        self._batch_counts: Optional[list[int]] = None
        # Shared memory, so that set_epoch()/set_start() reach persistent workers and the unreadable samples come
        # back. A flag per sample, as the folder route keeps: a picture read again next epoch is counted once, and
        # workers that find bad pictures at the same moment write different bytes, so no count is lost.
        self._epoch = torch.zeros(2, dtype=torch.int64).share_memory_()  # epoch, batches to skip
        self._unreadable = torch.zeros(meta.count, dtype=torch.uint8).share_memory_()

    # ---- the dataset contract
    def __len__(self) -> int:
        """The samples of the split (``count``); what one rank reads is :meth:`items_per_epoch`."""
        return self.meta.count

    @property
    def count(self) -> int:
        return self.meta.count

    def image_path(self, i: int) -> str:
        k = int(np.searchsorted(np.asarray(self.first), i, side="right")) - 1
        return f"{self.source.location(self.meta.shards[k].name)}#{i:09d}"

    def idx_to_class(self) -> dict[int, str]:
        return dict(enumerate(self.classes))

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = int(epoch)
        self._epoch[1] = 0

    def set_start(self, batches: int) -> None:
        """Skip the first ``batches`` batches of the current epoch on this rank (call after :meth:`set_epoch`)."""
        self._epoch[1] = int(batches)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    @property
    def start(self) -> int:
        """The batches of the current epoch that :meth:`set_start` skips."""
        return int(self._epoch[1])

    def num_unreadable(self) -> int:
        """Distinct samples whose picture failed to decode so far."""
        return int(self._unreadable.sum())

    # ---- partition
    def partition(self, rank: int, world_size: int, workers: int, batch_size: int) -> None:
        """Where this copy runs: its rank, the world size, the DataLoader's workers (0 counts as 1) and the batch."""
        self.rank, self.world_size = int(rank), int(world_size)
        self.workers, self.batch_size = max(1, int(workers)), int(batch_size)
        if self.train:
            available = [[self._available(r, w) for w in range(self.workers)] for r in range(self.world_size)]
            self._batch_counts = batches_per_worker(available, self.batch_size)[self.rank]
        else:
            self._batch_counts = [-(-self._available(self.rank, w) // self.batch_size) for w in range(self.workers)]

    def batches_per_epoch(self) -> int:
        """This rank's batches in one pass (training: the same on every rank)."""
        return sum(self._batch_counts or [])

    def items_per_epoch(self) -> int:
        """Training: the items this rank's loader yields in one epoch (its own samples, and those read again)."""
        own = self._available(self.rank, None)
        extra = self.batches_per_epoch() - sum(-(-self._available(self.rank, w) // self.batch_size)
                                               for w in range(self.workers))
        return own + extra * self.batch_size

    def _portions(self, rank: int, worker: int) -> list[Portion]:
        return slot_portions(len(self.counts), self.world_size * self.workers, worker * self.world_size + rank)

    def _available(self, rank: int, worker: Optional[int]) -> int:
        workers = range(self.workers) if worker is None else [worker]
        return sum(p.size(self.counts) for w in workers for p in self._portions(rank, w))

    def _epoch_order(self, epoch: int) -> list[int]:
        """Shard numbers by position: shards of equal size permuted among their positions (training)."""
        order = list(range(len(self.counts)))
        if not self.train:
            return order
        rng = random.Random(f"shards/{self.seed}/{epoch}")
        by_size: dict[int, list[int]] = {}
        for j, c in enumerate(self.counts):
            by_size.setdefault(c, []).append(j)
        for positions in by_size.values():
            moved = list(positions)
            rng.shuffle(moved)
            for position, j in zip(positions, moved):
                order[position] = j
        return order

    # ---- iteration
    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.workers:
            self.partition(self.rank, self.world_size, info.num_workers, self.batch_size)
        epoch = self.epoch
        order = self._epoch_order(epoch)
        if not self.train:
            for p in self._portions(self.rank, worker):
                for raw in self._read(Portion(order[p.shard], p.stride, p.offset)):
                    yield self._decode(raw, epoch)
            return
        counts = self._batch_counts or [0] * self.workers
        skipped, first = resume_plan(counts, self.start)
        # A DataLoader starts every pass at worker 0: after a resume worker w plays the part of the worker whose
        # batch came next, so the batches come in the uninterrupted run's order.
        role = (first + worker) % self.workers
        portions = [Portion(order[p.shard], p.stride, p.offset) for p in self._portions(self.rank, role)]
        own = self._available(self.rank, role)
        # own samples, then whole batches read again (wrap-around) up to the worker's share of the rank's batches
        quota = own + (counts[role] - -(-own // self.batch_size)) * self.batch_size
        rng = random.Random(f"buffer/{self.seed}/{epoch}/{self.rank}/{role}")
        stream = self._cycle(portions, rng, wrap=quota > own)
        if self.shuffle_buffer > 1:
            stream = wds_shuffle(self.shuffle_buffer, min(100, self.shuffle_buffer), rng=rng)(stream)
        for raw in itertools.islice(stream, skipped[role] * self.batch_size, quota):
            yield self._decode(raw, epoch)

    def _cycle(self, portions: list[Portion], rng: random.Random, wrap: bool) -> Iterator[dict[str, Any]]:
        while True:
            shuffled = list(portions)
            rng.shuffle(shuffled)
            for portion in shuffled:
                yield from self._read(portion)
            if not wrap:  # wrap is only asked of a worker that holds samples: the loop ends at its quota
                return

    def _read(self, portion: Portion) -> Iterator[dict[str, Any]]:
        """The raw samples (``__key__``, members' bytes) of a portion, each checked against ``SPLIT.json``."""
        shard = self.meta.shards[portion.shard]
        where = self.source.location(shard.name)
        first, count = self.first[portion.shard], shard.count
        seen = 0
        stream = self.source.open(shard.name, shard.bytes)
        try:
            for sample in group_by_keys(_members(stream, where)):
                position = seen
                seen += 1
                if seen > count:
                    raise ShardError(f"{where} holds more than the {count} samples its index records")
                if "json" not in sample:
                    raise ShardError(f"{where} is broken: sample {str(sample.get('__key__'))[:40]!r} has no labels "
                                     f"(.json member)")
                if position % portion.stride != portion.offset:
                    continue
                sample["__index__"] = _index_of(sample, where, first, count)
                sample["__where__"] = where
                yield sample
            if seen != count:
                raise ShardError(f"{where} holds {seen} samples but its index records {count}: truncated or replaced "
                                 f"(write the shards again)")
        except ShardError:
            raise
        except (tarfile.TarError, EOFError, OSError, http.client.HTTPException, ValueError) as exc:
            raise ShardError(f"{where} is broken or could not be read: {_reason(exc)}") from None
        finally:
            _close(stream)

    def _decode(self, raw: dict[str, Any], epoch: int):
        index, where = raw["__index__"], raw["__where__"]
        name = f"{where}#{raw['__key__']}"
        try:
            record = _record_of(raw)
            target = torch.from_numpy(decode_target(record, self.num_classes, self.unknown_as))
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardError(f"{name}: its labels do not fit the {self.num_classes} classes of the index "
                             f"({_reason(exc)})") from None
        images = [k for k in raw if not k.startswith("__") and k != "json"]
        try:
            if len(images) != 1:
                raise UnreadableImageError(name, f"{len(images)} picture members")
            img = decode_rgb(io.BytesIO(raw[images[0]]), name)
        except UnreadableImageError as exc:
            if self.strict:
                raise ShardError(f"{exc} (strict data mode)") from None
            self._unreadable[index] = 1
            logger.warning("skipping unreadable image %s (%s)", exc.path, exc.reason)
            return None
        arr = np.array(resize_square(img, self.image_size), dtype=np.uint8)
        rng = item_rng(self.seed, epoch, index) if self.train else None
        image = self.transform(arr, rng)
        return (image, target, index) if self.with_index else (image, target)

    def __repr__(self) -> str:
        return (f"ShardDataset(source={self.source.data!r}, split={self.split!r}, items={self.meta.count}, "
                f"shards={len(self.counts)}, classes={self.num_classes}, image_size={self.image_size}, "
                f"{'train' if self.train else 'eval'})")


def _members(stream, where: str) -> Iterator[dict[str, Any]]:
    """The tar's files as WebDataset's ``{"fname", "data", "__url__"}`` records."""
    for member in tar_file_iterator(stream):
        member["__url__"] = where
        yield member


def _index_of(sample: dict[str, Any], where: str, first: int, count: int) -> int:
    key = sample.get("__key__", "")
    if not str(key).isdigit() or not first <= int(key) < first + count:
        raise ShardError(f"{where}: sample {str(key)[:40]!r} is not one of this shard's (indices {first} to "
                         f"{first + count - 1} in its index): the shards and SPLIT.json do not match")
    return int(key)


def _record_of(raw: dict[str, Any]) -> dict[str, Any]:
    record = json.loads(raw["json"])
    if not isinstance(record, dict):
        raise ValueError("the sample's json is not an object")
    return record


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "reason", None) or exc).strip().splitlines()
    return text[0] if text and text[0] else type(exc).__name__


def _close(stream) -> None:
    try:
        stream.close()
    except (OSError, ValueError):
        pass


def open_shard_dataset(data: str, split: str, image_size: int, train: bool, **options) -> ShardDataset:
    """The split ``split`` of the shard folder ``data`` (a folder, an http(s) base URL or a ``pipe:`` template).

    Reads and checks ``SPLIT.json``; for a local folder also that every shard is there with its recorded size.
    Options: ``seed``, ``with_index``, ``strict``, ``cutout_factor``, ``unannotated`` (a stored -1, "not
    annotated", becomes 0 with ``negative``, the training default, or stays -1 with ``ignore``, the evaluation
    default), ``shuffle_buffer``, ``timeout`` (seconds of HTTP silence before giving up).
    """
    timeout = options.pop("timeout", None)
    source = ShardSource(data) if timeout is None else ShardSource(data, float(timeout))
    index_name = f"{split}.json"
    meta = parse_split_meta(source.read_bytes(index_name), source.location(index_name))
    if source.kind == "folder":
        for shard in meta.shards:
            source.open(shard.name, shard.bytes).close()  # missing or truncated: one line now, not mid-epoch
    return ShardDataset(source, meta, image_size=image_size, train=train, **options)


class ShardLoader(DataLoader):
    """A DataLoader whose length is the batches it yields: with several workers each one ends its share with a
    batch of its own, which ``len(DataLoader)`` (items / batch size) does not count; after ``set_start(k)`` the
    ``k`` skipped batches do not count either (as a sampler's length after its own ``set_start``)."""

    def __len__(self) -> int:
        return max(0, self.dataset.batches_per_epoch() - self.dataset.start)


def create_shard_loader(dataset: ShardDataset, batch_size: int, *, rank: int = 0, world_size: int = 1,
                        num_workers: int = 0, seed: int = 0, pin_memory: bool = False,
                        persistent_workers: bool = False) -> DataLoader:
    """A DataLoader over shards: ``collate_skip`` batches, ``seed_worker``, this rank's share (see the module
    docstring). ``batch_size`` is this rank's batch."""
    dataset.partition(rank, world_size, num_workers, batch_size)
    return create_loader(dataset, batch_size, num_workers=num_workers, seed=seed, pin_memory=pin_memory,
                         persistent_workers=persistent_workers, loader_class=ShardLoader)
