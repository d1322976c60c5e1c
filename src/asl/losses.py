"""Asymmetric Loss (ASL) for multi-label and single-label classification.

The paper (Ben-Baruch, Ridnik et al., "Asymmetric Loss For Multi-Label Classification", ICCV 2021) treats each
of the ``C`` classes as an independent binary problem with ``p = sigmoid(logit)`` and focuses positives and
negatives separately:

.. math::

    L_+ = (1 - p)^{\\gamma_+} \\log(p), \\qquad
    L_- = p_m^{\\gamma_-} \\log(1 - p_m), \\qquad p_m = \\max(p - m, 0), \\qquad
    \\mathrm{loss} = -\\sum (y L_+ + (1 - y) L_-)

``gamma_neg`` (:math:`\\gamma_-`) down-weights the many easy negatives, ``gamma_pos`` (:math:`\\gamma_+`) keeps
the rare positives' gradient, and the probability margin ``clip`` (:math:`m`) discards very easy negatives
entirely. As in the original code it is computed through ``p_neg = min(1 - p + clip, 1) = 1 - p_m`` and the
probability of the right answer ``pt``:

.. code-block:: text

    L = y * log(max(p, eps)) + (1 - y) * log(max(p_neg, eps))
    w = (1 - pt) ** (gamma_pos * y + gamma_neg * (1 - y)),   pt = p * y + p_neg * (1 - y)
    loss = -sum(L * w)                  # w only if gamma_pos > 0 or gamma_neg > 0

For 0/1 targets this is the paper's formula; soft targets get the original code's interpolation.

Recommended settings (paper and original training script):

- MS-COCO / Pascal VOC / NUS-WIDE: ``AsymmetricLoss(gamma_neg=4, gamma_pos=0, clip=0.05,
  disable_torch_grad_focal_loss=True)``, summed over the batch (the default ``reduction='sum'``).
- Open Images: the same, with ``mask = targets >= 0`` so that unannotated entries (target -1) count for nothing.
- ``gamma_neg=gamma_pos=0, clip=0`` is binary cross-entropy; ``gamma_neg=gamma_pos=2, clip=0`` is focal loss.

Differences from the original code (values and gradients are the same):

- With ``disable_torch_grad_focal_loss=True`` the original switches the global grad mode off and on around the
  focal weight, which turns gradients back on when the loss is called inside ``torch.no_grad()``. Here the weight
  is computed from detached tensors and the grad mode is never touched.
- ``AsymmetricLossOptimized`` stores nothing on the module between calls (the original keeps its intermediate
  tensors, and with them the autograd graph, as attributes).
- Inputs are promoted to float32 and autocast is disabled inside the loss, so it is computed in fp32 under AMP
  (the original training script calls it on ``model(x).float()``); float64 stays float64.
- Extras: a ``mask`` keyword, a ``reduction`` argument for the multi-label losses, and a ``ValueError`` on
  mismatched shapes.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .precision import autocast_disabled

__all__ = ["AsymmetricLoss", "AsymmetricLossOptimized", "ASLSingleLabel"]

_MULTI_LABEL_REDUCTIONS = ("sum", "mean", "none")
_SINGLE_LABEL_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction: str, allowed: tuple) -> str:
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got {reduction!r}")
    return reduction


def _as_float(t: torch.Tensor) -> torch.Tensor:
    """Promote to float32 (half, bfloat16, integer and bool inputs); float64 stays float64."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class AsymmetricLoss(nn.Module):
    """Asymmetric Loss for multi-label classification.

    Args:
        gamma_neg: focusing parameter of the negatives (:math:`\\gamma_-`); 4 in the paper.
        gamma_pos: focusing parameter of the positives (:math:`\\gamma_+`); the paper trains with 0
            (the original constructor default is 1, kept here).
        clip: probability margin :math:`m` of the negatives; ``0`` or ``None`` disables it.
        eps: lower clamp of the probabilities inside the logarithms.
        disable_torch_grad_focal_loss: when ``True`` the focal weight ``w`` is a constant for autograd (the
            gradient is ``w * dL/dx``); when ``False`` the gradient also flows through ``w``. The original trains
            with ``True``.
        reduction: ``'sum'`` (the original, default), ``'mean'`` (over the counted entries, i.e. ``mask.sum()``
            when a mask is given) or ``'none'`` (the element-wise loss, same shape as the input).

    ``forward(logits, targets, mask=None)``: ``logits`` and ``targets`` have the same shape, e.g. ``(N, C)``;
    targets are 0/1 (soft targets in between are accepted). ``mask`` (same shape, bool or float) weights each
    entry; entries with mask 0 contribute nothing to the value or the gradient, whatever their target (use
    ``mask = targets >= 0`` for Open Images' "-1 = not annotated").
    """

    def __init__(self, gamma_neg: float = 4, gamma_pos: float = 1, clip: Optional[float] = 0.05,
                 eps: float = 1e-8, disable_torch_grad_focal_loss: bool = True, reduction: str = "sum"):
        super().__init__()
        self.gamma_neg = gamma_neg
        self.gamma_pos = gamma_pos
        self.clip = clip
        self.eps = eps
        self.disable_torch_grad_focal_loss = disable_torch_grad_focal_loss
        self.reduction = _check_reduction(reduction, _MULTI_LABEL_REDUCTIONS)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, *,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if logits.shape != targets.shape:
            raise ValueError(f"ASL: logits and targets must have the same shape, got logits {tuple(logits.shape)} "
                             f"and targets {tuple(targets.shape)}")
        if mask is not None and mask.shape != targets.shape:
            raise ValueError(f"ASL: mask must have the shape of targets {tuple(targets.shape)}, "
                             f"got {tuple(mask.shape)}")
        with autocast_disabled(logits.device.type):
            x = _as_float(logits)
            y = targets.to(x.dtype)
            keep = None
            if mask is not None:
                keep = mask.to(x.dtype)
                # Unannotated entries are often marked -1: a target of 0 keeps their value and gradient finite, so
                # that the mask's 0 removes them (NaN * 0 would still be NaN).
                y = y.masked_fill(keep == 0, 0)
            weighted = self._weighted_log_likelihood(x, y)
            if keep is not None:
                weighted = weighted * keep
            if self.reduction == "none":
                return -weighted
            total = -weighted.sum()  # original: -loss.sum(), negating one number instead of every entry
            if self.reduction == "sum":
                return total
            if keep is None:
                return total / max(weighted.numel(), 1)
            count = keep.sum()
            # An all-zero mask gives 0, not 0/0; torch.where keeps the count on the device (no sync).
            return total / torch.where(count > 0, count, torch.ones_like(count))

    def _margin(self) -> bool:
        return self.clip is not None and self.clip > 0  # original: the margin applies only then

    def _focusing(self) -> bool:
        return self.gamma_neg > 0 or self.gamma_pos > 0  # original: no weight at all otherwise

    def _weighted_log_likelihood(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``L * w`` per entry (the loss is its negated sum), for float logits and targets of the same shape."""
        anti_y = 1 - y  # computed once for its three uses: each pass over the batch is a fresh tensor to fill
        prob = torch.sigmoid(x)
        prob_neg = 1 - prob
        if self._margin():
            # Asymmetric probability shifting, 1 - max(p - clip, 0). Beyond the margin the clamp passes no gradient,
            # which discards those negatives as the paper intends.
            prob_neg = (prob_neg + self.clip).clamp(max=1)
        log_lik = y * torch.log(prob.clamp(min=self.eps)) + anti_y * torch.log(prob_neg.clamp(min=self.eps))
        if self._focusing():
            if self.disable_torch_grad_focal_loss:
                # Detached inputs make the weight a constant for autograd without touching the global grad mode.
                prob, prob_neg, y, anti_y = prob.detach(), prob_neg.detach(), y.detach(), anti_y.detach()
            prob_right = prob * y + prob_neg * anti_y
            log_lik = log_lik * torch.pow(1 - prob_right, self.gamma_pos * y + self.gamma_neg * anti_y)
        return log_lik

    def extra_repr(self) -> str:
        return (f"gamma_neg={self.gamma_neg}, gamma_pos={self.gamma_pos}, clip={self.clip}, eps={self.eps}, "
                f"disable_torch_grad_focal_loss={self.disable_torch_grad_focal_loss}, "
                f"reduction={self.reduction!r}")


class AsymmetricLossOptimized(AsymmetricLoss):
    """The original's in-place variant of :class:`AsymmetricLoss`: same arguments, same results.

    It works in place wherever autograd allows, and stores nothing on the module between calls. Note the original's
    default here is ``disable_torch_grad_focal_loss=False`` (the gradient flows through the focal weight), unlike
    :class:`AsymmetricLoss`; it is kept.
    """

    def __init__(self, gamma_neg: float = 4, gamma_pos: float = 1, clip: Optional[float] = 0.05,
                 eps: float = 1e-8, disable_torch_grad_focal_loss: bool = False, reduction: str = "sum"):
        # original: this class defaults to disable_torch_grad_focal_loss=False
        super().__init__(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, eps=eps,
                         disable_torch_grad_focal_loss=disable_torch_grad_focal_loss, reduction=reduction)

    def _weighted_log_likelihood(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        anti_y = 1 - y
        prob = torch.sigmoid(x)
        prob_neg = 1 - prob
        if self._margin():
            prob_neg.add_(self.clip).clamp_(max=1)  # original: in place on the fresh 1 - p
        log_lik = y * torch.log(prob.clamp(min=self.eps))  # original: the negatives' term is added in place
        log_lik.add_(anti_y * torch.log(prob_neg.clamp(min=self.eps)))
        if self._focusing():
            if self.disable_torch_grad_focal_loss:
                prob, prob_neg, y, anti_y = prob.detach(), prob_neg.detach(), y.detach(), anti_y.detach()
            # A detached tensor shares its storage with the graph's: the in-place steps start on a fresh product.
            base = prob * y
            base.add_(prob_neg * anti_y).neg_().add_(1)  # 1 - pt, rounded exactly as 1 - (p * y + p_neg * (1 - y))
            log_lik.mul_(base.pow_(self.gamma_pos * y + self.gamma_neg * anti_y))
        return log_lik


class ASLSingleLabel(nn.Module):
    """Asymmetric loss for single-label (softmax) classification, with label smoothing.

    With ``log_p = log_softmax(logits)`` and ``p = exp(log_p)``, every class gets a focusing weight: the true class
    ``(1 - p)^gamma_pos`` and every other class ``p^gamma_neg`` (the gradient flows through the weight, as in the
    original). The (label-smoothed) targets are ``t = onehot * (1 - eps) + eps / C`` when ``eps > 0``, and

    .. code-block:: text

        loss = -sum_c t_c * w_c * log_p_c           # per sample, then the mean over samples

    With ``gamma_pos = gamma_neg = 0`` this is exactly ``F.cross_entropy(logits, target, label_smoothing=eps)``.

    Args:
        gamma_pos: focusing parameter of the true class (0 in the original default).
        gamma_neg: focusing parameter of the other classes (4).
        eps: label smoothing (0.1); ``0`` disables it.
        reduction: ``'mean'`` (default), ``'sum'`` or ``'none'`` (per-sample losses).

    ``forward(logits, target, reduction=None)``: ``logits`` of shape ``(..., C)`` (usually ``(N, C)``) and integer
    class indices ``target`` of shape ``logits.shape[:-1]``; ``reduction`` overrides the constructor's for this call.
    """

    def __init__(self, gamma_pos: float = 0, gamma_neg: float = 4, eps: float = 0.1, reduction: str = "mean"):
        super().__init__()
        self.gamma_pos = gamma_pos
        self.gamma_neg = gamma_neg
        self.eps = eps
        self.reduction = _check_reduction(reduction, _SINGLE_LABEL_REDUCTIONS)

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                reduction: Optional[str] = None) -> torch.Tensor:
        reduction = self.reduction if reduction is None else _check_reduction(reduction, _SINGLE_LABEL_REDUCTIONS)
        if logits.dim() < 1 or logits.shape[-1] < 1:
            raise ValueError(f"ASLSingleLabel: logits must have a class dimension, got shape {tuple(logits.shape)}")
        if target.shape != logits.shape[:-1]:
            raise ValueError(f"ASLSingleLabel: target must hold one class index per sample, shape "
                             f"{tuple(logits.shape[:-1])} for logits {tuple(logits.shape)}, got "
                             f"{tuple(target.shape)} (one-hot or multi-label targets are not accepted)")
        num_classes = logits.shape[-1]
        target = target.long()  # original: target.long()
        if target.device.type == "cpu" and target.numel() > 0:
            # Checked where it is free; on accelerators an out-of-range index fails inside one_hot instead
            # (checking there would synchronise every step).
            low, high = int(target.min()), int(target.max())
            if low < 0 or high >= num_classes:
                raise ValueError(f"ASLSingleLabel: class indices must be in [0, {num_classes}), "
                                 f"got values in [{low}, {high}]")

        with autocast_disabled(logits.device.type):
            x = _as_float(logits)
            log_prob = F.log_softmax(x, dim=-1)
            onehot = F.one_hot(target, num_classes).to(x.dtype)

            if self.gamma_pos != 0 or self.gamma_neg != 0:
                prob = log_prob.exp()
                # original: the base is 1 - pt, pt = p on the true class and 1 - p elsewhere, which gives
                # (1 - p)^gamma_pos for the true class and p^gamma_neg for the others; gradient flows through it.
                prob_right = prob * onehot + (1 - prob) * (1 - onehot)
                exponent = self.gamma_pos * onehot + self.gamma_neg * (1 - onehot)
                log_prob = log_prob * torch.pow(1 - prob_right, exponent)
            # With both gammas 0 the weight is exactly 1 (and pow's gradient w.r.t. its base is 0), so skipping
            # it changes nothing.

            smoothed = onehot
            if self.eps > 0:
                smoothed = onehot * (1 - self.eps) + self.eps / num_classes

            loss = -(smoothed * log_prob).sum(dim=-1)
            if reduction == "mean":
                return loss.mean()
            if reduction == "sum":
                return loss.sum()
            return loss

    def extra_repr(self) -> str:
        return (f"gamma_pos={self.gamma_pos}, gamma_neg={self.gamma_neg}, eps={self.eps}, "
                f"reduction={self.reduction!r}")
