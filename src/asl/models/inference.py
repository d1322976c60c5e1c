"""Inference copies of a network: eval mode, every conv+norm pair folded into one conv, the memory layout chosen
for the device."""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn

from .layers import ABN, fold_conv_abn

__all__ = ["prepare_for_inference", "default_channels_last", "CPU_CHANNELS_LAST_MIN_BATCH"]


def _fold_sequential(seq: nn.Sequential) -> None:
    """Replaces each (Conv2d, ABN) pair inside ``seq`` by a fused conv and the ABN's activation."""
    if len(seq) == 2 and isinstance(seq[0], nn.Conv2d) and isinstance(seq[1], ABN):
        fused, act = fold_conv_abn(seq[0], seq[1])
        seq[0] = fused
        seq[1] = act if act is not None else nn.Identity()


#: CPU batches from which channels_last weights pay (BENCHMARKS.md, "CPU inference")
CPU_CHANNELS_LAST_MIN_BATCH = 8


def default_channels_last(device: torch.device, batch_size: Optional[int] = None) -> bool:
    """The memory layout :func:`prepare_for_inference` picks on ``device`` for batches of ``batch_size``.

    channels_last on CUDA, where cuDNN's NHWC kernels (tensor cores under autocast) are the fast ones. On the CPU
    the weights' layout decides oneDNN's kernels: NCHW is the faster at batch 1 and channels_last from batch 8
    (BENCHMARKS.md, "CPU inference"), so NCHW unless the caller says its batches are that large.
    """
    if device.type == "cuda":
        return True
    return batch_size is not None and batch_size >= CPU_CHANNELS_LAST_MIN_BATCH


@torch.no_grad()
def prepare_for_inference(model: nn.Module, channels_last: Optional[bool] = None,
                          batch_size: Optional[int] = None) -> nn.Module:
    """An eval-mode copy with every conv+norm pair folded into one conv: the same function, fewer kernels.

    ``channels_last``: the memory layout of the weights; ``None`` picks it for the device the model is on and the
    ``batch_size`` it will see, if known (:func:`default_channels_last`). The given model is left untouched, so its
    parameters can keep training. The copy is for inference only: it has no norm layers left to train.
    """
    model = copy.deepcopy(model).eval()
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            _fold_sequential(module)
    if channels_last is None:
        first = next(model.parameters(), None)
        channels_last = default_channels_last(first.device if first is not None else torch.device("cpu"), batch_size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)
    return model
