"""Weight-layout conversions: timm's TResNet <-> the official layout, and architecture detection."""
from __future__ import annotations

import logging
import re
from typing import Mapping

import torch

from ..errors import UnknownArchitectureError
from ..state_dict import clean_state_dict
from .tresnet import TRESNET_CONFIGS

__all__ = ["is_timm_tresnet_layout", "convert_timm_tresnet", "detect_architecture", "strip_prefixes"]

logger = logging.getLogger(__name__)

# timm stores the scale that InPlaceABN actually applies, |w| + eps; the official files store w itself.
_ABN_EPS = 1e-5

# Stem width (output channels of body.conv1) identifies the model: int(64 * width_factor).
_STEM_WIDTH = {int(64 * width): name for name, (_, width) in TRESNET_CONFIGS.items()}


def strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drops DistributedDataParallel / torch.compile prefixes and ``num_batches_tracked`` counters."""
    return dict(clean_state_dict(state_dict, drop_counters=True))


def is_timm_tresnet_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return "body.conv1.conv.weight" in state_dict


def _has_blur(layer: int, block: int, conv: int) -> bool:
    # The blur-downsample sits in the first block of stages 2-4: in conv1 of the BasicBlock (stage 2),
    # in conv2 of the Bottlenecks (stages 3 and 4).
    if block != 0 or layer < 2:
        return False
    return conv == (1 if layer == 2 else 2)


def convert_timm_tresnet(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of timm's ``checkpoint_filter_fn`` for TResNet: timm keys and BN scales -> official layout.

    timm folds InPlaceABN's ``|w| + 1e-5`` into an ordinary BatchNorm weight. We store ``w = s - 1e-5`` so
    that our ``|w| + 1e-5`` gives back ``s``. A scale below 1e-5 (negative or ~0) has no exact preimage; it
    is clamped to 0, which changes that channel's scale by at most 1e-5 and is logged.
    """
    out: dict[str, torch.Tensor] = {}
    clamped = 0
    for key, value in strip_prefixes(state_dict).items():
        new_key = key
        block = re.match(r"body\.layer(\d)\.(\d+)\.conv(\d)\.(conv|bn)\.(.+)$", key)
        if block:
            layer, index, conv, kind, rest = block.groups()
            slot = "0" if kind == "conv" else "1"
            nest = "0." if _has_blur(int(layer), int(index), int(conv)) else ""
            new_key = f"body.layer{layer}.{index}.conv{conv}.{nest}{slot}.{rest}"
        else:
            new_key = re.sub(r"\.(conv1|downsample\.1)\.conv\.", r".\1.0.", new_key)
            new_key = re.sub(r"\.(conv1|downsample\.1)\.bn\.", r".\1.1.", new_key)
        if key.endswith("bn.weight"):
            clamped += int((value < _ABN_EPS).sum())
            value = (value - _ABN_EPS).clamp(min=0)
        out[new_key] = value
    if clamped:
        logger.warning("%d BatchNorm scales below 1e-5 cannot be expressed as |w|+1e-5 and were clamped", clamped)
    return out


def detect_architecture(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Tells the TResNet variant, the head type and the class count from a state dict's shapes.

    Raises :class:`~asl.errors.UnknownArchitectureError` when the shapes are no TResNet's (a ``timm/<name>``
    network, say), so that callers can fall back to a name without hiding any other checkpoint problem.
    """
    sd = strip_prefixes(state_dict)
    if is_timm_tresnet_layout(sd):
        sd = convert_timm_tresnet(sd)
    stem = sd.get("body.conv1.0.weight")
    if stem is None:
        raise UnknownArchitectureError("not a TResNet state dict: it has no 'body.conv1.0.weight'")
    width = int(stem.shape[0])
    if width not in _STEM_WIDTH:
        raise UnknownArchitectureError(f"unknown TResNet stem width {width}; known: {sorted(_STEM_WIDTH)}")
    bottleneck = "head.fc.embedding_generator.0.weight" in sd
    head = sd.get("head.fc.FC.weight" if bottleneck else "head.fc.weight")
    return {
        "model_name": _STEM_WIDTH[width],
        "bottleneck_head": bottleneck,
        "num_classes": int(head.shape[0]) if head is not None else None,
    }
