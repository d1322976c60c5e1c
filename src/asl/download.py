"""Checkpoint URLs: downloaded once into the torch hub cache, never served wrong or half.

- The cached name carries a hash of the whole URL (``<name>-<12 hex>.pth``): two URLs ending in the same file name
  are two cache entries, so a file from one server is never served for another.
- A download goes to a temporary file beside its cache entry, is checked (the ``Content-Length`` the server
  announced; the SHA-256 when one is known, else the caller's ``check`` that it loads as a weights file) and only
  then renamed into place: an interrupted, overlong, wrong or HTML download leaves nothing behind.
- Connecting and every read give up after ``timeout`` seconds of silence, so a server that accepts and never
  answers ends the run with one line instead of hanging it.
- The expected SHA-256 comes from the caller (``--model-sha256``) or from torch hub's convention of a hash prefix
  in the file name (``name-<first hex digits of the sha256>.pth``). A cached file is checked again on every use
  when a hash is known.
- Plain ``http://`` to anything but this machine is allowed, with a warning: nothing protects the file in transit.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

import torch

from .atomic import atomic_write
from .errors import CheckpointError

__all__ = ["is_url", "download", "sha256_of", "expected_sha256", "OFFLINE_HINT"]

logger = logging.getLogger(__name__)

_LOOPBACK = ("localhost", "127.0.0.1", "::1")
_HASH_PREFIX = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")
_CHUNK = 1 << 20
#: seconds of silence (connecting, or between two reads) after which a download gives up
DOWNLOAD_TIMEOUT_S = 60.0
#: a transfer that brings fewer than STALL_BYTES within STALL_SECONDS has stalled (a server dripping a byte a
#: second never falls silent long enough for the timeout)
STALL_SECONDS = 60.0
STALL_BYTES = 64 << 10
#: seconds between two progress lines when the output is no terminal (a log file, a batch job)
PROGRESS_EVERY_S = 10.0
#: the longest cached file name, in bytes
_NAME_BYTES = 160
#: what to do without internet, for a URL and a Hub id alike
OFFLINE_HINT = ("without internet, fetch the file where there is internet (hf download ORG/NAME for a Hub id) and "
                "pass its local path")


def is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme in ("http", "https")


def sha256_of(path: os.PathLike | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def expected_sha256(url: str, sha256: Optional[str]) -> Optional[str]:
    """The full hash given by the caller, else the hash prefix in the URL's file name (torch hub), else None."""
    if sha256:
        if not re.fullmatch(r"[0-9a-fA-F]{64}", sha256.strip()):
            raise CheckpointError(f"--model-sha256 must be 64 hexadecimal digits, got {sha256!r}")
        return sha256.strip().lower()
    found = _HASH_PREFIX.search(os.path.basename(urllib.parse.urlparse(url).path))
    return found.group(1) if found else None


def cache_name(url: str) -> str:
    """The cached file's name: the URL's file name, cut to :data:`_NAME_BYTES` bytes, with a hash of the whole URL
    before its ending (a file system takes 255 bytes per name, and a temporary name adds some)."""
    name = urllib.parse.unquote(os.path.basename(urllib.parse.urlparse(url).path))
    stem, suffix = os.path.splitext(name)
    if len(suffix.encode("utf-8")) > 16 or not suffix[1:].isalnum():
        stem, suffix = name, ""
    key = hashlib.sha256(url.encode("utf-8")).hexdigest()[:12]
    room = _NAME_BYTES - len(suffix.encode("utf-8")) - len(key) - 1
    stem = stem.encode("utf-8")[:room].decode("utf-8", "ignore").replace(os.sep, "_") or "download"
    return f"{stem}-{key}{suffix}"


def _matches(actual: str, expected: Optional[str]) -> bool:
    return expected is None or actual.startswith(expected)


