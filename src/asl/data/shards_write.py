"""Writing a dataset split as WebDataset shards (format: :mod:`asl.data.shards_format`), resumably.

- Every image is decoded first, as the folder route would; one that cannot be read (missing, truncated, not an
  image) is skipped, named in ``SPLIT.json``'s ``skipped`` and counted. Indices are given to the written samples
  only, so they run 0..count-1 without gaps.
- By default a sample keeps the file's own bytes, so reading it gives the folder route's tensor exactly. With
  ``max_side`` a picture whose longer side is above it is resized (aspect kept, Lanczos) and re-encoded as JPEG
  quality 95; smaller pictures keep their bytes.
- A shard is written under a temporary name and renamed when complete (:func:`asl.atomic.atomic_write`), so a
  killed run never leaves a shard that looks finished. ``.SPLIT.progress.json`` records the finished shards
  (name, samples, bytes, and where in the dataset the next one starts); a rerun with the same dataset and
  settings checks each recorded shard (its size and the samples in its tar index) and goes on after the last good
  one. ``SPLIT.json`` is written last, atomically, and the progress record removed.
- Decoding (and re-encoding) runs in ``workers`` DataLoader processes; the shards are written in dataset order.
"""
from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from PIL import Image
from torch.utils.data import DataLoader, Dataset
from webdataset import TarWriter

from ..atomic import atomic_write, atomic_write_text, stale_temporaries
from ..errors import UsageError
from .shards_format import IMAGE_EXTENSIONS, ShardInfo, SplitMeta, encode_target, sample_key, shard_name
from .transforms import UnreadableImageError, load_rgb_and_bytes

__all__ = ["write_shards", "check_not_written", "WriteResult", "progress_path", "REENCODE_QUALITY"]

logger = logging.getLogger(__name__)

#: JPEG quality of pictures re-encoded for ``max_side``
REENCODE_QUALITY = 95
#: tar member times: fixed, so that the same data gives the same bytes on every run
_MTIME = 0


def progress_path(output: Path, split: str) -> Path:
    return Path(output) / f".{split}.progress.json"


class _Encoded(Dataset):
    """Item ``k``: source item ``start + k`` as ``(index, bytes or None, extension, reason, target)``."""

    def __init__(self, dataset, start: int, max_side: Optional[int]):
        self.dataset, self.start, self.max_side = dataset, int(start), max_side

    def __len__(self) -> int:
        return len(self.dataset) - self.start

    def __getitem__(self, k: int):
        i = self.start + int(k)
        path = self.dataset.image_path(i)
        target = self.dataset.target(i).numpy()
        try:
            # The folder route's decoder (what it cannot read is skipped here too), on the bytes the shard keeps.
            img, data = load_rgb_and_bytes(path)
        except (UnreadableImageError, OSError) as exc:
            return i, None, "", getattr(exc, "reason", None) or str(exc), target
        suffix = os.path.splitext(path)[1].lower().lstrip(".")
        ext = "jpg" if suffix == "jpeg" else suffix if suffix in IMAGE_EXTENSIONS else "img"
        if self.max_side is not None and max(img.size) > self.max_side:
            scale = self.max_side / max(img.size)
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            out = io.BytesIO()
            img.resize(size, Image.Resampling.LANCZOS).save(out, format="JPEG", quality=REENCODE_QUALITY)
            data, ext = out.getvalue(), "jpg"
        return i, data, ext, "", target


def _as_is(item):
    return item


class WriteResult:
    """What :func:`write_shards` did: the split's metadata, the shards written now and those kept from before."""

    def __init__(self, meta: SplitMeta, written: int, kept: int):
        self.meta, self.written, self.kept = meta, written, kept


class _Samples:
    """The source items from ``start`` on, in order, as tar samples numbered from ``next_index``; unreadable items
    are appended to ``skipped`` on the way."""

    def __init__(self, dataset, root, start: int, next_index: int, max_side: Optional[int], workers: int,
                 skipped: list[dict[str, Any]], on_item: Optional[Callable[[int], None]]):
        self.dataset, self.root, self.skipped, self.on_item = dataset, root, skipped, on_item
        self.source = start  # the source index after the last item taken
        self.next_index = next_index
        self._items = _items(dataset, start, max_side, workers)
        self._pending: Optional[dict[str, Any]] = None

    def has_more(self) -> bool:
        if self._pending is None:
            self._pending = self._pull()
        return self._pending is not None

    def take(self) -> Optional[dict[str, Any]]:
        sample = self._pending if self._pending is not None else self._pull()
        self._pending = None
        return sample

    def _pull(self) -> Optional[dict[str, Any]]:
        for i, data, ext, reason, target in self._items:
            self.source = i + 1
            if self.on_item is not None:
                self.on_item(1)
            source = _relative(self.dataset.image_path(i), self.root)
            if data is None:
                logger.warning("skipping unreadable image %s (%s)", self.dataset.image_path(i), reason)
                self.skipped.append({"source": source, "reason": reason, "end": i + 1})
                continue
            index = self.next_index
            self.next_index += 1
            record = {"index": index, "source": source, **encode_target(target)}
            return {"__key__": sample_key(index), ext: data, "json": json.dumps(record).encode("utf-8")}
        return None


