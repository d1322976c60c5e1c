"""Reduced precision in one place: the ``--amp-dtype`` flag's names and the autocast context.

original: training runs under fp16 autocast on CUDA (``torch.cuda.amp``); ``validate.py`` and ``infer.py`` run in
fp32 with no autocast. Every script shares one flag, ``--amp-dtype auto|none|float16|bfloat16``:

- ``auto`` (train.py's default): float16 on CUDA, as the original, and fp32 elsewhere;
- ``none`` (validate.py's and infer.py's default): fp32;
- an explicit dtype applies on any device, the CPU included, through ``torch.autocast``. On a CPU with native bf16
  (AVX512-BF16 or AMX on x86, the BF16 extension on Arm) oneDNN makes bf16 inference faster than fp32; elsewhere
  it is emulated and slow, and the run says so.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import platform
from pathlib import Path
from typing import Optional

import torch

__all__ = ["AMP_DTYPES", "amp_dtype_arg", "resolve_amp_dtype", "amp_dtype_name", "cpu_has_native_bf16",
           "autocast", "autocast_disabled"]

logger = logging.getLogger(__name__)

#: ``--amp-dtype`` name -> autocast dtype; ``none`` is full fp32 precision and ``auto`` is chosen per device.
AMP_DTYPES: dict[str, Optional[torch.dtype]] = {"auto": None, "none": None, "float16": torch.float16,
                                                "bfloat16": torch.bfloat16}

# /proc/cpuinfo flags of CPUs that compute bf16 in hardware (x86: AVX512-BF16, AMX; Arm: FEAT_BF16).
_NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def amp_dtype_arg(value: str) -> str:
    """argparse ``type=`` for ``--amp-dtype``: one of :data:`AMP_DTYPES` (``fp32``/``float32`` mean ``none``)."""
    name = value.strip().lower()
    name = {"fp32": "none", "float32": "none", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}.get(name, name)
    if name not in AMP_DTYPES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(AMP_DTYPES)}, got {value!r}")
    return name


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> Optional[bool]:
    """Whether this CPU computes bf16 in hardware; ``None`` where the system does not say (no /proc/cpuinfo)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return bool(_NATIVE_BF16_FLAGS & set(value.split()))
    return None


def resolve_amp_dtype(name: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype ``name`` asks for on ``device``; ``None`` means fp32.

    ``auto`` is float16 on CUDA and fp32 elsewhere. An explicit dtype is honoured on every device; on the CPU a
    dtype the processor does not compute natively gets one warning line, since it runs emulated and slowly.
    """
    name = amp_dtype_arg(name)
    if name == "auto":
        return torch.float16 if device.type == "cuda" else None
    dtype = AMP_DTYPES[name]
    if device.type == "cpu" and dtype is torch.bfloat16 and not cpu_has_native_bf16():
        logger.warning("--amp-dtype bfloat16 on a CPU without native bf16 (%s): it runs, emulated, and may be "
                       "slower than fp32", platform.machine() or "unknown CPU")
    elif device.type == "cpu" and dtype is torch.float16:
        logger.warning("--amp-dtype float16 on the CPU runs emulated on most processors and may be slower than "
                       "fp32; bfloat16 is the CPU's fast reduced precision")
    return dtype


def amp_dtype_name(dtype: Optional[torch.dtype]) -> str:
    """The ``--amp-dtype`` spelling of a resolved dtype (``none`` for fp32), as runs record it."""
    return {torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(dtype, "none")


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
