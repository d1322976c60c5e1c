"""The on-disk format of WebDataset shards: what ``SPLIT.json`` holds, what one sample holds, and the checks that
make a file written by anyone (a remote server included) safe to follow.

A split is ``SPLIT.json`` plus tar files ``SPLIT-000000.tar``, ``SPLIT-000001.tar``, ... beside it. Each tar
holds samples in WebDataset's convention (members ``KEY.EXT``, grouped by ``KEY``):

- ``KEY.jpg`` / ``KEY.png`` / ...: the encoded picture, the original file's bytes unless the writer re-encoded
  it with a smaller longer side;
- ``KEY.json``: ``{"index": i, "source": "<file name in the dataset>", "fill": "negative"|"unknown",
  "positive": [...], "negative": [...], "unknown": [...]}``. ``index`` is the sample's position in the split
  (0..count-1, shard after shard, so evaluation can gather predictions by index); the target is ``fill``
  (0 or -1) everywhere except for the listed classes. Lists rather than a dense vector: Open Images has 9605
  classes and about ten labels per picture.

``SPLIT.json``: ``{"format": "asl-shards", "version": 1, "dataset", "split", "count", "shards": [{"name",
"count", "bytes"}, ...], "classes": [...], "idx_to_class": {"0": name, ...}, "skipped": [...], "max_side"}``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np

from ..errors import DatasetError

__all__ = ["FORMAT", "VERSION", "ShardInfo", "SplitMeta", "shard_name", "check_shard_name", "parse_split_meta",
           "encode_target", "decode_target", "sample_key", "IMAGE_EXTENSIONS"]

FORMAT = "asl-shards"
VERSION = 1

#: the picture members a sample may hold, by the suffix of the source file (lower case)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp", "ppm", "pgm")

#: a shard name: letters, digits, '.', '_', '-'; no '/' and no leading '.', so it cannot leave DATA, and no shell
#: metacharacter, so that it can be put into a ``pipe:`` command as it is.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def sample_key(index: int) -> str:
    # Digits only: WebDataset splits a member name at its first '.', so a key must not hold one.
    return f"{index:09d}"


def check_shard_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name) or ".." in name:
        raise DatasetError(f"{where}: shard name {str(name)[:80]!r} is not a plain file name (letters, digits, '.', "
                           f"'_', '-'; no '/', no '..'): refused")
    return name


@dataclass(frozen=True)
class ShardInfo:
    name: str
    count: int
    bytes: Optional[int] = None


@dataclass(frozen=True)
class SplitMeta:
    """A checked ``SPLIT.json``. ``first[k]`` is the index of shard ``k``'s first sample."""

    split: str
    dataset: str
    count: int
    shards: tuple[ShardInfo, ...]
    classes: tuple[str, ...]
    skipped: tuple[str, ...] = ()
    max_side: Optional[int] = None

    @property
    def first(self) -> list[int]:
        return [0] + list(np.cumsum([s.count for s in self.shards]))[:-1]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "dataset": self.dataset, "split": self.split,
                "count": self.count,
                "shards": [{"name": s.name, "count": s.count, "bytes": s.bytes} for s in self.shards],
                "classes": list(self.classes), "idx_to_class": {str(i): c for i, c in enumerate(self.classes)},
                "skipped": list(self.skipped), "max_side": self.max_side}


def _whole(value: Any, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DatasetError(f"{where}: {what} must be a whole number >= 0, got {str(value)[:40]!r}")
    return value


def parse_split_meta(text: bytes, where: str) -> SplitMeta:
    """The checked content of a ``SPLIT.json`` (``where`` names it in errors): JSON, our format, plain shard names,
    counts that add up, one class name per index."""
    try:
        raw = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{where} is not JSON ({exc}); write it again with shards.py") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise DatasetError(f"{where} is not a shard index written by shards.py (no \"format\": \"{FORMAT}\")")
    if raw.get("version") != VERSION:
        raise DatasetError(f"{where}: format version {raw.get('version')!r}, this code reads version {VERSION}")
    shards_raw, classes = raw.get("shards"), raw.get("classes")
    if not isinstance(shards_raw, list) or not isinstance(classes, list) or not classes \
            or not all(isinstance(c, str) for c in classes):
        raise DatasetError(f"{where}: \"shards\" must be a list and \"classes\" a non-empty list of names")
    shards = []
    for k, entry in enumerate(shards_raw):
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: shard entry {k} is not an object")
        name = check_shard_name(entry.get("name"), where)
        size = entry.get("bytes")
        shards.append(ShardInfo(name, _whole(entry.get("count"), f"the count of {name}", where),
                                None if size is None else _whole(size, f"the size of {name}", where)))
    if len({s.name for s in shards}) != len(shards):
        raise DatasetError(f"{where}: a shard is listed twice")
    count = _whole(raw.get("count"), "\"count\"", where)
    if count != sum(s.count for s in shards):
        raise DatasetError(f"{where}: \"count\" is {count} but its shards hold {sum(s.count for s in shards)} samples")
    idx_to_class = raw.get("idx_to_class")
    if idx_to_class is not None and idx_to_class != {str(i): c for i, c in enumerate(classes)}:
        raise DatasetError(f"{where}: \"idx_to_class\" does not match \"classes\"")
    skipped = raw.get("skipped") or []
    max_side = raw.get("max_side")
    return SplitMeta(split=str(raw.get("split", "")), dataset=str(raw.get("dataset", "")), count=count,
                     shards=tuple(shards), classes=tuple(classes),
                     skipped=tuple(str(s) for s in skipped) if isinstance(skipped, list) else (),
                     max_side=max_side if isinstance(max_side, int) and not isinstance(max_side, bool) else None)


def encode_target(target: np.ndarray) -> dict[str, Any]:
    """A float target (1 / 0 / -1) as the sample's label lists; the commoner of 0 and -1 is the fill."""
    t = np.asarray(target)
    unknown = np.flatnonzero(t < 0)
    negative = np.flatnonzero(t == 0)
    fill = "unknown" if unknown.size > negative.size else "negative"
    out: dict[str, Any] = {"fill": fill, "positive": np.flatnonzero(t > 0).tolist()}
    out["negative" if fill == "unknown" else "unknown"] = (negative if fill == "unknown" else unknown).tolist()
    return out


def decode_target(record: Mapping[str, Any], num_classes: int, unknown_as: float = -1.0) -> np.ndarray:
    """The float32 target of a sample's record; ``unknown_as`` replaces -1 (0 for training that counts
    unannotated labels as negatives). Raises ``ValueError`` for a record that does not fit ``num_classes``."""
    fill = record["fill"]
    if fill not in ("negative", "unknown"):
        raise ValueError(f"fill {fill!r}")
    t = np.full(num_classes, 0.0 if fill == "negative" else unknown_as, dtype=np.float32)
    for key, value in (("positive", 1.0), ("negative", 0.0), ("unknown", unknown_as)):
        idx = np.asarray(record.get(key, []), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= num_classes):
            raise ValueError(f"class index out of range in {key!r}")
        t[idx] = value
    return t
