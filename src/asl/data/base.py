"""The dataset class shared by every loader, its collate function and DataLoader seeding."""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import random
import signal
from pathlib import Path, PurePath, PureWindowsPath
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from ..errors import DatasetError
from .cache import ResizeCache
from .transforms import EvalTransform, TrainTransform, UnreadableImageError, decode_and_resize, item_rng

__all__ = [
    "DatasetError",
    "LabelTable",
    "MultiLabelDataset",
    "Batch",
    "collate_skip",
    "seed_worker",
    "create_loader",
]

logger = logging.getLogger(__name__)

DOC_HINT = "see Datasets.md"


def missing_path_error(what: str, path) -> DatasetError:
    return DatasetError(f"{what} not found: {path} ({DOC_HINT} for the expected layout)")


def not_utf8_error(path, exc: UnicodeDecodeError, where: str = "") -> DatasetError:
    """``where``: how far reading got (``"after line 12"``), when the reader knows."""
    at = f"{where}, " if where else ""
    return DatasetError(f"{path} is not UTF-8 text ({at}undecodable byte at offset {exc.start} of a read block): "
                        f"save it as UTF-8")


def require_file(path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise missing_path_error(what, path)
    return path


def require_dir(path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise missing_path_error(what, path)
    return path


class LabelTable:
    """Sparse multi-label targets: each item's target is ``fill`` everywhere except for explicit class lists.

    ``parts`` maps a value (1.0 positive, 0.0 negative, -1.0 ignored/not annotated) to one list of class indices
    per item. Stored as CSR numpy arrays: compact for 9M Open Images rows, and no per-item Python objects whose
    reference counts would un-share forked DataLoader workers' memory.
    """

    def __init__(self, num_classes: int, fill: float, parts: dict[float, Sequence[Sequence[int]]]):
        self.num_classes = int(num_classes)
        self.fill = float(fill)
        self._parts = []
        n = None
        for value, lists in parts.items():
            lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
            ptr = np.zeros(len(lists) + 1, dtype=np.int64)
            np.cumsum(lengths, out=ptr[1:])
            idx = np.fromiter((c for x in lists for c in x), dtype=np.int32, count=int(ptr[-1]))
            if idx.size and (idx.min() < 0 or idx.max() >= self.num_classes):
                raise ValueError("class index out of range")
            if n is not None and len(lists) != n:
                raise ValueError("every part needs one class list per item")
            n = len(lists)
            self._parts.append((np.float32(value), ptr, idx))
        self._len = n or 0

    def __len__(self) -> int:
        return self._len

    def target_array(self, i: int) -> np.ndarray:
        t = np.full(self.num_classes, self.fill, dtype=np.float32)
        for value, ptr, idx in self._parts:
            t[idx[ptr[i]:ptr[i + 1]]] = value
        return t

    def dense(self) -> np.ndarray:
        """All targets as an ``(N, num_classes)`` float32 array (for small sets and tests)."""
        return np.stack([self.target_array(i) for i in range(len(self))]) if len(self) else \
            np.zeros((0, self.num_classes), np.float32)


def _refuse_paths_outside(root, rel_paths: Sequence[str]) -> None:
    """An annotation file names pictures inside its dataset: an absolute path or a ``..`` would make the loader read
    (and a cache keep) any file the user can read. ``allow_outside_root=1`` permits them."""
    outside = [p for p in rel_paths
               if (p.startswith(("/", "\\")) or ".." in p or ":" in p[:3])
               and (os.path.isabs(p) or ".." in PurePath(p).parts or PureWindowsPath(p).drive)]
    if outside:
        raise DatasetError(f"{len(outside)} image path(s) point outside {root}, e.g. {outside[0]!r}; if that is "
                           f"intended, pass --dataset-option allow_outside_root=1")


class _PathTable:
    """Image paths as one UTF-8 blob plus offsets (see LabelTable for why not a list of str)."""

    def __init__(self, root, rel_paths: Sequence[str]):
        self.root = str(root)
        encoded = [p.encode("utf-8") for p in rel_paths]
        self._ptr = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._ptr[1:])
        self._blob = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self._ptr) - 1

    def __getitem__(self, i: int) -> str:
        rel = self._blob[self._ptr[i]:self._ptr[i + 1]].tobytes().decode("utf-8")
        return os.path.join(self.root, rel)


