"""Checkpoint files: atomic saving and safe loading (never runs pickled code) of every model source.

File format (the official model-zoo files and ours)::

    {'model': state_dict, 'num_classes': int, 'idx_to_class': {int: str}, ...extra keys of ours...}

Every value is loadable with ``torch.load(weights_only=True)``: tensors, numbers, strings, ``None``, and lists,
tuples and dicts of them (so ``args`` is stored as a plain dict, never an ``argparse.Namespace``).
:func:`load_checkpoint` also accepts a bare state dict (the original ``train.py`` saved those) and files whose
weights sit under ``'state_dict'``.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import pickletools
import re
import shutil
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

from .atomic import atomic_write
from .download import expected_sha256, is_url, sha256_of
from .errors import CheckpointError
from .sources import checkpoint_entries, resolve
from .state_dict import clean_state_dict

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "is_url",
    "make_model_checkpoint",
    "read_safetensors",
    "is_safetensors",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]



# ----------------------------------------------------------------------------------------------------- saving

def save_checkpoint(obj: Any, path: PathLike) -> None:
    """Write ``obj`` with ``torch.save`` atomically: the file at ``path`` is either the old one or the new one.

    The data goes to a temporary file in the same directory, is flushed to disk (fsync), and then replaces
    ``path`` with ``os.replace``; a crash or a full disk never leaves a truncated checkpoint behind. The parent
    directory is created if needed. Any failure raises :class:`CheckpointError` and removes the temporary file;
    a full disk is named as such, with the folder.
    """
    try:
        atomic_write(path, lambda f: torch.save(obj, f))
    except Exception as exc:
        full = disk_full_reason(exc)
        if full:
            folder = os.path.dirname(os.path.abspath(path))
            free = _free_bytes(path)
            # The partial file is gone by now, so this is the space the save had, not 0.
            room = f" ({free / 2**20:.0f} MiB free once its partial copy was removed)" if free is not None else ""
            raise CheckpointError(f"{full}: could not save {os.path.basename(path)} in {folder}{room}") from exc
        raise CheckpointError(f"could not save checkpoint to {path}: {type(exc).__name__}: {exc}") from exc
    logger.debug("saved checkpoint %s", path)


#: torch.save's own words for a write that fell short (it reports a full disk so, without an errno)
_SHORT_WRITE = re.compile(r"unexpected pos|file write failed|failed writing", re.IGNORECASE)


def disk_full_reason(exc: BaseException) -> Optional[str]:
    """'disk full' (or 'disk quota exceeded') when ``exc``, or an exception it was raised from or during, says the
    file system ran out of room; None otherwise."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    codes = [e.errno for e in chain if isinstance(e, OSError) and e.errno]
    if errno.ENOSPC in codes:
        return "disk full"
    if getattr(errno, "EDQUOT", None) in codes:
        return "disk quota exceeded"
    if codes:  # another system error (EIO, EROFS...): torch's short-write message then follows from that one
        return None
    if any(isinstance(e, RuntimeError) and _SHORT_WRITE.search(str(e)) for e in chain):
        return "disk full"
    return None


def _free_bytes(path: PathLike) -> Optional[int]:
    try:
        return shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    except OSError:
        return None


