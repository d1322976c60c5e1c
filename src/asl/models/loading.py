"""Where model sources, checkpoint files and networks meet: the one module that ties :mod:`asl.sources` and
:mod:`asl.checkpoint` (which find and read the files) to the builders of :mod:`asl.models` (which read none).

- :func:`create_model`: a network, its backbone optionally started from any model source (``pretrained=``);
- :func:`load_model_state`: a state dict into a network, strictly, every mismatch explained;
- :func:`load_model`: the shared start of validate.py, infer.py and export.py, a ready model from a source.

:func:`load_model` builds the network a checkpoint holds (official model-zoo file or ours, path or URL). The
architecture comes from the file: our checkpoints name it (``model_name``), the official ones do not, so it is told
from the tensor shapes (:func:`asl.models.detect_architecture`). A name given by the user must agree. The head comes
from the shapes alone: an ML-Decoder (``head.decoder.*``, official or ours, on any backbone) and its sizes are read
from its tensors (:func:`asl.models.detect_head`), so no command line needs a head flag.

Nothing here prints or exits: errors are exceptions with one clear line (the CLIs print them).
"""
from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from ..checkpoint import load_checkpoint
from ..errors import CheckpointError, UnknownArchitectureError
from ..state_dict import is_counter
from .convert import convert_timm_tresnet, detect_architecture, detect_head, is_timm_tresnet_layout
from .factory import MAX_IMAGE_SIZE, MODEL_NAMES, TIMM_PREFIX, build_model, check_input_size, head_prefix, \
    normalize_state_dict
from .inference import prepare_for_inference
from .ml_decoder import DEFAULT_EMBEDDING
from .timm_backbone import TimmClassifier

__all__ = ["LoadedModel", "load_model", "create_model", "load_pretrained_backbone", "load_model_state",
           "check_state_fits", "check_values", "resolve_architecture", "class_names_from_checkpoint",
           "stored_image_size"]

logger = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 448


# -------------------------------------------------------------------------------- networks and state dicts

def create_model(name: str, num_classes: int, *, bottleneck_head: bool = False, head: Optional[str] = None,
                 num_of_groups: int = -1, decoder_embedding: int = DEFAULT_EMBEDDING,
                 pretrained: Optional[str] = None, memory_efficient: bool = True,
                 image_size: Optional[int] = None) -> nn.Module:
    """Builds ``tresnet_m``, ``tresnet_l``, ``tresnet_xl``, ``tresnet_v2_l`` or ``timm/<any timm model>``.

    ``head``: ``None`` for the linear classifier (``bottleneck_head=True``: the Open Images one, TResNet only), or
    ``"ml-decoder"`` for ML-Decoder (:class:`~asl.models.ml_decoder.MLDecoder`) with ``num_of_groups`` queries
    (-1: min(100, classes)) of width ``decoder_embedding``, reading the unpooled feature map; keys ``head.decoder.*``.
    ``pretrained`` is any model source (:mod:`asl.sources`: a file, a Hub-layout folder, ``hf-hub:ORG/NAME``, a URL)
    of ImageNet weights for the backbone; the classifier is skipped.
    ``memory_efficient`` (TResNet only) makes the norm layers keep only their output for backward, as InPlaceABN
    did; ``False`` lets autograd keep the plain ops' tensors. Outputs and gradients are the same either way.
    ``image_size``: the input side the model will see, checked (one line naming a size that works) and passed to
    timm's fixed-size architectures.
    """
    model = build_model(name, num_classes, bottleneck_head=bottleneck_head, head=head, num_of_groups=num_of_groups,
                        decoder_embedding=decoder_embedding, memory_efficient=memory_efficient,
                        image_size=image_size)
    if image_size is not None:
        check_input_size(model, image_size, name)
    if pretrained:
        load_pretrained_backbone(model, load_checkpoint(pretrained)["model"])
    return model


