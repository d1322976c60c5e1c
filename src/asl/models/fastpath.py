"""What the CPU inference layers (:mod:`.winograd`, :mod:`.packed`) share: when they may take their fast path, and a
cache of the tensors they derive from a weight, made again when that weight changes."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

__all__ = ["plain_cpu_inference", "DerivedWeights"]


def _exporting() -> bool:
    # torch.compiler.is_exporting arrived after torch 2.4, the oldest torch this package supports.
    check = getattr(torch.compiler, "is_exporting", None)
    return bool(check()) if check is not None else False


def plain_cpu_inference(module: nn.Module, x: torch.Tensor) -> bool:
    """True when ``module(x)`` is plain fp32 CPU arithmetic that nobody differentiates, traces, compiles or exports:
    the only case where a layer may compute its convolution another way than ``F.conv2d``."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not needs_grad
            and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in module.parameters())
            and not torch.is_autocast_enabled("cpu") and not torch.jit.is_tracing()
            and not torch.jit.is_scripting() and not torch.compiler.is_compiling()
            and not _exporting() and not torch.onnx.is_in_onnx_export())


class DerivedWeights:
    """Tensors made from one weight (transformed or reordered copies), kept until the weight changes.

    Stale when the parameter holds another tensor (``.half().float()``, a round trip through another device) or the
    same one changed in place (``load_state_dict``). Holding the source keeps its memory from being reused by a new
    weight at the same address, and its version counter is the parameter's. Inference tensors (made under
    ``torch.inference_mode``) have no version counter; they cannot change in place.
    """

    def __init__(self) -> None:
        self._items: dict = {}
        self._source = None
        self._version = -1

    def get(self, weight: torch.Tensor, key, make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The tensor ``make(weight)`` cached under ``key``; every key is dropped when ``weight`` changes."""
        weight = weight.detach()
        version = 0 if weight.is_inference() else weight._version
        if self._source is None or self._source.data_ptr() != weight.data_ptr() or self._version != version:
            self._items = {}
            self._source, self._version = weight, version
        if key not in self._items:
            with torch.no_grad():
                self._items[key] = make(weight)
        return self._items[key]
