"""Weight-layout conversions: timm's TResNet <-> the official layout, and architecture and head detection."""
from __future__ import annotations

import logging
import re
from typing import Any, Mapping, Optional

import torch

from ..errors import CheckpointError, UnknownArchitectureError
from ..state_dict import is_counter
from .tresnet import TRESNET_CONFIGS

__all__ = ["is_timm_tresnet_layout", "convert_timm_tresnet", "detect_architecture", "detect_head"]

logger = logging.getLogger(__name__)

# timm stores the scale that InPlaceABN actually applies, |w| + eps; the official files store w itself.
_ABN_EPS = 1e-5

ML_DECODER_PREFIX = "head.decoder."


def is_timm_tresnet_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return "body.conv1.conv.weight" in state_dict


def _has_blur(layer: int, block: int, conv: int, v2: bool) -> bool:
    # The blur-downsample sits in the first block of stages 2-4: in conv1 of a BasicBlock (stage 2 of TResNet
    # M/L/XL), in conv2 of a Bottleneck (stages 3 and 4, and stage 2 of the v2, whose first stages are Bottlenecks).
    if block != 0 or layer < 2:
        return False
    return conv == (1 if layer == 2 and not v2 else 2)


def convert_timm_tresnet(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of timm's ``checkpoint_filter_fn`` for TResNet: timm keys and BN scales -> official layout.

    timm folds InPlaceABN's ``|w| + 1e-5`` into an ordinary BatchNorm weight. We store ``w = s - 1e-5`` so
    that our ``|w| + 1e-5`` gives back ``s``. A scale below 1e-5 (negative or ~0) has no exact preimage; it
    is clamped to 0, which changes that channel's scale by at most 1e-5 and is logged.
    """
    out: dict[str, torch.Tensor] = {}
    clamped = 0
    v2 = "body.layer1.0.conv3.conv.weight" in state_dict
    for key, value in state_dict.items():
        if is_counter(key):  # timm's BatchNorm counters: the official layout has none
            continue
        new_key = key
        block = re.match(r"body\.layer(\d)\.(\d+)\.conv(\d)\.(conv|bn)\.(.+)$", key)
        if block:
            layer, index, conv, kind, rest = block.groups()
            slot = "0" if kind == "conv" else "1"
            nest = "0." if _has_blur(int(layer), int(index), int(conv), v2) else ""
            new_key = f"body.layer{layer}.{index}.conv{conv}.{nest}{slot}.{rest}"
        else:
            # downsample.0 in a stride-1 stage whose width changes (stage 1 of the v2), downsample.1 after the
            # average pool otherwise
            new_key = re.sub(r"\.(conv1|downsample\.\d)\.conv\.", r".\1.0.", new_key)
            new_key = re.sub(r"\.(conv1|downsample\.\d)\.bn\.", r".\1.1.", new_key)
        if key.endswith("bn.weight"):
            clamped += int((value < _ABN_EPS).sum())
            value = (value - _ABN_EPS).clamp(min=0)
        out[new_key] = value
    if clamped:
        logger.warning("%d BatchNorm scales below 1e-5 cannot be expressed as |w|+1e-5 and were clamped", clamped)
    return out


def _stage_depths(sd: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    depths = []
    for layer in range(1, 5):
        found = {int(m.group(1)) for k in sd if (m := re.match(rf"body\.layer{layer}\.(\d+)\.", k))}
        depths.append(max(found) + 1 if found else 0)
    return tuple(depths)


def _tresnet_name(sd: Mapping[str, torch.Tensor]) -> str:
    """The TResNet config whose stem width and block type fit; the stage depths decide between those alike (the v2
    L's stem is 64 wide, as TResNet-M's)."""
    width = int(sd["body.conv1.0.weight"].shape[0])
    v2 = "body.layer1.0.conv3.0.weight" in sd
    alike = [name for name, c in TRESNET_CONFIGS.items() if int(64 * c.width) == width and c.v2 == v2]
    if len(alike) > 1:
        depths = _stage_depths(sd)
        alike = [name for name in alike if tuple(TRESNET_CONFIGS[name].layers) == depths] or alike
    if len(alike) != 1:
        kind = "bottleneck blocks in every stage" if v2 else "basic blocks in the first stages"
        known = ", ".join(f"{n} ({int(64 * c.width)})" for n, c in TRESNET_CONFIGS.items())
        raise UnknownArchitectureError(f"unknown TResNet: stem width {width} with {kind}, stage depths "
                                       f"{_stage_depths(sd)}; known: {known}")
    return alike[0]


def detect_head(state_dict: Mapping[str, torch.Tensor]) -> Optional[dict[str, Any]]:
    """The ML-Decoder head's sizes from its tensors (keys ``head.decoder.*``), or ``None`` for any other head.

    ``num_of_groups`` is the rows of ``query_embed``, ``decoder_embedding`` its columns, ``num_classes`` the length
    of ``duplicate_pooling_bias``: creating the model with these gives the same shapes.
    """
    if not any(k.startswith(ML_DECODER_PREFIX) for k in state_dict):
        return None
    queries = state_dict.get(ML_DECODER_PREFIX + "query_embed.weight")
    bias = state_dict.get(ML_DECODER_PREFIX + "duplicate_pooling_bias")
    pooling = state_dict.get(ML_DECODER_PREFIX + "duplicate_pooling")
    # original (zero-shot ML-Decoder): the queries come from word vectors through head.wordvec_proj (an identity
    # for 300-wide ones), there is no query_embed, and duplicate_pooling is one (D, 1) matrix shared by all.
    if "head.wordvec_proj.weight" in state_dict or (queries is None and pooling is not None and pooling.dim() == 2):
        raise CheckpointError("the checkpoint holds ML-Decoder's zero-shot variant (queries made from word vectors, "
                              "one shared duplicate_pooling), which is not supported")
    if queries is None or bias is None or len(queries.shape) != 2 or len(bias.shape) != 1:
        def shown(key, tensor):
            return f"{key} {'missing' if tensor is None else 'of shape ' + str(tuple(tensor.shape))}"
        raise CheckpointError(f"the checkpoint's ML-Decoder head is damaged: it needs {ML_DECODER_PREFIX}"
                              f"query_embed.weight (groups, width) and duplicate_pooling_bias (classes), and has "
                              f"{shown('query_embed.weight', queries)}, {shown('duplicate_pooling_bias', bias)}")
    return {"head": "ml-decoder", "num_of_groups": int(queries.shape[0]), "decoder_embedding": int(queries.shape[1]),
            "num_classes": int(bias.shape[0])}


def detect_architecture(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Tells the TResNet variant, the head type and the class count from a state dict's shapes.

    Returns ``model_name``, ``bottleneck_head`` and ``num_classes``, and for an ML-Decoder head also ``head``
    (``"ml-decoder"``), ``num_of_groups`` and ``decoder_embedding`` (:func:`detect_head`).
    Raises :class:`~asl.errors.UnknownArchitectureError` when the shapes are no TResNet's (a ``timm/<name>``
    network, say), so that callers can fall back to a name without hiding any other checkpoint problem.
    """
    sd = state_dict
    if is_timm_tresnet_layout(sd):
        sd = convert_timm_tresnet(sd)
    if "body.conv1.0.weight" not in sd:
        raise UnknownArchitectureError("not a TResNet state dict: it has no 'body.conv1.0.weight'")
    name = _tresnet_name(sd)
    decoder = detect_head(sd)
    if decoder is not None:
        return {"model_name": name, "bottleneck_head": False, **decoder}
    bottleneck = "head.fc.embedding_generator.0.weight" in sd
    head = sd.get("head.fc.FC.weight" if bottleneck else "head.fc.weight")
    return {
        "model_name": name,
        "bottleneck_head": bottleneck,
        "num_classes": int(head.shape[0]) if head is not None else None,
    }
