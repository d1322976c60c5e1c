"""The network builders: TResNet-M/L/XL and TResNet-L v2 (official checkpoint layout) and any timm backbone as
``timm/<name>``, each with the linear classifier, or the ML-Decoder head; and the input sizes each one takes.

Nothing here reads a file: :func:`asl.models.create_model` (in :mod:`asl.models.loading`) adds the pretrained
start from a model source on top of :func:`build_model`.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn as nn

from ..errors import ModelError
from .convert import convert_timm_tresnet, is_timm_tresnet_layout
from .layers import ABN
from .ml_decoder import DEFAULT_EMBEDDING, MLDecoder
from .timm_backbone import TimmClassifier
from .tresnet import TRESNET_CONFIGS, TResNet

__all__ = ["MODEL_NAMES", "TIMM_PREFIX", "HEADS", "MAX_IMAGE_SIZE", "check_head", "check_model_name", "build_model",
           "check_input_size", "head_prefix", "normalize_state_dict"]

MODEL_NAMES = tuple(TRESNET_CONFIGS)
TIMM_PREFIX = "timm/"
#: the heads besides the default linear classifier (``head=None``)
HEADS = ("ml-decoder",)
#: the largest input side anywhere (``--image-size``, a stored size): the paper's largest is 640; at 4096 one
#: 128-image batch is 25 GiB of input alone.
MAX_IMAGE_SIZE = 4096


def check_head(head: Optional[str], bottleneck_head: bool = False) -> Optional[str]:
    """The canonical head name (``None`` for the linear classifier); :class:`~asl.errors.ModelError` listing the
    known ones otherwise."""
    if head is None:
        return None
    key = str(head).strip().lower().replace("_", "-")
    if key not in HEADS:
        raise ModelError(f"unknown head {head!r}; known: {', '.join(HEADS)} (or none: the linear classifier)")
    if bottleneck_head:
        raise ModelError(f"bottleneck_head and head={key!r} are two different heads: choose one")
    return key


def check_model_name(name: str) -> None:
    """Raises :class:`~asl.errors.ModelError` (a ``ValueError``) listing the known names, before any expensive
    set-up (data loaders) happens."""
    key = name.lower()
    if key in TRESNET_CONFIGS:
        return
    if key.startswith(TIMM_PREFIX):
        import timm

        if timm.is_model(name[len(TIMM_PREFIX):]):
            return
        raise ModelError(f"unknown timm model {name[len(TIMM_PREFIX):]!r} (see timm.list_models())")
    raise ModelError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}, or timm/<timm model name>")


def build_model(name: str, num_classes: int, *, bottleneck_head: bool = False, head: Optional[str] = None,
                num_of_groups: int = -1, decoder_embedding: int = DEFAULT_EMBEDDING, memory_efficient: bool = True,
                image_size: Optional[int] = None) -> nn.Module:
    """The network of :func:`asl.models.create_model`, freshly initialised (see there for the arguments).

    ``image_size``, when given, is passed to timm for the architectures built for one input size (ViT, Swin);
    :func:`check_input_size` tells whether a network takes a size.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive integer, got {num_classes!r}")
    check_model_name(name)
    head = check_head(head, bottleneck_head)
    key = name.lower()
    if key in TRESNET_CONFIGS:
        config = TRESNET_CONFIGS[key]
        model: nn.Module = TResNet(config.layers, num_classes=num_classes, width_factor=config.width,
                                   bottleneck_head=bottleneck_head, v2=config.v2)
        for module in model.modules():
            if isinstance(module, ABN):
                module.memory_efficient = memory_efficient
    else:
        if bottleneck_head:
            raise ModelError("bottleneck_head is only available for the TResNet models")
        model = TimmClassifier(name[len(TIMM_PREFIX):], num_classes, image_size=image_size)
    if head == "ml-decoder":
        # Built after the backbone, so that it keeps its own initialisation (original: add_ml_decoder_head).
        model.attach_spatial_head(MLDecoder(num_classes, model.num_features, num_of_groups, decoder_embedding))
    return model


def check_input_size(model: nn.Module, size: int, name: Optional[str] = None, flag: str = "--image-size") -> None:
    """Raises :class:`~asl.errors.ModelError` in one line when ``model`` cannot run on ``size`` x ``size``
    inputs, naming the size that works; the one check of every script's ``--image-size``."""
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_IMAGE_SIZE:
        raise ModelError(f"{flag} must be a whole number of pixels within 1..{MAX_IMAGE_SIZE}, got {size!r}")
    problem = getattr(model, "input_size_problem", None)
    reason = problem(size) if callable(problem) else None
    if reason:
        shown = name or getattr(model, "timm_name", None) or type(model).__name__
        raise ModelError(f"{flag} {size} cannot work with {shown}: {reason}")


def head_prefix(model: nn.Module) -> str:
    """State-dict prefix of the classifier, which a pretrained start replaces (original: skip head.fc).

    ``head.`` holds a TResNet's classifier of any kind, and a timm backbone's ML-Decoder; a timm backbone's own
    classifier sits where timm puts it.
    """
    if isinstance(model, TimmClassifier) and model.head is None:
        return model.classifier_prefix
    return "head."


def normalize_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Brings foreign layouts (timm's TResNet, bare timm models) into ``model``'s layout. Wrapper prefixes are gone
    by then: :func:`asl.checkpoint.load_checkpoint` strips them as it reads a file."""
    sd = dict(state_dict)
    if isinstance(model, TResNet) and is_timm_tresnet_layout(sd):
        sd = convert_timm_tresnet(sd)
    if isinstance(model, TimmClassifier):
        sd = model.adapt_state_dict(sd)
    return sd
