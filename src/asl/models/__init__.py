"""Networks: TResNet-M/L/XL and TResNet-L v2 (official checkpoint layout) and any timm backbone as ``timm/<name>``,
each with the linear classifier, or the ML-Decoder head (``head="ml-decoder"``).

The builders (:mod:`.factory`, :mod:`.tresnet`, :mod:`.timm_backbone`, :mod:`.ml_decoder`, :mod:`.convert`) read no
file. :mod:`.loading` ties them to the checkpoint files (:mod:`asl.checkpoint`) and the model sources
(:mod:`asl.sources`): :func:`create_model` with ``pretrained=`` and :func:`~asl.models.loading.load_model` live
there, and nothing in this package imports this ``__init__`` back.
"""
from .convert import convert_timm_tresnet, detect_architecture, detect_head
from .factory import (HEADS, MAX_IMAGE_SIZE, MODEL_NAMES, build_model, check_head, check_input_size, check_model_name,
                      head_prefix, normalize_state_dict)
from .inference import default_channels_last, prepare_for_inference
from .loading import create_model, load_pretrained_backbone
from .ml_decoder import MLDecoder
from .timm_backbone import TimmClassifier
from .tresnet import TResNet

__all__ = [
    "MODEL_NAMES", "HEADS", "MAX_IMAGE_SIZE", "check_model_name", "check_head", "check_input_size", "create_model",
    "build_model", "prepare_for_inference", "load_pretrained_backbone", "normalize_state_dict",
    "default_channels_last", "detect_architecture", "detect_head", "convert_timm_tresnet", "head_prefix", "TResNet",
    "TimmClassifier", "MLDecoder",
]