def load_pretrained_backbone(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Loads every tensor except the classifier (original: the ImageNet head is skipped, it does not fit).

    Accepts the MIIL ImageNet TResNet files, our checkpoints, model-zoo files and timm state dicts.
    Raises ``CheckpointError`` naming the first mismatches when the backbone does not fit.
    """
    name = getattr(model, "timm_name", None) or type(model).__name__
    # The donor's classifier, of whatever kind (a linear one, ML-Decoder, timm's own), is left out: the model may
    # have none of its keys (ML-Decoder replaces timm's classifier), and keeps its own head either way.
    foreign = ("head.", model.classifier_prefix) if isinstance(model, TimmClassifier) else ("head.",)
    state = {k: v for k, v in normalize_state_dict(model, state_dict).items() if not k.startswith(foreign)}
    load_model_state(model, state, f"the backbone of {name}", skip_prefix=head_prefix(model))


def _num_classes(model: nn.Module) -> Optional[int]:
    count = getattr(model, "num_classes", None)
    if isinstance(count, int):
        return count
    last_linear = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last_linear = module
    return last_linear.out_features if last_linear is not None else None


def _shape(value: Any) -> tuple:
    return tuple(getattr(value, "shape", ()))


def _first(keys: list, limit: int = 3) -> str:
    shown = repr(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_fits(model: nn.Module, state_dict: Mapping[str, Any], model_name: str, *,
                     skip_prefix: Optional[str] = None) -> list[str]:
    """The keys of ``state_dict`` that ``model`` takes; :class:`CheckpointError` naming ``model_name``, its class
    count and the first missing, unexpected or misshapen keys when they do not fit. Reads shapes only, so it
    works on a network built on the ``meta`` device, before anything is allocated."""
    expected = model.state_dict()

    def relevant(keys):
        return [k for k in keys if not is_counter(k) and not (skip_prefix and k.startswith(skip_prefix))]

    missing = relevant(k for k in expected if k not in state_dict)
    unexpected = relevant(k for k in state_dict if k not in expected)
    mismatched = relevant(k for k in expected if k in state_dict and _shape(state_dict[k]) != _shape(expected[k]))
    if missing or unexpected or mismatched:
        count = _num_classes(model)
        parts = []
        if missing:
            parts.append(f"missing keys {_first(missing)}")
        if unexpected:
            parts.append(f"unexpected {_first(unexpected)}")
        if mismatched:
            shapes = "; ".join(f"{k}: ckpt {_shape(state_dict[k])} vs model {_shape(expected[k])}"
                               for k in mismatched[:3])
            more = f" (+{len(mismatched) - 3} more)" if len(mismatched) > 3 else ""
            parts.append(f"shape mismatch {shapes}{more}")
        classes = f" ({count} classes)" if count is not None else ""
        raise CheckpointError(f"checkpoint does not fit {model_name}{classes}: " + ", ".join(parts))
    return relevant(k for k in state_dict if k in expected)


def check_values(state_dict: Mapping[str, Any], keys: list[str], expected: Mapping[str, torch.Tensor]) -> None:
    """:class:`CheckpointError` naming the first tensor that is not what it claims: an integer or boolean tensor
    where the model holds floats (a quantised or damaged file: casting it would run silently wrong), or a floating
    one with NaN or infinite values (buffers such as ``running_var`` included). float16, bfloat16 and float64 are
    cast on load, as timm does."""
    for key in keys:
        value, wanted = state_dict[key], expected[key]
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"checkpoint entry {key} is a {type(value).__name__}, not a tensor")
        if wanted.is_floating_point() and not value.is_floating_point():
            raise CheckpointError(f"checkpoint tensor {key} is {str(value.dtype).replace('torch.', '')} where the "
                                  f"model holds floats: not a float weights file (quantised or damaged)")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"checkpoint tensor {key} holds NaN or infinite values: the weights are broken")


def load_model_state(model: nn.Module, state_dict: Mapping, model_name: str, *,
                     skip_prefix: Optional[str] = None) -> None:
    """Load ``state_dict`` into ``model`` strictly, or raise one :class:`CheckpointError` explaining the mismatch.

    ``state_dict`` may also be a whole checkpoint (its ``'model'`` entry is used); its keys are as
    :func:`asl.checkpoint.load_checkpoint` gives them (wrapper prefixes stripped). BatchNorm ``num_batches_tracked``
    counters are ignored on both sides (the official files have none). Keys under ``skip_prefix`` (e.g. the
    classifier, for a pretrained start) are left out on both sides and keep the model's own values.
    """
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]
    keys = check_state_fits(model, state_dict, model_name, skip_prefix=skip_prefix)
    check_values(state_dict, keys, model.state_dict())
    to_load = OrderedDict((k, state_dict[k]) for k in keys)
    model.load_state_dict(to_load, strict=False)
    logger.info("loaded %d tensors into %s", len(to_load), model_name)


# ------------------------------------------------------------------------------------------ a ready model


@dataclass
class LoadedModel:
    """A network ready for evaluation plus what the checkpoint says about it."""

    model: nn.Module
    model_name: str
    num_classes: int
    bottleneck_head: bool
    class_names: list[str]
    source: str
    checkpoint_info: dict[str, Any] = field(default_factory=dict)
    #: the input size the model was trained or published at, and where that figure came from
    image_size: int = DEFAULT_IMAGE_SIZE
    image_size_source: str = "the default"
    #: ``None`` (the linear classifier) or ``"ml-decoder"``, with its sizes (``create_model``'s arguments)
    head: Optional[str] = None
    num_of_groups: int = -1
    decoder_embedding: int = DEFAULT_EMBEDDING
    #: ``{class name: threshold}`` the source carries (``export.py --format hf --thresholds``), unchecked; the one
    #: threshold of ``--threshold`` is ``checkpoint_info["threshold"]``
    thresholds: Optional[dict[str, Any]] = None

    def input_size(self, requested: Optional[int]) -> tuple[int, str]:
        """The size to run at, and where it came from: ``requested`` (``--image-size``) when given, else the
        checkpoint's; :class:`~asl.errors.ModelError` in one line when the network cannot run at that size (the
        check of validate.py, infer.py and export.py)."""
        size, origin = (requested, "from --image-size") if requested is not None else (self.image_size,
                                                                                        self.image_size_source)
        check_input_size(self.model, size, self.model_name)
        return size, origin


#: the model zoos' file names (MS_COCO_TRresNet_L_448_86.6.pth, tresnet_l_COCO__448_90_0.pth): a TResNet named,
#: then one of the zoos' sizes as a field of its own. Other names (asl_coco_2024.pth, run_0100_best.pth) say nothing.
_ZOO_NAME = re.compile(r"t{1,2}r?resnet", re.IGNORECASE)
_ZOO_SIZE = re.compile(r"_(224|448|640)(?=[_.]|$)(?!_groups)")


def _size_value(value: Any) -> Optional[int]:
    """A stored size read as a whole number of pixels (64, 64.0, "64", a 0-d tensor), or None."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            return None
        value = value.item()
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    if not np.isfinite(value) or not float(value).is_integer() or not 1 <= value <= MAX_IMAGE_SIZE:
        return None
    return int(value)


