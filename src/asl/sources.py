"""Model sources: where the weights of ``--model-path`` (and ``pretrained=``) come from, one meaning everywhere.

- a ``.pth``, ``.pt`` or ``.bin`` file (the official model-zoo files and ours: read by :mod:`asl.checkpoint`);
- a ``.safetensors`` file;
- a folder holding ``model.safetensors`` (or ``pytorch_model.bin``) and ``config.json``: the layout of the Hugging
  Face Hub, which ``export.py --format hf`` writes and timm's Hub models use;
- ``hf-hub:ORG/NAME[@REVISION]``: that folder on the Hub, through ``huggingface_hub`` (its cache, ``HF_HOME``,
  ``HF_HUB_OFFLINE`` and its usual token);
- an ``http(s)`` URL of a file (:mod:`asl.download`).

:func:`resolve` turns a source into a local weights file and the ``config.json`` beside it, if any (only regular
files are taken, and a config of bounded size); :func:`checkpoint_entries` turns that config (ours, or timm's) into
the checkpoint entries the rest of the package reads (``num_classes``, ``idx_to_class``, ``model_name``,
``image_size``, ...). Reading the weights is :mod:`asl.checkpoint`'s job; this module imports neither it nor
:mod:`asl.models`.
"""
from __future__ import annotations

import json
import os
import re
import socket
import stat
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

from .download import OFFLINE_HINT, download, is_url
from .errors import CheckpointError
from .file_kind import NotRegularFileError, describe_mode, open_regular

__all__ = ["HUB_PREFIX", "WEIGHT_FILES", "CONFIG_FILE", "MAX_CONFIG_BYTES", "Resolved", "is_hub_id", "is_remote",
           "parse_hub_id", "resolve", "regular_file", "checkpoint_entries", "config_from_checkpoint"]

HUB_PREFIX = "hf-hub:"
#: the weights file of a folder or Hub repository, in order of preference (safetensors never runs code)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_FILE = "config.json"
#: the largest config.json read: ours lists the class names (Open Images' 9605 take about 300 KB)
MAX_CONFIG_BYTES = 16 << 20
#: the Hub's rule for each half of ORG/NAME: letters, digits, '-', '_', '.', at most 96 characters in all
_HUB_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?")
_HUB_ID_MAX = 96
#: seconds to wait for the Hub's server to accept a connection before asking it for files
_PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Resolved:
    """A source made local: the weights file and the config beside it (or None)."""

    weights: str
    config: Optional[dict]


def is_hub_id(source: str) -> bool:
    return source.startswith(HUB_PREFIX)


def is_remote(source: Optional[str]) -> bool:
    """A source that may be downloaded (into a cache) before it is read: a Hub id or a URL."""
    return bool(source) and (is_hub_id(source) or is_url(source))


