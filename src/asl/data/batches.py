"""What the training and evaluation loops take from a loader's batch: its parts, and its images as floats.

Batches are what :func:`asl.data.collate_skip` returns: ``(images uint8 NCHW, targets float, indices | None,
skipped)``; plain ``(images, targets)`` or ``(images, targets, indices)`` tuples work too.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .transforms import to_float

__all__ = ["unpack_batch", "images_to_float"]


def unpack_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], int]:
    """``(images, targets, indices or None, skipped)`` from a Batch, a 2-tuple or a 3-tuple."""
    if hasattr(batch, "images"):
        return batch.images, batch.targets, batch.indices, int(batch.skipped)
    if len(batch) == 2:
        return batch[0], batch[1], None, 0
    if len(batch) == 3:
        return batch[0], batch[1], batch[2], 0
    return batch[0], batch[1], batch[2], int(batch[3])


def images_to_float(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Moves a batch to ``device`` and scales uint8 to [0, 1] there (4x less host-to-device traffic).

    Non-blocking copies only on CUDA (they need pinned memory there and mean nothing elsewhere).
    """
    images = images.to(device, non_blocking=device.type == "cuda")
    # original: ToTensor() divides by 255 on the CPU; the same float32 values, computed on the device.
    return to_float(images) if images.dtype == torch.uint8 else images.float()
