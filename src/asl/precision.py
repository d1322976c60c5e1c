"""Reduced precision in one place: the ``--amp-dtype`` flag's names and the autocast context.

original: training runs under fp16 autocast (``torch.cuda.amp``); ``validate.py`` and ``infer.py`` run in fp32
with no autocast. The scripts keep those defaults and share one flag, ``--amp-dtype none|float16|bfloat16``.
Autocast applies on CUDA only: CPU autocast supports bf16 alone and is slower there than fp32, so the CPU always
computes in fp32.
"""
from __future__ import annotations

import argparse
import contextlib
from typing import Optional

import torch

__all__ = ["AMP_DTYPES", "amp_dtype_arg", "resolve_amp_dtype", "autocast", "autocast_disabled"]

#: ``--amp-dtype`` name -> autocast dtype; ``none`` is full fp32 precision.
AMP_DTYPES: dict[str, Optional[torch.dtype]] = {"none": None, "float16": torch.float16, "bfloat16": torch.bfloat16}


def amp_dtype_arg(value: str) -> str:
    """argparse ``type=`` for ``--amp-dtype``: one of :data:`AMP_DTYPES` (``fp32``/``float32`` mean ``none``)."""
    name = value.strip().lower()
    name = {"fp32": "none", "float32": "none", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}.get(name, name)
    if name not in AMP_DTYPES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(AMP_DTYPES)}, got {value!r}")
    return name


def resolve_amp_dtype(name: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype ``name`` asks for on ``device``: ``None`` (fp32) anywhere but CUDA."""
    return AMP_DTYPES[amp_dtype_arg(name)] if device.type == "cuda" else None


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``amp_dtype`` on ``device``, or a context that changes nothing when it is None."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype)


def autocast_disabled(device_type: str) -> contextlib.AbstractContextManager:
    """A context that turns autocast off for ``device_type`` (nothing to do where autocast does not exist).

    The losses use it: original: the loss is computed in fp32 on ``model(x).float()``.
    """
    is_available = getattr(torch.amp, "is_autocast_available", None)
    available = is_available(device_type) if is_available is not None else device_type in ("cpu", "cuda")
    return torch.autocast(device_type, enabled=False) if available else contextlib.nullcontext()
