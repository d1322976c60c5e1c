"""Model factory: TResNet-M/L/XL and TResNet-L v2 (official checkpoint layout) and any timm backbone as
``timm/<name>``, each with the linear classifier, or the ML-Decoder head (``head="ml-decoder"``)."""
from __future__ import annotations

import copy
from typing import Mapping, Optional

import torch
import torch.nn as nn

from ..errors import ModelError
from .convert import convert_timm_tresnet, detect_architecture, detect_head, is_timm_tresnet_layout, strip_prefixes
from .layers import ABN, fold_conv_abn
from .ml_decoder import DEFAULT_EMBEDDING, MLDecoder
from .timm_backbone import TimmClassifier
from .tresnet import TRESNET_CONFIGS, TResNet

__all__ = [
    "MODEL_NAMES", "check_model_name", "create_model", "prepare_for_inference", "load_pretrained_backbone",
    "normalize_state_dict",
    "default_channels_last", "detect_architecture", "detect_head", "convert_timm_tresnet", "head_prefix", "TResNet",
    "TimmClassifier", "MLDecoder", "HEADS", "check_head",
]


MODEL_NAMES = tuple(TRESNET_CONFIGS)
TIMM_PREFIX = "timm/"
#: the heads besides the default linear classifier (``head=None``)
HEADS = ("ml-decoder",)


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


def create_model(name: str, num_classes: int, *, bottleneck_head: bool = False, head: Optional[str] = None,
                 num_of_groups: int = -1, decoder_embedding: int = DEFAULT_EMBEDDING,
                 pretrained: Optional[str] = None, memory_efficient: bool = True) -> nn.Module:
    """Builds ``tresnet_m``, ``tresnet_l``, ``tresnet_xl``, ``tresnet_v2_l`` or ``timm/<any timm model>``.

    ``head``: ``None`` for the linear classifier (``bottleneck_head=True``: the Open Images one, TResNet only), or
    ``"ml-decoder"`` for ML-Decoder (:class:`~asl.models.ml_decoder.MLDecoder`) with ``num_of_groups`` queries
    (-1: min(100, classes)) of width ``decoder_embedding``, reading the unpooled feature map; keys ``head.decoder.*``.
    ``pretrained`` is any model source (:mod:`asl.sources`: a file, a Hub-layout folder, ``hf-hub:ORG/NAME``, a URL)
    of ImageNet weights for the backbone; the classifier is skipped.
    ``memory_efficient`` (TResNet only) makes the norm layers keep only their output for backward, as InPlaceABN
    did; ``False`` lets autograd keep the plain ops' tensors. Outputs and gradients are the same either way.
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
        model = TimmClassifier(name[len(TIMM_PREFIX):], num_classes)
    if head == "ml-decoder":
        # Built after the backbone, so that it keeps its own initialisation (original: add_ml_decoder_head).
        model.attach_spatial_head(MLDecoder(num_classes, model.num_features, num_of_groups, decoder_embedding))
    if pretrained:
        from ..checkpoint import load_checkpoint

        load_pretrained_backbone(model, load_checkpoint(pretrained)["model"])
    return model


def head_prefix(model: nn.Module) -> str:
    """State-dict prefix of the classifier, which a pretrained start replaces (original: skip head.fc).

    ``head.`` holds a TResNet's classifier of any kind, and a timm backbone's ML-Decoder; a timm backbone's own
    classifier sits where timm puts it.
    """
    if isinstance(model, TimmClassifier) and model.head is None:
        return model.classifier_prefix
    return "head."


def normalize_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Brings foreign layouts (DDP prefixes, timm's TResNet, bare timm models) into ``model``'s layout."""
    sd = strip_prefixes(state_dict)
    if isinstance(model, TResNet) and is_timm_tresnet_layout(sd):
        sd = convert_timm_tresnet(sd)
    if isinstance(model, TimmClassifier):
        sd = model.adapt_state_dict(sd)
    return sd


def load_pretrained_backbone(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Loads every tensor except the classifier (original: the ImageNet head is skipped, it does not fit).

    Accepts the MIIL ImageNet TResNet files, our checkpoints, model-zoo files and timm state dicts.
    Raises ``CheckpointError`` naming the first mismatches when the backbone does not fit.
    """
    from ..checkpoint import load_model_state

    name = getattr(model, "timm_name", None) or type(model).__name__
    # The donor's classifier, of whatever kind (a linear one, ML-Decoder, timm's own), is left out: the model may
    # have none of its keys (ML-Decoder replaces timm's classifier), and keeps its own head either way.
    foreign = ("head.", model.classifier_prefix) if isinstance(model, TimmClassifier) else ("head.",)
    state = {k: v for k, v in normalize_state_dict(model, state_dict).items() if not k.startswith(foreign)}
    load_model_state(model, state, f"the backbone of {name}", skip_prefix=head_prefix(model))


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
    the weights' layout decides oneDNN's kernels: NCHW is the faster at batch 1 (channels_last runs TResNet-M about
    6% slower than timm there) and channels_last from batch 8 (about 9% faster), so NCHW unless the caller says
    its batches are that large.
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