def _tar_samples(path: Path) -> int:
    """The samples in a tar's index (distinct keys), read without the members' data."""
    with tarfile.open(path, "r:") as tar:
        return len({m.name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()})


def _verified_prefix(output: Path, record: dict[str, Any]) -> list[dict[str, Any]]:
    """The recorded shards, in order, up to the first that is missing or does not hold what was recorded."""
    good = []
    for entry in record.get("shards", []):
        path = output / str(entry.get("name"))
        try:
            ok = path.stat().st_size == entry["bytes"] and _tar_samples(path) == entry["count"]
        except (OSError, tarfile.TarError, KeyError, TypeError):
            ok = False
        if not ok:
            logger.warning("%s is not as recorded: writing it again", path)
            break
        good.append(entry)
    return good


def check_not_written(output, split: str) -> None:
    """:class:`UsageError` when ``output/SPLIT.json`` exists: the split is written, and nothing is written over."""
    final = Path(output) / f"{split}.json"
    if final.exists():
        raise UsageError(f"{final} exists: that split is written already (remove it and its shards to write it "
                         f"again)")


def write_shards(dataset, root, output, split: str, *, shard_size: int = 1000, max_side: Optional[int] = None,
                 workers: int = 0, dataset_name: str = "",
                 on_item: Optional[Callable[[int], None]] = None) -> WriteResult:
    """Writes ``dataset`` (any :func:`asl.data.create_dataset` dataset; its evaluation targets are stored) as
    ``output/SPLIT-NNNNNN.tar`` and ``output/SPLIT.json``. ``root``: the dataset's folder (sample sources are named
    relative to it); ``on_item(n)``: ``n`` more source items handled (a progress bar).

    Raises :class:`UsageError` when ``SPLIT.json`` already exists (the split is written; nothing is written over).
    """
    output = Path(output)
    check_not_written(output, split)
    output.mkdir(parents=True, exist_ok=True)
    params = {"dataset": dataset_name, "split": split, "source_count": len(dataset), "shard_size": int(shard_size),
              "max_side": max_side, "classes": list(dataset.classes)}
    record = _load_progress(output, split)
    shards: list[dict[str, Any]] = []
    if record is not None and record.get("params") == params:
        shards = _verified_prefix(output, record)
    elif record is not None:
        logger.warning("%s was written for another dataset or other settings: starting over",
                       progress_path(output, split))
    for stale in stale_temporaries(output, f"{split}-*.tar"):  # left by a killed run
        stale.unlink(missing_ok=True)
    start = shards[-1]["end"] if shards else 0
    skipped = [s for s in (record or {}).get("skipped", []) if s.get("end", start + 1) <= start]
    kept = len(shards)
    if on_item is not None and start:
        on_item(start)
    samples = _Samples(dataset, root, start, sum(s["count"] for s in shards), max_side, workers, skipped, on_item)
    while samples.has_more():
        name = shard_name(split, len(shards))
        count = _write_one(output / name, samples, shard_size)
        shards.append({"name": name, "count": count, "bytes": (output / name).stat().st_size,
                       "end": samples.source})
        _save_progress(output, split, params, shards, skipped)
    meta = SplitMeta(split=split, dataset=dataset_name, count=sum(s["count"] for s in shards),
                     shards=tuple(ShardInfo(s["name"], s["count"], s["bytes"]) for s in shards),
                     classes=tuple(dataset.classes), skipped=tuple(s["source"] for s in skipped), max_side=max_side)
    atomic_write_text(output / f"{split}.json", json.dumps(meta.to_json(), indent=1) + "\n")
    progress_path(output, split).unlink(missing_ok=True)
    return WriteResult(meta, len(shards) - kept, kept)


def _write_one(path: Path, samples: _Samples, shard_size: int) -> int:
    """Up to ``shard_size`` samples into ``path``, which appears only once it is complete."""
    count = 0

    def fill(f) -> None:
        nonlocal count
        with TarWriter(f, encoder=False, mtime=_MTIME) as tar:
            while count < shard_size and samples.has_more():
                tar.write(samples.take())
                count += 1

    atomic_write(path, fill)
    return count


def _items(dataset, start: int, max_side: Optional[int], workers: int) -> Iterator:
    encoded = _Encoded(dataset, start, max_side)
    if len(encoded) <= 0:
        return iter(())
    # In order: a DataLoader hands out its workers' items in index order, whatever order they finish in.
    return iter(DataLoader(encoded, batch_size=None, num_workers=workers, collate_fn=_as_is,
                           prefetch_factor=8 if workers else None))


def _relative(path: str, root) -> str:
    try:
        return os.path.relpath(path, root)
    except ValueError:  # another drive (Windows)
        return str(path)


def _load_progress(output: Path, split: str) -> Optional[dict[str, Any]]:
    try:
        record = json.loads(progress_path(output, split).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _save_progress(output: Path, split: str, params: dict, shards: list, skipped: list) -> None:
    atomic_write_text(progress_path(output, split),
                      json.dumps({"params": params, "shards": shards, "skipped": skipped}) + "\n")
