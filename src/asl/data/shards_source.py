"""Where a split's shards are read from: a local folder, an ``http(s)://`` base URL, or a ``pipe:`` command template.

- folder: ``DATA/NAME``;
- ``http://host/base`` or ``https://...``: ``GET base/NAME``; connecting and every read give up after ``timeout``
  seconds of silence (as model downloads do), so a stalled server ends the run with one line instead of hanging it;
  a shard whose ``Content-Length`` is not the size ``SPLIT.json`` recorded is refused before it is read;
- ``pipe:COMMAND`` with ``{name}`` where the file name goes, e.g. ``pipe:aws s3 cp s3://bucket/oi/{name} -``: the
  command's standard output is read (WebDataset's ``Pipe``, which fails when the command exits with an error).

Names are checked as plain file names (:func:`asl.data.shards_format.check_shard_name`) before they are put into
a path, a URL or a command, so a ``SPLIT.json`` from a server can neither reach outside DATA nor run a command.
"""
from __future__ import annotations

import io
import os
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import BinaryIO, Optional

from webdataset.gopen import gopen_pipe

from ..download import DOWNLOAD_TIMEOUT_S, is_url
from ..errors import DatasetError
from .shards_format import check_shard_name

__all__ = ["ShardSource", "ShardError", "is_remote_data"]


class ShardError(DatasetError):
    """A shard or shard index that cannot be read, named in the message (one line, also when it was raised in a
    DataLoader worker: :class:`asl.errors.AslError`)."""


def is_remote_data(data: str) -> bool:
    return str(data).startswith("pipe:") or is_url(str(data))


class ShardSource:
    """Opens the files of a shard folder, whatever holds it (see the module docstring)."""

    def __init__(self, data: str, timeout: float = DOWNLOAD_TIMEOUT_S):
        self.data = str(data)
        self.timeout = float(timeout)
        if self.data.startswith("pipe:"):
            self.kind = "pipe"
            if "{name}" not in self.data:
                raise DatasetError(f"{self.data}: a pipe: DATA needs {{name}} where the file name goes, e.g. "
                                   f"'pipe:aws s3 cp s3://bucket/folder/{{name}} -'")
        elif is_url(self.data):
            self.kind = "http"
        else:
            self.kind = "folder"

    def location(self, name: str) -> str:
        """The file's path, URL or command, for messages."""
        name = check_shard_name(name, self.data)
        if self.kind == "folder":
            return os.path.join(self.data, name)
        if self.kind == "http":
            return self.data.rstrip("/") + "/" + urllib.parse.quote(name)
        return self.data[len("pipe:"):].replace("{name}", name)

    def read_bytes(self, name: str) -> bytes:
        """A small file's whole content (``SPLIT.json``)."""
        where = self.location(name)
        try:
            with self.open(name) as f:
                return _read_all(f, where)
        except OSError as exc:  # a command that failed reports it when its pipe is closed
            raise ShardError(f"{where} cannot be read: {exc.strerror or exc}") from None

    def open(self, name: str, expected_bytes: Optional[int] = None) -> BinaryIO:
        """A stream of the file; :class:`ShardError` naming it when it cannot be opened."""
        where = self.location(name)
        if self.kind == "folder":
            try:
                if expected_bytes is not None and os.path.getsize(where) != expected_bytes:
                    raise ShardError(f"{where} has {os.path.getsize(where)} bytes but its index records "
                                     f"{expected_bytes}: truncated or replaced (write the shards again)")
                return open(where, "rb")
            except FileNotFoundError:
                raise ShardError(f"{where} not found") from None
            except IsADirectoryError:
                raise ShardError(f"{where} is a folder, not a shard") from None
            except OSError as exc:
                raise ShardError(f"{where} cannot be read: {exc.strerror or exc}") from None
        if self.kind == "http":
            return self._open_http(where, expected_bytes)
        try:
            return gopen_pipe("pipe:" + where, "rb")
        except (OSError, ValueError) as exc:
            raise ShardError(f"{where}: the command could not start ({exc})") from None

    def _open_http(self, url: str, expected_bytes: Optional[int]) -> BinaryIO:
        try:
            response = urllib.request.urlopen(url, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            raise ShardError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except (socket.timeout, TimeoutError):
            raise ShardError(f"{url}: no answer within {self.timeout:g} s") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise ShardError(f"{url} is unreachable: {getattr(exc, 'reason', None) or exc}") from None
        announced = response.headers.get("Content-Length")
        if expected_bytes is not None and announced and announced.isdigit() and int(announced) != expected_bytes:
            response.close()
            raise ShardError(f"{url} has {announced} bytes but its index records {expected_bytes}: truncated or "
                             f"replaced (write the shards again)")
        return response


def _read_all(f: BinaryIO, where: str) -> bytes:
    try:
        out = io.BytesIO()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            out.write(chunk)
        return out.getvalue()
    except (socket.timeout, TimeoutError):
        raise ShardError(f"{where}: the transfer stalled") from None
    except OSError as exc:
        raise ShardError(f"{where} cannot be read: {exc.strerror or exc}") from None