def _clip(text: str, limit: int = 80) -> str:
    """``text`` for a message: its repr, cut to about ``limit`` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def parse_hub_id(source: str) -> tuple[str, Optional[str]]:
    """``hf-hub:ORG/NAME[@REVISION]`` -> (``ORG/NAME``, revision or None); a malformed id is named as such."""
    repo, _, revision = source[len(HUB_PREFIX):].partition("@")
    parts = repo.split("/")
    if (len(parts) != 2 or len(repo) > _HUB_ID_MAX or not all(_HUB_NAME.fullmatch(p) for p in parts)
            or ".." in repo or "--" in repo or any(c.isspace() or not c.isprintable() for c in revision)):
        raise CheckpointError(f"malformed Hub id {_clip(source)}: a Hub id is hf-hub:ORG/NAME or "
                              f"hf-hub:ORG/NAME@REVISION (letters, digits, '-', '_' and '.', at most {_HUB_ID_MAX} "
                              f"characters)")
    return repo, revision or None


def regular_file(path: str, origin: Optional[str] = None) -> str:
    """``path`` when it names a regular file, links followed (the Hub cache links its snapshots to blobs);
    :class:`CheckpointError` otherwise: a pipe or a device would block or never end, and is never a weights file."""
    origin = origin or path
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        dangling = " (a link to nothing)" if os.path.islink(path) else ""
        raise CheckpointError(f"checkpoint not found: {origin}{dangling}") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {origin}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{origin} is not a regular file: it is {describe_mode(mode)}")
    return path


def resolve(source: str, sha256: Optional[str] = None, check: Optional[Callable[[str], Any]] = None) -> Resolved:
    """The local weights file (and config) of ``source``; downloads what is remote. ``check`` vets a download
    before it is cached (see :func:`asl.download.download`)."""
    if is_hub_id(source):
        return _resolve_hub(source)
    if is_url(source):
        return Resolved(download(source, sha256, check=check), None)
    if os.path.isdir(source):
        return _resolve_folder(Path(source))
    return Resolved(regular_file(source), None)


def _read_config(path: str, origin: str) -> dict:
    """A config.json, read only if it is a regular file of at most :data:`MAX_CONFIG_BYTES` (links followed)."""
    try:
        f = open_regular(path)
    except NotRegularFileError as exc:
        raise CheckpointError(f"{origin}: its {CONFIG_FILE} is {exc.strerror}") from None
    except OSError as exc:
        raise CheckpointError(f"{origin}: cannot read its {CONFIG_FILE} ({exc.strerror or exc})") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_CONFIG_BYTES:
            raise CheckpointError(f"{origin}: its {CONFIG_FILE} holds {size} bytes, more than the "
                                  f"{MAX_CONFIG_BYTES >> 20} MiB a config can take")
        data = f.read(MAX_CONFIG_BYTES)
    try:
        config = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{origin}: cannot read its {CONFIG_FILE} ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{origin}: its {CONFIG_FILE} is not a JSON object")
    return config


def _resolve_folder(folder: Path) -> Resolved:
    weights = next((folder / name for name in WEIGHT_FILES if os.path.lexists(folder / name)), None)
    if weights is None:
        raise CheckpointError(f"{folder} is a folder without weights: it needs {' or '.join(WEIGHT_FILES)} (and "
                              f"{CONFIG_FILE}), as export.py --format hf writes")
    config_path = folder / CONFIG_FILE
    config = _read_config(str(config_path), str(folder)) if os.path.lexists(config_path) else None
    return Resolved(regular_file(str(weights)), config)


# ----------------------------------------------------------------------------------------- the Hub

def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _hub_cache_dir() -> str:
    """huggingface_hub's cache folder as the environment names it now (its own constants are read at import)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def _hub_unreachable() -> Optional[str]:
    """Why the Hub is evidently out of reach (offline mode, a refused connection, an unknown host), or None.

    huggingface_hub retries a refused connection for about 25 s per file, printing each try; one quick probe of the
    endpoint (or of the proxy the environment names for it) tells the same at once. A slow answer is left to the
    client."""
    from huggingface_hub import constants

    if _env_flag("HF_HUB_OFFLINE") or constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)
    proxies = urllib.request.getproxies()
    proxy = None if urllib.request.proxy_bypass(endpoint.hostname or "") else (
        proxies.get(endpoint.scheme) or proxies.get("all"))
    target = urllib.parse.urlparse(proxy if "://" in (proxy or "://") else f"http://{proxy}") if proxy else endpoint
    port = target.port or (443 if target.scheme == "https" else 80)
    what = f"the proxy {target.hostname}:{port}" if proxy else f"{target.hostname}:{port}"
    try:
        with socket.create_connection((target.hostname, port), timeout=_PROBE_TIMEOUT_S):
            return None
    except (ConnectionRefusedError, socket.gaierror) as exc:
        return f"{what} is unreachable ({exc.strerror or exc})"
    except (OSError, ValueError):  # a timeout, a slow network, an odd proxy setting: the client decides
        return None