def _to_plain(value: Any, where: str) -> Any:
    """Convert ``value`` to types that ``torch.load(weights_only=True)`` accepts, or raise CheckpointError."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, torch.Tensor)):
        return value
    if isinstance(value, argparse.Namespace):
        return _to_plain(vars(value), where)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (torch.device, torch.dtype)):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, Mapping):
        plain = {k if isinstance(k, (str, int)) else str(k): _to_plain(v, f"{where}[{k!r}]")
                 for k, v in value.items()}
        return OrderedDict(plain) if isinstance(value, OrderedDict) else plain
    if isinstance(value, (list, tuple)):
        items = [_to_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise CheckpointError(f"cannot store {where} of type {type(value).__name__} in a checkpoint: only tensors, "
                          f"numbers, strings and lists/tuples/dicts of them load with weights_only=True")


def make_model_checkpoint(model_state: Mapping, num_classes: int, idx_to_class: Mapping, **extra: Any) -> Dict:
    """Build a checkpoint dict in the official format plus ``extra`` entries (e.g. ``args``, ``epoch``, ``mAP``).

    ``idx_to_class`` keys become ``int`` and values ``str`` (as in the official files); ``extra`` values are
    converted to weights-only-loadable types (``argparse.Namespace`` -> dict, paths -> str, NumPy -> Python/torch);
    anything else raises :class:`CheckpointError` now rather than producing a file that cannot be loaded.
    """
    ckpt: Dict[str, Any] = {
        "model": model_state,
        "num_classes": int(num_classes),
        "idx_to_class": {int(k): str(v) for k, v in idx_to_class.items()},
    }
    for key, value in extra.items():
        if key in ckpt:
            raise CheckpointError(f"make_model_checkpoint: {key!r} is set by the named arguments")
        ckpt[key] = _to_plain(value, key)
    return ckpt


# ---------------------------------------------------------------------------------------------------- loading

#: the one-character codes of pickle's instructions
_PICKLE_OPCODES = {op.code for op in pickletools.opcodes}


def _explain_unpickling_error(path: str, exc: Exception) -> CheckpointError:
    message = str(exc)
    found = re.search(r"Unsupported global: GLOBAL ([^\s]+)", message)
    if found:
        return CheckpointError(
            f"refusing to unpickle {path}: it is not a plain weights file (loading it would call "
            f"{found.group(1)}, i.e. run code from the file); re-save only its tensors from a trusted source")
    operand = re.search(r"Unsupported operand (\d+)", message)
    if operand and chr(int(operand.group(1))) not in _PICKLE_OPCODES:
        # Not a refused pickle instruction but a byte that is none: the file is no pickle at all (text, JSON...).
        return CheckpointError(f"could not read checkpoint {path}: not a torch checkpoint, or a damaged one (byte "
                               f"{int(operand.group(1))} is no pickle instruction)")
    if "Weights only load failed" in message:
        detail = re.search(r"WeightsUnpickler error:\s*(.+)", message)
        reason = detail.group(1).strip() if detail else "unsupported content"
        return CheckpointError(f"refusing to unpickle {path}: it is not a plain weights file ({reason})")
    if isinstance(exc, OSError):
        return CheckpointError(f"could not read checkpoint {path}: {exc.strerror or exc}")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return CheckpointError(f"could not read checkpoint {path}: the file is empty")
    # torch's own words stop at their first sentence: the rest can be long, or advise weights_only=False (unsafe, and
    # no cure for a damaged file); the unpickler may give a bare number (a KeyError of an unknown opcode).
    first = re.split(r"(?<=\.)\s", message.strip().splitlines()[0])[0] if message.strip() else ""
    detail = first if first and not first.isdigit() else f"{type(exc).__name__} {first}".strip()
    return CheckpointError(f"could not read checkpoint {path}: not a torch checkpoint, or a damaged (truncated) one "
                           f"({detail})")


def _numpy_safe_globals() -> list:
    """The only non-torch globals a checkpoint may reference: NumPy scalars and their dtypes, which older files
    (and many third-party ones) hold as ``num_classes``, ``mAP`` or ``numpy.str_`` class names. Both module names
    a NumPy scalar pickles under (NumPy 1 ``numpy.core``, NumPy 2 ``numpy._core``) map to the same constructor."""
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    return [np.dtype, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
            *[(cls, f"numpy.dtypes.{cls.__name__}") for cls in vars(getattr(np, "dtypes", np)).values()
              if isinstance(cls, type) and issubclass(cls, np.dtype) and cls is not np.dtype]]


def _plain_numbers(value: Any) -> Any:
    """NumPy scalars (from old files) as plain Python values, in nested dicts and lists too."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict) and not isinstance(value, OrderedDict):
        return {_plain_numbers(k): _plain_numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain_numbers(v) for v in value)
    return value


def _normalize(obj: Any, source: str) -> Dict:
    if isinstance(obj, Mapping) and not isinstance(obj, OrderedDict):
        obj = _plain_numbers(dict(obj))
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a checkpoint dict or a state dict")
    if "model" in obj and isinstance(obj["model"], Mapping):
        ckpt = dict(obj)
    elif "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        ckpt = {k: v for k, v in obj.items() if k != "state_dict"}
        ckpt["model"] = obj["state_dict"]
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        # original: train.py saved the bare state dict
        ckpt = {"model": obj}
    else:
        raise CheckpointError(f"{source} is neither a checkpoint (no 'model' or 'state_dict' entry) nor a state dict "
                              f"(keys: {sorted(map(str, obj))[:5]})")
    # The one place where wrapper prefixes (DataParallel's module., torch.compile's _orig_mod.) leave the keys.
    ckpt["model"] = clean_state_dict(ckpt["model"])
    return ckpt