def stored_image_size(ckpt: Mapping[str, Any], source: str) -> tuple[int, str]:
    """The input size a checkpoint was made for, and where it was read.

    Ours store ``image_size``. The official model-zoo files do not, but name it (``..._448_86.6.pth``); a file that
    says neither gets 448, the size of most of the paper's models. A stored value that is no size is named, with
    the size used instead.
    """
    stored = ckpt.get("image_size")
    size = _size_value(stored)
    if size is not None:
        return size, "stored in the checkpoint"
    named = _zoo_size(source)
    fallback = (named, "from the file name") if named is not None else (DEFAULT_IMAGE_SIZE, "the default")
    if stored is None:
        return fallback if named is not None else (DEFAULT_IMAGE_SIZE, "the default, as the checkpoint does not say")
    shown = repr(stored)
    shown = shown if len(shown) <= 40 else shown[:40] + "..."
    return fallback[0], (f"{fallback[1]}: the checkpoint's image_size {shown} is no size within "
                         f"1..{MAX_IMAGE_SIZE}")


def _zoo_size(source: str) -> Optional[int]:
    """The size a model-zoo file name gives (``MS_COCO_TRresNet_L_448_86.6.pth``), None for any other name."""
    name = PurePath(source.split("?")[0]).name
    named = _ZOO_SIZE.search(name) if _ZOO_NAME.search(name) else None
    return int(named.group(1)) if named else None


