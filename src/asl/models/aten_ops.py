"""The private aten ops of the memory-saving norm, in one place: PyTorch has no public op that does their job in
one pass.

- :func:`batch_norm_with_invstd`: ``F.batch_norm``'s own dispatch (cuDNN where enabled, else the native kernel),
  returning the batch's inverse standard deviation with the output. ``F.batch_norm`` returns the output alone, and
  recomputing the statistics would cost a second pass over the input, which the layer no longer keeps.
- :func:`batch_norm_backward`: PyTorch's fused batch-norm backward. Autograd offers it only through the graph of
  a forward on the *input*; the layer keeps the output instead and feeds that in (see ``asl.models.layers``).

- :func:`leaky_relu_backward`: ``where(y > 0, g, g * slope)`` in one fused pass. ``torch.where`` gives the same
  values, but its temporaries cost the training step about 5% against timm's (TResNet-M, CPU), which the layer's
  speed target cannot spare.

Each has a test against a written-out formula (``tests/test_aten_ops.py``).
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["batch_norm_with_invstd", "batch_norm_backward", "leaky_relu_backward"]


def leaky_relu_backward(grad: torch.Tensor, result: torch.Tensor, slope: float) -> torch.Tensor:
    """``grad`` where ``result > 0``, ``grad * slope`` elsewhere: the gradient of a leaky ReLU given its output."""
    return torch.ops.aten.leaky_relu_backward(grad, result, slope, True)


def batch_norm_with_invstd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                           running_var: torch.Tensor, training: bool, momentum: float,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(``F.batch_norm(x, ...)``, the batch's ``1 / sqrt(var + eps)``); the running statistics update as there.

    In eval the second value is undefined (the kernels return an empty tensor): use the running variance.
    """
    out, _, save_invstd, _, _ = torch.ops.aten._batch_norm_impl_index(
        x, weight, bias, running_mean, running_var, training, momentum, eps, torch.backends.cudnn.enabled)
    return out, save_invstd


def batch_norm_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                        invstd: torch.Tensor, need_input_grad: bool
                        ) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Training-mode batch-norm backward for given batch statistics ``mean`` and ``invstd``:
    (``weight * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))`` or None, ``sum(dy * xhat)``, ``sum(dy)``),
    ``xhat = (x - mean) * invstd``, sums over every dimension but the channels."""
    grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
        grad_out, x, weight, None, None, mean, invstd, True, 0.0, [need_input_grad, True, True])
    return grad_x, grad_weight, grad_bias