def load_checkpoint(path_or_url: PathLike, map_location: Any = "cpu", sha256: Optional[str] = None) -> Dict:
    """Load a model source safely, as a dict with at least the key ``'model'`` (the state dict).

    - Sources (:mod:`asl.sources`): a ``.pth/.pt/.bin`` file, a ``.safetensors`` file, a folder with
      ``model.safetensors`` (or ``pytorch_model.bin``) and ``config.json``, ``hf-hub:ORG/NAME[@REVISION]``, or an
      ``http(s)`` URL. A ``config.json`` (ours or timm's) adds ``num_classes``, ``idx_to_class``, ``model_name``,
      ``image_size``.
    - Always ``torch.load(..., weights_only=True)``: a file that needs arbitrary code to unpickle (a pickled
      object whose reconstruction calls a function) is refused with :class:`CheckpointError`; nothing from it runs.
    - ``http://`` / ``https://`` URLs are downloaded once into ``torch.hub.get_dir()/checkpoints`` (progress bar)
      and loaded from there on later calls (see :mod:`asl.download`: keyed by the whole URL, checked).
    - ``sha256`` (64 hex digits), when given, must match the file's, downloaded or local.
    - A bare state dict is returned as ``{'model': state_dict}``; a ``'state_dict'`` entry is renamed ``'model'``.
    - A missing or unreadable file raises :class:`CheckpointError` naming the path.
    """
    source = os.fspath(path_or_url)
    remote = is_url(source)
    # A download enters the cache only once it loads (or matches its SHA-256): a cut or HTML body never does.
    resolved = resolve(source, sha256, check=lambda p: _read_weights(p, "cpu"))
    path = resolved.weights
    if sha256 and not remote and sha256_of(path) != expected_sha256(source, sha256):
        raise CheckpointError(f"{path} does not match the expected SHA-256 {sha256}")
    try:
        obj = _read_weights(path, map_location)
    except CheckpointError as exc:
        if remote:  # a cached file that no longer loads: say which file to delete so that the next run fetches it
            raise CheckpointError(f"{exc} (the cached download of {source}: delete {path} to fetch it again)") from None
        raise
    ckpt = _normalize(obj, path)
    if resolved.config:
        # The weights file's own entries win over its folder's config.json (ours stores both, alike).
        ckpt = {**checkpoint_entries(resolved.config), **ckpt}
    return ckpt


def is_safetensors(path: str) -> bool:
    """Whether the file's bytes are safetensors': an 8-byte little-endian header length, then a JSON object (a
    truncated one too, to be called a damaged safetensors file). torch files start otherwise: a zip archive with
    ``PK``, a legacy pickle with its protocol byte 0x80. The name does not decide: a safetensors file called
    ``.pth`` is read as one."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return (len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") >= 2
            and not head.startswith((b"PK", b"\x80")))


def read_safetensors(path: str) -> tuple[dict, dict]:
    """(state dict, the ``asl`` config stored in the file's metadata or {}) of a safetensors file."""
    try:
        from safetensors import safe_open
    except ImportError:
        raise CheckpointError(f"{path}: safetensors files need the safetensors package") from None
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for a truncated or foreign file
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"could not read the safetensors file {path}: {reason[:200]}") from None
    try:
        config = json.loads(metadata.get("asl", "{}"))
    except ValueError:
        config = {}
    return tensors, config if isinstance(config, dict) else {}


def _read_weights(path: str, map_location: Any) -> Any:
    """A weights file's content, its format told by its bytes: safetensors (with the config stored in its metadata)
    or a torch file."""
    if not is_safetensors(path):
        return _read(path, map_location)
    tensors, config = read_safetensors(path)
    if map_location not in (None, "cpu"):
        tensors = {k: v.to(map_location) for k, v in tensors.items()}
    return {"model": tensors, **checkpoint_entries({"asl": config})} if config else tensors


def _read(path: str, map_location: Any) -> Any:
    """``torch.load`` with ``weights_only=True`` (NumPy scalars allowed); any failure is a one-line error."""
    try:
        # An open file, not the path: torch reads a path ending in .safetensors as safetensors, and the bytes, not
        # the name, have decided by now.
        with torch.serialization.safe_globals(_numpy_safe_globals()), open(path, "rb") as f:
            return torch.load(f, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError (refused or corrupt), truncated zip, unreadable file...
        raise _explain_unpickling_error(path, exc) from exc