def download(url: str, sha256: Optional[str] = None, check: Optional[Callable[[str], Any]] = None,
             timeout: float = DOWNLOAD_TIMEOUT_S, stall: tuple[float, int] = (STALL_SECONDS, STALL_BYTES)) -> str:
    """The local path of ``url``'s content: from the cache, or downloaded and checked.

    ``check(path)`` is called on the complete download before it enters the cache when no SHA-256 is known; it
    raises :class:`CheckpointError` for content that is no weights file. Raises :class:`CheckpointError` for a
    failed, silent, stalled (fewer than ``stall[1]`` bytes in ``stall[0]`` seconds), incomplete or mismatching
    download.
    """
    parsed = urllib.parse.urlparse(url)
    name = os.path.basename(parsed.path)
    if not name:
        raise CheckpointError(f"cannot tell a file name from the URL {url}")
    if parsed.scheme == "http" and parsed.hostname not in _LOOPBACK:
        logger.warning("downloading %s over plain http: nothing protects it in transit; prefer https or give "
                       "its SHA-256 (--model-sha256)", url)
    expected = expected_sha256(url, sha256)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / cache_name(url)
    if cached.is_file():
        # Hashing a large file costs seconds: only when there is a hash to compare with.
        if expected is None or _matches(sha256_of(cached), expected):
            logger.info("using cached %s", cached)
            return str(cached)
        logger.warning("cached %s does not match the expected SHA-256: downloading it again", cached)
    logger.info("downloading %s to %s", url, cached)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            atomic_write(cached, lambda f: _receive(response, f, url, expected, None if expected else check, stall))
    except CheckpointError:
        raise
    except (socket.timeout, TimeoutError) as exc:
        raise CheckpointError(f"no answer from {parsed.hostname} within {timeout:g} s while downloading {url}; "
                              f"nothing was cached ({OFFLINE_HINT})") from exc
    except urllib.error.HTTPError as exc:
        raise CheckpointError(f"could not download {url}: HTTP {exc.code} {exc.reason} (see MODEL_ZOO.md for where "
                              f"the weights are; {OFFLINE_HINT})") from exc
    except Exception as exc:
        reason = getattr(exc, "reason", None) or exc
        raise CheckpointError(f"could not download {url}: {reason} ({OFFLINE_HINT})") from exc
    return str(cached)


def _receive(response, out: BinaryIO, url: str, expected: Optional[str],
             check: Optional[Callable[[str], Any]], stall: tuple[float, int]) -> None:
    """Streams the body into ``out``, then checks its length, its hash and that it loads (raising leaves no file
    behind)."""
    announced = response.headers.get("Content-Length")
    total = int(announced) if announced and announced.isdigit() else None
    digest = hashlib.sha256()
    received = 0
    # read1 returns what one read of the socket brings: read(n) would wait for all n bytes of a dripping server.
    read = getattr(response, "read1", response.read)
    window_start, window_bytes = time.monotonic(), 0
    with _Progress(os.path.basename(urllib.parse.urlparse(url).path), total) as progress:
        for chunk in iter(lambda: read(_CHUNK), b""):
            out.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            window_bytes += len(chunk)
            progress.update(len(chunk))
            now = time.monotonic()
            if now - window_start >= stall[0]:
                if window_bytes < stall[1]:
                    raise CheckpointError(f"the download of {url} stalled: {window_bytes} bytes in the last "
                                          f"{now - window_start:.0f} s ({received} in all); nothing was cached, try "
                                          f"again later ({OFFLINE_HINT})")
                window_start, window_bytes = now, 0
    if total is not None and received != total:
        raise CheckpointError(f"incomplete download of {url}: {received} of {total} bytes (the connection was cut); "
                              f"nothing was cached, try again")
    if not _matches(digest.hexdigest(), expected):
        raise CheckpointError(f"{url} does not match the expected SHA-256 {expected} (got {digest.hexdigest()}); "
                              f"nothing was cached")
    if check is not None:
        out.flush()
        try:
            check(out.name)
        except CheckpointError as exc:
            raise CheckpointError(f"the download of {url} is not a weights file: {_describe(out.name, received, exc)}"
                                  f"; nothing was cached") from None


class _Progress:
    """A progress bar on a terminal; elsewhere (a log file, a batch job) a log line every PROGRESS_EVERY_S."""

    def __init__(self, name: str, total: Optional[int]) -> None:
        self.name, self.total, self.done = name, total, 0
        self.bar = None
        self.last = time.monotonic()

    def __enter__(self) -> "_Progress":
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, unit="B", unit_scale=True, desc=self.name, leave=False)
        return self

    def update(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        elif time.monotonic() - self.last >= PROGRESS_EVERY_S:
            self.last = time.monotonic()
            share = f"{100 * self.done / self.total:.0f}% of {self.total / 2**20:.1f} MiB" if self.total else \
                f"{self.done / 2**20:.1f} MiB"
            logger.info("downloading %s: %s", self.name, share)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()


def _describe(path: str, size: int, failure: CheckpointError) -> str:
    """What arrived, in a few words: nothing, an HTML page (a login or error page sent with status 200), or why the
    bytes did not load, naming the URL's file rather than the temporary one."""
    if size == 0:
        return "the server sent an empty body"
    with open(path, "rb") as f:
        head = f.read(64).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return f"the server sent an HTML page ({size} bytes), probably an error or login page"
    return f"{size} bytes: " + str(failure).replace(path, "the downloaded file")