class _Absent:
    """The repository has no such file (the Hub said so, or its cache records it)."""


def _resolve_hub(source: str) -> Resolved:
    repo, revision = parse_hub_id(source)
    try:
        import huggingface_hub
        from huggingface_hub import errors as hub_errors
    except ImportError:
        raise CheckpointError(f"{source}: Hub ids need the huggingface_hub package (pip install huggingface_hub)"
                              ) from None

    # The Hub says a file is absent with EntryNotFoundError; its offline "not in the cache" error is a subclass of
    # it, and must not be read as "this repository has no such file".
    absent = (hub_errors.RemoteEntryNotFoundError if hasattr(hub_errors, "RemoteEntryNotFoundError")
              else hub_errors.EntryNotFoundError)
    cache = _hub_cache_dir()
    offline = _hub_unreachable()

    def fetch(filename: str) -> Union[str, type, None]:
        """The local path of the repository's file, _Absent when it has none, None when the cache cannot tell."""
        nonlocal offline
        if offline is None:
            try:
                return huggingface_hub.hf_hub_download(repo, filename, revision=revision, cache_dir=cache,
                                                       library_name="asl")
            except hub_errors.LocalEntryNotFoundError:
                offline = "the Hub did not answer"
            except absent:
                return _Absent
            except Exception as exc:  # every failure of the Hub client is the user's source or network, in one line
                raise _hub_error(source, exc) from None
        return _from_cache(huggingface_hub, repo, filename, revision, cache, source)

    config_file = fetch(CONFIG_FILE)
    found = []
    for name in WEIGHT_FILES:  # in order, stopping at the first: a repository may hold both, large
        found.append(fetch(name))
        if isinstance(found[-1], str):
            break
    weights = found[-1] if isinstance(found[-1], str) else None
    if weights is None:
        if all(path is _Absent for path in found):
            raise CheckpointError(f"{source} holds no weights file ({' or '.join(WEIGHT_FILES)})")
        raise CheckpointError(f"{source}: {offline} and its weights are not in the Hub cache ({cache}); "
                              f"{OFFLINE_HINT}")
    config = _read_config(config_file, source) if isinstance(config_file, str) else None
    return Resolved(regular_file(weights, f"{source}: its {os.path.basename(weights)}"), config)


def _from_cache(huggingface_hub, repo: str, filename: str, revision: Optional[str], cache: str,
                source: str) -> Union[str, type, None]:
    """What the cached snapshot holds for ``filename``: its path, _Absent (huggingface_hub recorded that the
    repository has no such file), or None. A snapshot entry that exists but is no regular file is refused here,
    where huggingface_hub's lookup would report it as missing."""
    found = huggingface_hub.try_to_load_from_cache(repo, filename, cache_dir=cache, revision=revision)
    if isinstance(found, str):
        return found
    if found is not None:  # huggingface_hub's _CACHED_NO_EXIST
        return _Absent
    from huggingface_hub.file_download import repo_folder_name

    folder = Path(cache) / repo_folder_name(repo_id=repo, repo_type="model")
    ref = folder / "refs" / (revision or "main")
    commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else (revision or "main")
    entry = folder / "snapshots" / commit / filename
    if os.path.lexists(entry):
        regular_file(str(entry), f"{source}: its cached {filename}")
    return None


