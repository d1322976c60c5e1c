"""Exponential moving average of a model's weights, updated every optimisation step.

original: the training script keeps ``ModelEma(model, 0.9997)`` (the timm class of its time) and updates it
after every optimizer step with ``ema = decay * ema + (1 - decay) * current`` over *every* state-dict entry,
so the BatchNorm running statistics are averaged too, not copied. We keep that rule for floating-point
entries; integer entries (``num_batches_tracked`` of plain BatchNorm layers, absent from TResNet) are copied,
because averaging a counter and truncating it back to an integer means nothing.

The average is always taken of the *unwrapped* model (no DDP / torch.compile prefixes), so its state dict
loads straight into ``create_model(...)`` and into validate.py.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
import torch.nn as nn

from ..distributed import unwrap_model

__all__ = ["ModelEma"]


class ModelEma(nn.Module):
    """A frozen copy of ``model`` that follows it as an exponential moving average.

    Args:
        model: the model being trained (may be wrapped in DDP or compiled; the copy is of the plain model).
        decay: weight of the old average per update. original: 0.9997 (with ~640 steps per COCO epoch,
            ``0.9997 ** 641 ~= 0.82`` of the average is kept per epoch).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9997) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be within [0, 1], got {decay}")
        self.module = copy.deepcopy(unwrap_model(model))
        self.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of ``ema = decay * ema + (1 - decay) * model``."""
        current = unwrap_model(model).state_dict()
        ema_state = self.module.state_dict()
        if current.keys() != ema_state.keys():
            raise RuntimeError("ModelEma.update: the model's state-dict keys differ from the average's")
        floats_ema: list[torch.Tensor] = []
        floats_cur: list[torch.Tensor] = []
        for name, ema_v in ema_state.items():
            cur_v = current[name].detach()
            if ema_v.is_floating_point():
                floats_ema.append(ema_v)
                floats_cur.append(cur_v.to(dtype=ema_v.dtype))
            else:
                ema_v.copy_(cur_v)
        if floats_ema:
            # Same arithmetic as the original's ``decay * e + (1 - decay) * m``, written out so each element
            # sees exactly the same floating-point operations (bit-identical to a per-tensor loop), but batched.
            scaled_ema = torch._foreach_mul(floats_ema, self.decay)
            scaled_cur = torch._foreach_mul(floats_cur, 1.0 - self.decay)
            torch._foreach_add_(scaled_ema, scaled_cur)
            torch._foreach_copy_(floats_ema, scaled_ema)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """The averaged model's own state dict (no ``module.`` prefix), ready for ``create_model``."""
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)