class MultiLabelDataset(Dataset):
    """Images plus multi-hot targets, with the original's train/eval transforms and an optional resize cache.

    See the package docstring (``asl.data``) for what ``__getitem__`` returns and how to seed per epoch.
    """

    def __init__(self, root, rel_paths: Sequence[str], labels: LabelTable, classes: Sequence[str], *,
                 image_size: int, train: bool, cache_dir=None, seed: int = 0, strict: bool = False,
                 with_index: bool = False, cutout_factor: float = 0.5, name: str = "", split: str = "",
                 allow_outside_root: bool = False):
        if not allow_outside_root:
            _refuse_paths_outside(root, rel_paths)
        if len(rel_paths) != len(labels):
            raise ValueError("one label row per image is needed")
        if labels.num_classes != len(classes):
            raise ValueError("labels and classes disagree on the number of classes")
        self.name = name
        self.split = split
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.image_size = int(image_size)
        self.train = bool(train)
        self.seed = int(seed)
        self.strict = bool(strict)
        self.with_index = bool(with_index)
        self.labels = labels
        # Rows dropped when the dataset was built because their image file does not exist (NUS-WIDE).
        self.num_missing = 0
        self._paths = _PathTable(root, rel_paths)
        self.cache = ResizeCache(cache_dir, self.image_size) if cache_dir is not None else None
        self.transform = TrainTransform(cutout_factor) if self.train else EvalTransform()
        # Shared-memory state, so that set_epoch() reaches persistent DataLoader workers and an unreadable file
        # is named once per run rather than once per worker and epoch.
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._unreadable = torch.zeros(len(labels), dtype=torch.uint8).share_memory_()
        self._shared()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_views", None)  # a worker makes its own views of the shared tensors, which travel instead
        return state

    def _shared(self) -> tuple[np.ndarray, np.ndarray]:
        """numpy views of the shared epoch and unreadable flags, made once per process (a worker makes its own):
        each item then reads plain memory, not a tensor (the training loop counts tensor reads as host syncs)."""
        views = self.__dict__.get("_views")
        if views is None or views[0] != os.getpid():
            views = (os.getpid(), self._epoch.numpy(), self._unreadable.numpy())
            self.__dict__["_views"] = views
        return views[1], views[2]

    # ---- the dataset contract
    def __len__(self) -> int:
        return len(self._paths)

    def image_path(self, i: int) -> str:
        return self._paths[i]

    def idx_to_class(self) -> dict[int, str]:
        return dict(enumerate(self.classes))

    def target(self, i: int) -> torch.Tensor:
        """The float32 target of item ``i`` without reading its image."""
        return torch.from_numpy(self.labels.target_array(i))

    def targets(self) -> np.ndarray:
        """All targets, ``(len, num_classes)`` float32 (dense: for small sets, tests and statistics)."""
        return self.labels.dense()

    # ---- epochs and skipped images
    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation of ``epoch``; call it before iterating the loader for that epoch."""
        self._epoch[0] = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._shared()[0][0])

    def num_unreadable(self) -> int:
        """How many distinct images have been found unreadable so far (in any worker)."""
        return int(self._unreadable.sum())

    def unreadable_paths(self) -> list[str]:
        return [self.image_path(i) for i in torch.nonzero(self._unreadable).flatten().tolist()]

    # ---- loading
    def load_resized(self, i: int) -> np.ndarray:
        """The decoded RGB image resized to ``(image_size, image_size)``: writable uint8 HWC (cache-aware)."""
        path = self.image_path(i)
        if self.cache is not None:
            return self.cache.load(path)
        return decode_and_resize(path, self.image_size)

    def __getitem__(self, index: int):
        index = int(index)
        if index < 0:
            index += len(self)
        unreadable = self._shared()[1]
        if unreadable[index] and not self.strict:
            return None
        try:
            arr = self.load_resized(index)
        except UnreadableImageError as exc:
            if self.strict:
                raise DatasetError(f"{exc} (strict data mode)") from exc
            if not unreadable[index]:
                unreadable[index] = 1
                logger.warning("skipping unreadable image %s (%s)", exc.path, exc.reason)
            return None
        rng = item_rng(self.seed, self.epoch, index) if self.train else None
        image = self.transform(arr, rng)
        target = self.target(index)
        if self.with_index:
            return image, target, index
        return image, target

    def __repr__(self) -> str:
        mode = "train" if self.train else "eval"
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, items={len(self)}, "
                f"classes={self.num_classes}, image_size={self.image_size}, {mode}, "
                f"cache={'on' if self.cache else 'off'})")


class Batch(NamedTuple):
    """What :func:`collate_skip` returns."""

    images: torch.Tensor            # uint8 (N, 3, S, S); N may be 0 when every item was unreadable
    targets: torch.Tensor           # float32 (N, num_classes)
    indices: Optional[torch.Tensor]  # int64 (N,) dataset indices with `with_index=True`, else None
    skipped: int                    # items of this batch dropped as unreadable


def collate_skip(batch) -> Batch:
    """Collate dataset items, dropping the ``None`` of unreadable images and counting them."""
    items = [item for item in batch if item is not None]
    skipped = len(batch) - len(items)
    if not items:
        return Batch(torch.empty((0, 3, 0, 0), dtype=torch.uint8), torch.empty((0, 0)),
                     torch.empty(0, dtype=torch.int64), skipped)
    fields = default_collate(items)
    indices = fields[2] if len(fields) > 2 else None
    return Batch(fields[0], fields[1], indices, skipped)


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seeds ``random`` and ``numpy.random`` of a DataLoader worker from torch's per-worker
    seed, and makes the worker ignore SIGINT and SIGTERM.

    The dataset's own augmentation does not use these global generators (it derives one generator per sample
    from (seed, epoch, index)); seeding only makes any other library that draws from them deterministic too.
    The signals: SLURM's scancel, systemd and ``kill -TERM -PGID`` signal the whole process group. A worker that
    died of it would take the run down before the main process could save; ignoring them lets the main process
    finish its step, save and shut the workers down itself (they also exit when the main process is gone).
    """
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)
    if torch.utils.data.get_worker_info() is not None:  # only ever in a worker process, never in the main one
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def stop_loader_workers() -> None:
    """Kills this process's daemonic ``multiprocessing`` children (DataLoader workers) and reaps them.

    Workers ignore SIGTERM (:func:`seed_worker`). A run that ends with an exception keeps its loaders alive in
    reference cycles through the exception's frames; at interpreter exit torch no longer shuts their workers down,
    and ``multiprocessing``'s exit handler sends them SIGTERM, which they ignore, then waits for them forever.
    :func:`stop_workers_at_exit` runs this first; the apps also call it after a failed run.
    """
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()


def stop_workers_at_exit(num_workers: int) -> None:
    """Has :func:`stop_loader_workers` run at interpreter exit, before ``multiprocessing``'s own exit handler
    (``atexit`` runs the last registered first), once a loader with ``num_workers`` > 0 is made."""
    if num_workers > 0:
        atexit.unregister(stop_loader_workers)  # registered once however many loaders are made
        atexit.register(stop_loader_workers)


def create_loader(dataset, batch_size: int, *, shuffle: bool = False, num_workers: int = 0, seed: int = 0,
                  sampler=None, drop_last: bool = False, pin_memory: bool = False,
                  persistent_workers: bool = False, loader_class: type = DataLoader) -> DataLoader:
    """A DataLoader wired for these datasets: ``collate_skip``, ``seed_worker`` and a seeded shuffling generator.
    ``loader_class``: a DataLoader subclass to build instead (the shards' own length)."""
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    stop_workers_at_exit(num_workers)
    return loader_class(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False,
                      sampler=sampler, num_workers=num_workers, collate_fn=collate_skip,
                      worker_init_fn=seed_worker, generator=generator, drop_last=drop_last,
                      pin_memory=pin_memory, persistent_workers=persistent_workers and num_workers > 0)