def _hub_error(source: str, exc: Exception) -> CheckpointError:
    from huggingface_hub import errors as hub_errors

    if isinstance(exc, hub_errors.HFValidationError):
        return CheckpointError(f"malformed Hub id {_clip(source)}: a Hub id is hf-hub:ORG/NAME or "
                               f"hf-hub:ORG/NAME@REVISION")
    if isinstance(exc, hub_errors.GatedRepoError):
        return CheckpointError(f"{source}: HTTP 403, a gated repository: accept its terms on the Hub and log in "
                               f"(hf auth login)")
    if isinstance(exc, hub_errors.RepositoryNotFoundError):
        return CheckpointError(f"{source}: no such repository on the Hub (HTTP 401/404; a private one needs "
                               f"hf auth login); see MODEL_ZOO.md for the ids of the weights")
    if isinstance(exc, hub_errors.RevisionNotFoundError):
        return CheckpointError(f"{source}: no such revision on the Hub")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CheckpointError(f"{source}: the Hub answered {'HTTP ' + str(status) if status else _clip(reason, 200)}; "
                           f"see MODEL_ZOO.md ({OFFLINE_HINT})")


def _whole(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def checkpoint_entries(config: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint entries a ``config.json`` gives: ours (``export.py --format hf``) or timm's.

    timm's names the architecture (``architecture``), the class count and, in ``pretrained_cfg``, the input size
    and sometimes the label names. Its architecture becomes ``timm/<architecture>`` (:mod:`asl.models.loading`
    builds timm's TResNets as ours, converting their BatchNorm layout).
    """
    entries: dict[str, Any] = {}
    if "asl" in config and isinstance(config["asl"], Mapping):
        ours = config["asl"]
        for key in ("model_name", "bottleneck_head", "head", "num_of_groups", "decoder_embedding", "num_classes",
                    "image_size", "thresholds", "threshold"):
            if key in ours:
                entries[key] = ours[key]
        names = ours.get("class_names")
        if isinstance(names, list):
            entries["idx_to_class"] = {i: str(n) for i, n in enumerate(names)}
        return entries
    architecture = config.get("architecture")
    if isinstance(architecture, str) and architecture:
        entries["model_name"] = f"timm/{architecture}"
    pretrained = config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), Mapping) else {}
    classes = _whole(config.get("num_classes")) or _whole(pretrained.get("num_classes"))
    if classes:
        entries["num_classes"] = classes
    size = pretrained.get("test_input_size") or pretrained.get("input_size")
    if isinstance(size, (list, tuple)) and size and _whole(size[-1]):
        entries["image_size"] = int(size[-1])
    names = config.get("label_names") or pretrained.get("label_names")
    if isinstance(names, list) and classes and len(names) == classes:
        entries["idx_to_class"] = {i: str(n) for i, n in enumerate(names)}
    return entries


def config_from_checkpoint(ckpt: Mapping[str, Any], class_names: list, image_size: int,
                           thresholds: Optional[Mapping[str, float]] = None,
                           threshold: Optional[float] = None) -> dict[str, Any]:
    """The ``config.json`` of an exported model: timm's keys (so timm tools can read it) and ours under ``asl``."""
    model_name = str(ckpt.get("model_name", ""))
    asl: dict[str, Any] = {
        "model_name": model_name,
        "bottleneck_head": bool(ckpt.get("bottleneck_head", False)),
        **{key: ckpt[key] for key in ("head", "num_of_groups", "decoder_embedding") if ckpt.get(key) is not None},
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "image_size": int(image_size),
        "input": "RGB in [0, 1], resized (squished) to image_size x image_size, no mean/std normalisation",
        "output": "logits; sigmoid gives per-class probabilities",
    }
    if threshold is not None:
        asl["threshold"] = float(threshold)
    if thresholds:
        asl["thresholds"] = {str(k): float(v) for k, v in thresholds.items()}
    architecture = model_name[len("timm/"):] if model_name.startswith("timm/") else model_name
    return {
        "architecture": architecture,
        "num_classes": len(class_names),
        "label_names": list(class_names),
        "pretrained_cfg": {"input_size": [3, int(image_size), int(image_size)], "mean": [0.0, 0.0, 0.0],
                           "std": [1.0, 1.0, 1.0], "interpolation": "bilinear", "crop_pct": 1.0,
                           "num_classes": len(class_names)},
        "asl": asl,
    }
