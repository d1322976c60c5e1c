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


def _matches(actual: str, expected: Optional[str]) -> bool:
    return expected is None or actual.startswith(expected)


def download(url: str, sha256: Optional[str] = None, check: Optional[Callable[[str], Any]] = None,
             timeout: float = DOWNLOAD_TIMEOUT_S) -> str:
    """The local path of ``url``'s content: from the cache, or downloaded and checked.

    ``check(path)`` is called on the complete download before it enters the cache when no SHA-256 is known; it
    raises :class:`CheckpointError` for content that is no weights file. Raises :class:`CheckpointError` for a
    failed, silent, incomplete or mismatching download.
    """
    parsed = urllib.parse.urlparse(url)
    name = os.path.basename(parsed.path)
    if not name:
        raise CheckpointError(f"cannot tell a file name from the URL {url}")
    if parsed.scheme == "http" and parsed.hostname not in _LOOPBACK:
        logger.warning("downloading %s over plain http: nothing protects it in transit; prefer https or give "
                       "its SHA-256 (--model-sha256)", url)
    expected = expected_sha256(url, sha256)
    stem, suffix = os.path.splitext(name)
    key = hashlib.sha256(url.encode("utf-8")).hexdigest()[:12]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / f"{stem}-{key}{suffix}"
    if cached.is_file():
        # Hashing a large file costs seconds: only when there is a hash to compare with.
        if expected is None or _matches(sha256_of(cached), expected):
            logger.info("using cached %s", cached)
            return str(cached)
        logger.warning("cached %s does not match the expected SHA-256: downloading it again", cached)
    logger.info("downloading %s to %s", url, cached)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            atomic_write(cached, lambda f: _receive(response, f, url, expected, None if expected else check))
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
             check: Optional[Callable[[str], Any]]) -> None:
    """Streams the body into ``out``, then checks its length, its hash and that it loads (raising leaves no file
    behind)."""
    from tqdm import tqdm

    announced = response.headers.get("Content-Length")
    total = int(announced) if announced and announced.isdigit() else None
    digest = hashlib.sha256()
    received = 0
    with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(url), disable=None, leave=False) as bar:
        for chunk in iter(lambda: response.read(_CHUNK), b""):
            out.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
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