def _whole_number(value: Any) -> int:
    """The checkpoint's ``num_classes``: a whole number (of any int/float/NumPy/torch type); anything else is
    named."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise CheckpointError(f"the checkpoint's num_classes entry is {value!r}, not a positive whole number")
    return int(value)


def class_names_from_checkpoint(ckpt: Mapping[str, Any], num_classes: int) -> list[str]:
    """Class names in output order from ``idx_to_class``; ``class_<i>`` where the file has none.

    The official files store ``{index: name}``. The original listed ``idx_to_class.values()`` in dict order; we sort
    by index when the keys are exactly ``0..C-1`` (same result for the official files, and robust to a dict that
    was re-ordered, e.g. by a JSON round trip with string keys), and keep the dict order otherwise.
    """
    mapping = ckpt.get("idx_to_class")
    if not isinstance(mapping, Mapping) or not mapping:
        logger.info("the checkpoint has no idx_to_class; classes are named class_0..class_%d", num_classes - 1)
        return [f"class_{i}" for i in range(num_classes)]
    try:
        by_index = {int(k): str(v) for k, v in mapping.items()}
    except (TypeError, ValueError):
        by_index = {}
    if sorted(by_index) == list(range(len(mapping))):
        names = [by_index[i] for i in range(len(mapping))]
    else:
        names = [str(v) for v in mapping.values()]
    if len(names) != num_classes:
        raise CheckpointError(f"the checkpoint's idx_to_class names {len(names)} classes but its classifier has "
                              f"{num_classes} outputs")
    return names


def _user_name(name: Optional[str]) -> Optional[str]:
    if name is None or not str(name).strip():
        return None
    name = str(name).strip()
    return name if name.lower().startswith("timm/") else name.lower()


def resolve_architecture(ckpt: Mapping[str, Any], model_name: Optional[str] = None,
                         num_classes: Optional[int] = None) -> dict[str, Any]:
    """Decides ``model_name``, ``bottleneck_head``, ``num_classes`` and the head (``head``, ``num_of_groups``,
    ``decoder_embedding``: :func:`~asl.models.create_model`'s arguments) for a checkpoint.

    Sources, in order of trust: the tensor shapes (always, for TResNets; the ML-Decoder head on any backbone), the
    checkpoint's own ``model_name`` / ``bottleneck_head`` entries (ours), then the user's ``model_name`` /
    ``num_classes``. Any disagreement is a :class:`CheckpointError`: loading a TResNet-L file into a TResNet-M
    cannot work, and a silently different class count would make every metric meaningless.
    """
    state = ckpt["model"]
    wanted = _user_name(model_name)
    stored = _user_name(ckpt["model_name"]) if isinstance(ckpt.get("model_name"), str) else None
    try:
        shapes: Optional[dict] = detect_architecture(state)
    except UnknownArchitectureError as exc:
        shapes = None
        shape_problem = str(exc)
    if shapes is not None:
        name, bottleneck, classes = shapes["model_name"], bool(shapes["bottleneck_head"]), shapes["num_classes"]
        # A timm config names timm's TResNets timm/tresnet_*; their weights, converted on load, are ours.
        if stored is not None and stored not in (name, TIMM_PREFIX + name):
            raise CheckpointError(f"the checkpoint says model_name={stored!r} but its weights are a {name}")
        how = "detected from the weights' shapes"
    elif stored is not None:
        # Ours, for a timm/<name> backbone: the shapes do not tell the architecture, the file does.
        name, bottleneck, classes = stored, bool(ckpt.get("bottleneck_head", False)), None
        how = "named by the checkpoint"
    elif wanted is not None:
        name, bottleneck, classes = wanted, bool(ckpt.get("bottleneck_head", False)), None
        how = "given on the command line"
    else:
        raise CheckpointError(f"cannot tell the architecture of this checkpoint ({shape_problem}); "
                              f"pass --model-name (known: {', '.join(MODEL_NAMES)}, or timm/<name>)")
    if wanted is not None and wanted != name:
        raise CheckpointError(f"--model-name {model_name} contradicts the checkpoint, which holds a {name} "
                              f"({how})")
    decoder = _decoder_head(ckpt, state)
    if decoder is not None:
        bottleneck, classes = False, decoder["num_classes"]
    stored_classes = ckpt.get("num_classes")
    if stored_classes is not None:
        stored_classes = _whole_number(stored_classes)
        if classes is not None and classes != stored_classes:
            raise CheckpointError(f"the checkpoint says num_classes={stored_classes} but its classifier has "
                                  f"{classes} outputs")
        classes = stored_classes
    if classes is None:
        classes = num_classes
    if classes is None:
        raise CheckpointError("the checkpoint does not say how many classes it has; pass --num-classes")
    if num_classes is not None and int(num_classes) != classes:
        raise CheckpointError(f"--num-classes {num_classes} contradicts the checkpoint, which has {classes} classes")
    logger.info("architecture %s (%s), %d classes%s", name, how, classes,
                ", bottleneck head" if bottleneck else _describe(decoder))
    head = {"head": None, "num_of_groups": -1, "decoder_embedding": DEFAULT_EMBEDDING}
    if decoder is not None:
        head = {k: decoder[k] for k in head}
    return {"model_name": name, "bottleneck_head": bottleneck, "num_classes": int(classes), **head}


def _decoder_head(ckpt: Mapping[str, Any], state: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The ML-Decoder head the weights hold (:func:`~asl.models.detect_head`), checked against what the file
    says of its head (ours store ``head``)."""
    decoder = detect_head(state)
    stored = ckpt.get("head")
    if isinstance(stored, str) and stored and decoder is None:
        raise CheckpointError(f"the checkpoint says head={stored!r} but its weights hold no such head "
                              f"(no head.decoder.* tensors)")
    return decoder


def _describe(decoder: Optional[Mapping[str, Any]]) -> str:
    if decoder is None:
        return ""
    return f", ML-Decoder head ({decoder['num_of_groups']} queries of width {decoder['decoder_embedding']})"


def load_model(path_or_url: Union[str, os.PathLike], model_name: Optional[str] = None, *,
               num_classes: Optional[int] = None, device: Union[str, torch.device] = "cpu",
               prepare: bool = True, channels_last: Optional[bool] = None, batch_size: Optional[int] = None,
               sha256: Optional[str] = None) -> LoadedModel:
    """Builds and loads the model a checkpoint holds; ready for inference (eval mode, BN folded) by default.

    ``path_or_url``: a file, or an http(s) URL cached in the torch hub directory. ``model_name`` may be omitted
    (see :func:`resolve_architecture`). ``channels_last``: the weights' memory layout; ``None`` picks the faster one
    for ``device`` and batches of ``batch_size`` (see :func:`~asl.models.prepare_for_inference`).
    """
    source = os.fspath(path_or_url)
    ckpt = load_checkpoint(source, sha256=sha256)
    if is_timm_tresnet_layout(ckpt["model"]):
        # Once, here: telling the architecture and fitting the weights would each convert it again.
        ckpt["model"] = convert_timm_tresnet(ckpt["model"])
    arch = resolve_architecture(ckpt, model_name, num_classes)
    image_size, image_size_source = stored_image_size(ckpt, source)
    # A timm network of one input size (ViT) is built for the size the checkpoint was made at.
    sizes = {k: arch[k] for k in ("bottleneck_head", "head", "num_of_groups", "decoder_embedding")}
    sizes["image_size"] = _size_value(ckpt.get("image_size")) or _zoo_size(source)  # None: the file does not say
    # The stored sizes (a config.json's num_classes, say) are checked against the weights' shapes on a network
    # without storage first: a wrong 1e9 classes is then one line, not an allocation of terabytes.
    with torch.device("meta"):
        skeleton = build_model(arch["model_name"], arch["num_classes"], **sizes)
    state = normalize_state_dict(skeleton, ckpt["model"])
    check_state_fits(skeleton, state, arch["model_name"])
    model = build_model(arch["model_name"], arch["num_classes"], **sizes)
    load_model_state(model, state, arch["model_name"])
    fixed = model.fixed_input_size() if isinstance(model, TimmClassifier) else None
    if fixed is not None and sizes["image_size"] is None:
        image_size, image_size_source = fixed, "the one size the network takes"
    model.eval()
    device = torch.device(device)
    # Moved first: prepare_for_inference picks the memory layout for the device the model is on.
    model.to(device)
    if prepare:
        model = prepare_for_inference(model, channels_last=channels_last, batch_size=batch_size)
    info = {k: v for k, v in ckpt.items() if k not in ("model", "idx_to_class") and
            isinstance(v, (int, float, str, bool, type(None)))}
    return LoadedModel(model=model, model_name=arch["model_name"], num_classes=arch["num_classes"],
                       bottleneck_head=arch["bottleneck_head"], head=arch["head"],
                       num_of_groups=arch["num_of_groups"], decoder_embedding=arch["decoder_embedding"],
                       class_names=class_names_from_checkpoint(ckpt, arch["num_classes"]), source=source,
                       checkpoint_info=info, image_size=image_size, image_size_source=image_size_source,
                       thresholds=dict(ckpt["thresholds"]) if isinstance(ckpt.get("thresholds"), Mapping) else None)
