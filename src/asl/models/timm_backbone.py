"""Any timm architecture as an ASL classifier (``--model-name timm/resnet101``).

The ASL pipeline feeds raw [0, 1] RGB, as TResNet was trained on. timm's ImageNet weights expect their own
mean/std normalisation, so the wrapper applies it (as non-persistent buffers) before the network. The wrapped
network's state-dict keys stay timm's own, so a timm checkpoint loads without renaming.

With a spatial head (ML-Decoder, :meth:`TimmClassifier.attach_spatial_head`) timm's pool and classifier are removed
and the head, under ``head.``, reads the unpooled features.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn as nn

from ..errors import ModelError

__all__ = ["TimmClassifier"]


class TimmClassifier(nn.Module):
    """``image_size``: the input side, passed to timm for the architectures whose input size is fixed (ViT, Swin:
    their position embeddings or windows are sized for it); other architectures take any size."""

    def __init__(self, timm_name: str, num_classes: int, image_size: Optional[int] = None) -> None:
        super().__init__()
        import timm

        if not timm.is_model(timm_name):
            raise ModelError(f"unknown timm model {timm_name!r} (see timm.list_models())")
        # Weights never come from timm's own download here: a pretrained start is a model source of ours, read by
        # load_pretrained_backbone like any other (asl.sources).
        self.net = timm.create_model(timm_name, pretrained=False, num_classes=num_classes)
        fixed = self.fixed_input_size()
        if image_size is not None and fixed is not None and fixed != image_size:
            try:
                self.net = timm.create_model(timm_name, pretrained=False, num_classes=num_classes,
                                             img_size=image_size)
            except (TypeError, AssertionError, ValueError) as exc:
                raise ModelError(f"timm model {timm_name!r} takes {fixed} px inputs only and cannot be built for "
                                 f"{image_size} px ({exc or type(exc).__name__})") from None
        cfg = getattr(self.net, "pretrained_cfg", None) or {}
        mean = cfg.get("mean", (0.485, 0.456, 0.406))
        std = cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.timm_name = timm_name
        self.num_classes = num_classes
        # The width of what the classifier reads: timm's pre-logits size, which differs from num_features where a
        # conv or MLP sits between the pool and the classifier (MobileNetV3's conv_head: 576 -> 1024).
        self.num_features = int(getattr(self.net, "head_hidden_size", 0) or getattr(self.net, "num_features", 0))
        classifier = cfg.get("classifier", "fc")
        if isinstance(classifier, (list, tuple)):
            classifier = classifier[0]
        self.classifier_prefix = f"net.{classifier}."
        self.head: Optional[nn.Module] = None

    def fixed_input_size(self) -> Optional[int]:
        """The one input side the network takes (timm's ``fixed_input_size`` models), or None if any works."""
        cfg = getattr(self.net, "pretrained_cfg", None) or {}
        if not cfg.get("fixed_input_size") or getattr(self.net, "dynamic_img_size", False):
            return None
        built = getattr(getattr(self.net, "patch_embed", None), "img_size", None) or cfg.get("input_size")
        return int(built[-1]) if isinstance(built, (list, tuple)) and built else None

    def input_size_problem(self, size: int) -> Optional[str]:
        """Why a square input of ``size`` pixels cannot run, or None when it can."""
        fixed = self.fixed_input_size()
        if fixed is None or fixed == size:
            return None
        return f"timm model {self.timm_name!r} was built for {fixed} px inputs and takes no other size"

    def attach_spatial_head(self, head: nn.Module) -> None:
        """Replaces timm's pool and classifier by ``head``, which reads the unpooled features.

        original (ML-Decoder on a ResNet): the global pool becomes an identity and the classifier is replaced.
        ``reset_classifier(0, '')`` does both in timm's own way for every architecture, keeping any norm that timm
        applies before its classifier; the network then returns its (N, C, H, W) map (or (N, L, C) tokens).
        """
        try:
            self.net.reset_classifier(0, "")
        except (AssertionError, TypeError, ValueError, NotImplementedError) as exc:
            raise ModelError(f"timm model {self.timm_name!r} cannot drop its global pool for a spatial head "
                             f"({exc or type(exc).__name__})") from None
        self.head = head

    def adapt_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A bare timm state dict (keys without ``net.``) is moved under ``net.``."""
        if any(k.startswith("net.") for k in state_dict):
            return dict(state_dict)
        return {f"net.{k}": v for k, v in state_dict.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.net((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))
        return features if self.head is None else self.head(features)
