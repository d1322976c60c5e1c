"""Convolutions with their weights reordered once, for CPU inference.

A CPU convolution through oneDNN (``F.conv2d`` on channels_last fp32) first reorders the weight into the blocked
layout its kernels read, and it does so on every call. For a 1x1 convolution that reorder is a copy of the whole
weight for a product that is itself short: on TResNet's 1x1 layers at 14x14 and 7x7 it costs 7% to 33% of the
layer's time (``benchmarks/bench_winograd.py --kind 1x1``). :class:`PackedConv2d` keeps the reordered weight and
calls oneDNN's convolution on it directly, as ``torch.compile``'s frozen CPU graphs do. The arithmetic is oneDNN's
either way.

Off the plain fp32 CPU path (gradients, autocast, other devices, tracing or export) the layer is ``F.conv2d``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fastpath import DerivedWeights, plain_cpu_inference

__all__ = ["PackedConv2d", "packing_available", "packing_eligible"]


def packing_available() -> bool:
    """oneDNN is in this torch build, with the two operators this layer calls (internal ones, used by
    ``torch.compile``; checked rather than assumed)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
            and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight"))


def packing_eligible(conv: nn.Module) -> bool:
    """A plain ungrouped ``nn.Conv2d`` with zero padding given as numbers."""
    return (type(conv) is nn.Conv2d and conv.groups == 1 and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str))


class PackedConv2d(nn.Module):
    """Inference-only stand-in for an eligible ``nn.Conv2d`` (same ``weight`` and ``bias``, same state-dict keys).

    The reordered weight is made on the first CPU call (oneDNN picks its layout for that call's input shape and
    still accepts other shapes), kept as a plain attribute (never saved, never copied: ``copy.deepcopy`` and pickle
    drop it and it is made again), and made again if the weight changes. It costs as much memory as the weight.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        if not packing_eligible(conv):
            raise ValueError(f"not an ungrouped zero-padded convolution: {conv}")
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self._packed = DerivedWeights()

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, weight reordered for oneDNN")

    def __getstate__(self) -> dict:
        # oneDNN's reordered tensors have no storage that copy or pickle could read.
        state = dict(super().__getstate__())
        state["_packed"] = DerivedWeights()
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or not plain_cpu_inference(self, x):  # F.conv2d also takes unbatched 3-D input
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        args = (list(self.padding), list(self.stride), list(self.dilation), 1)

        def make(weight: torch.Tensor) -> torch.Tensor:
            return torch._C._nn.mkldnn_reorder_conv2d_weight(weight.contiguous().to_mkldnn(), *args, list(x.shape))

        packed = self._packed.get(self.weight, "oneDNN", make)
        return torch.ops.mkldnn._convolution_pointwise(x, packed, self.bias, *args, "none", [], "")
