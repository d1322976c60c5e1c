"""Model sources: where the weights of ``--model-path`` (and ``pretrained=``) come from, one meaning everywhere.

- a ``.pth``, ``.pt`` or ``.bin`` file (the official model-zoo files and ours: read by :mod:`asl.checkpoint`);
- a ``.safetensors`` file;
- a folder holding ``model.safetensors`` (or ``pytorch_model.bin``) and ``config.json``: the layout of the Hugging
  Face Hub, which ``export.py --format hf`` writes and timm's Hub models use;
- ``hf-hub:ORG/NAME[@REVISION]``: that folder on the Hub, through ``huggingface_hub`` (its cache, ``HF_HOME``,
  ``HF_HUB_OFFLINE`` and its usual token);
- an ``http(s)`` URL of a file (:mod:`asl.download`).

:func:`resolve` turns a source into a local weights file and the ``config.json`` beside it, if any;
:func:`checkpoint_entries` turns that config (ours, or timm's) into the checkpoint entries the rest of the package
reads (``num_classes``, ``idx_to_class``, ``model_name``, ``image_size``, ...).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from .download import OFFLINE_HINT, download, is_url
from .errors import CheckpointError

__all__ = ["HUB_PREFIX", "WEIGHT_FILES", "CONFIG_FILE", "Resolved", "is_hub_id", "is_remote", "parse_hub_id", "resolve",
           "read_safetensors", "checkpoint_entries", "config_from_checkpoint"]

HUB_PREFIX = "hf-hub:"
#: the weights file of a folder or Hub repository, in order of preference (safetensors never runs code)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONFIG_FILE = "config.json"


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


def parse_hub_id(source: str) -> tuple[str, Optional[str]]:
    """``hf-hub:ORG/NAME[@REVISION]`` -> (``ORG/NAME``, revision or None)."""
    repo, _, revision = source[len(HUB_PREFIX):].partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise CheckpointError(f"{source}: a Hub id is hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION")
    return repo, revision or None


def resolve(source: str, sha256: Optional[str] = None, check: Optional[Callable[[str], Any]] = None) -> Resolved:
    """The local weights file (and config) of ``source``; downloads what is remote. ``check`` vets a download
    before it is cached (see :func:`asl.download.download`)."""
    if is_hub_id(source):
        return _resolve_hub(source)
    if is_url(source):
        return Resolved(download(source, sha256, check=check), None)
    path = Path(source)
    if path.is_dir():
        return _resolve_folder(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {source}")
    return Resolved(source, None)


def _read_config(path: Path, origin: str) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{origin}: cannot read its {CONFIG_FILE} ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{origin}: its {CONFIG_FILE} is not a JSON object")
    return config


def _resolve_folder(folder: Path) -> Resolved:
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder} is a folder without weights: it needs {' or '.join(WEIGHT_FILES)} (and "
                              f"{CONFIG_FILE}), as export.py --format hf writes")
    config_path = folder / CONFIG_FILE
    config = _read_config(config_path, str(folder)) if config_path.is_file() else None
    return Resolved(str(weights), config)


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

    def fetch(filename: str) -> Optional[str]:
        """The local path of the repository's file, None when the repository has no such file."""
        try:
            return huggingface_hub.hf_hub_download(repo, filename, revision=revision, library_name="asl")
        except hub_errors.LocalEntryNotFoundError as exc:
            raise _hub_error(source, exc) from None
        except absent:
            return None
        except Exception as exc:  # every failure of the Hub client is the user's source or network, in one line
            raise _hub_error(source, exc) from None

    config_file = fetch(CONFIG_FILE)
    weights = next((path for path in map(fetch, WEIGHT_FILES) if path is not None), None)
    if weights is None:
        raise CheckpointError(f"{source} holds no weights file ({' or '.join(WEIGHT_FILES)})")
    config = _read_config(Path(config_file), source) if config_file else None
    return Resolved(weights, config)


def _hub_error(source: str, exc: Exception) -> CheckpointError:
    from huggingface_hub import errors as hub_errors

    if isinstance(exc, hub_errors.LocalEntryNotFoundError):
        return CheckpointError(f"{source}: the Hub is offline (HF_HUB_OFFLINE) or unreachable and the file is not in "
                               f"its cache; {OFFLINE_HINT}")
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
    return CheckpointError(f"{source}: the Hub answered {'HTTP ' + str(status) if status else reason}; see "
                           f"MODEL_ZOO.md ({OFFLINE_HINT})")


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
        raise CheckpointError(f"could not read the safetensors file {path}: {reason}") from None
    try:
        config = json.loads(metadata.get("asl", "{}"))
    except ValueError:
        config = {}
    return tensors, config if isinstance(config, dict) else {}


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


def weights_suffix(source: str) -> str:
    """The file ending that tells how to read a source's weights (``.safetensors`` or a torch file)."""
    return os.path.splitext(source.split("?")[0])[1].lower()
