"""A per-image disk cache of the resized uint8 picture.

The original pipeline decodes and resizes every JPEG in every epoch, although ``Resize((s, s))`` is deterministic
and comes first. This cache keeps its output, so later epochs skip both with bit-identical pixels.

- One file per (image, size): ``<cache_dir>/<size>/<k[:2]>/<k>.u8`` holding the raw ``size*size*3`` HWC bytes,
  where ``k`` is a SHA-1 of the image's absolute path, size in bytes and mtime (ns). Editing or replacing an
  image changes its key, so a stale entry is never read.
- Writes are atomic (a temporary file in the same folder, then ``os.replace``), so any number of DataLoader
  workers, ranks or runs may share one cache: a reader sees either no file or a whole one, and concurrent writers
  of one entry write the same bytes.
- A file of the wrong length (e.g. a disk that filled up) is ignored and rewritten.
- Unreadable images are never cached; they fail again (cheaply: the dataset remembers them, see ``base.py``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_bytes
from .transforms import decode_and_resize

__all__ = ["ResizeCache"]

logger = logging.getLogger(__name__)


class ResizeCache:
    def __init__(self, cache_dir, size: int):
        self.root = Path(cache_dir).expanduser().resolve() / str(int(size))
        self.size = int(size)
        self._nbytes = self.size * self.size * 3
        self._made_dirs: set[str] = set()
        self._warned_write = False

    def entry_path(self, image_path) -> Path:
        path = os.path.abspath(image_path)
        st = os.stat(path)
        key = hashlib.sha1(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{self.size}".encode()).hexdigest()
        return self.root / key[:2] / f"{key}.u8"

    def load(self, image_path) -> np.ndarray:
        """The resized HWC uint8 image (a fresh writable array), from the cache or decoded and stored.

        Raises ``UnreadableImageError`` (from the decoder) when the image cannot be read.
        """
        try:
            entry = self.entry_path(image_path)
        except OSError:
            return decode_and_resize(image_path, self.size)  # raises UnreadableImageError naming the file
        try:
            data = np.fromfile(entry, dtype=np.uint8)
        except OSError:  # not cached yet (or unreadable cache: decode again)
            data = None
        if data is not None and data.size == self._nbytes:
            return data.reshape(self.size, self.size, 3)
        arr = decode_and_resize(image_path, self.size)
        self._store(entry, arr)
        return arr

    def _store(self, entry: Path, arr: np.ndarray) -> None:
        folder = str(entry.parent)
        try:
            if folder not in self._made_dirs:
                os.makedirs(folder, exist_ok=True)
                self._made_dirs.add(folder)
            atomic_write_bytes(entry, np.ascontiguousarray(arr).tobytes())
        except OSError as exc:
            # A full or read-only cache must not stop training: the pixels are the same without it.
            if not self._warned_write:
                self._warned_write = True
                logger.warning("could not write cache entry %s (%s); continuing without caching", entry, exc)
