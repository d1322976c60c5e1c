"""Any timm architecture as an ASL classifier (``--model-name timm/resnet101``).

The ASL pipeline feeds raw [0, 1] RGB, as TResNet was trained on. timm's ImageNet weights expect their own
mean/std normalisation, so the wrapper applies it (as non-persistent buffers) before the network. The wrapped
network's state-dict keys stay timm's own, so a timm checkpoint loads without renaming.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from ..errors import ModelError

__all__ = ["TimmClassifier"]


class TimmClassifier(nn.Module):
    def __init__(self, timm_name: str, num_classes: int) -> None:
        super().__init__()
        import timm

        if not timm.is_model(timm_name):
            raise ModelError(f"unknown timm model {timm_name!r} (see timm.list_models())")
        # Weights never come from the hub here: pretrained starts are local files (load_pretrained_backbone).
        self.net = timm.create_model(timm_name, pretrained=False, num_classes=num_classes)
        cfg = getattr(self.net, "pretrained_cfg", None) or {}
        mean = cfg.get("mean", (0.485, 0.456, 0.406))
        std = cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.timm_name = timm_name
        self.num_classes = num_classes
        self.num_features = int(getattr(self.net, "num_features", 0))
        classifier = cfg.get("classifier", "fc")
        if isinstance(classifier, (list, tuple)):
            classifier = classifier[0]
        self.classifier_prefix = f"net.{classifier}."

    def adapt_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A bare timm state dict (keys without ``net.``) is moved under ``net.``."""
        if any(k.startswith("net.") for k in state_dict):
            return dict(state_dict)
        return {f"net.{k}": v for k, v in state_dict.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))
