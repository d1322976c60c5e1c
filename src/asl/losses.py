"""Asymmetric Loss (ASL) for multi-label and single-label classification.

The paper (Ben-Baruch, Ridnik et al., "Asymmetric Loss For Multi-Label Classification", ICCV 2021) treats each
of the ``C`` classes as an independent binary problem with ``p = sigmoid(logit)`` and decouples how positives
and negatives are focused:

.. math::

    L_+ = (1 - p)^{\\gamma_+} \\log(p), \\qquad
    L_- = p_m^{\\gamma_-} \\log(1 - p_m), \\qquad p_m = \\max(p - m, 0)

``gamma_neg`` (:math:`\\gamma_-`) down-weights the many easy negatives, ``gamma_pos`` (:math:`\\gamma_+`) keeps
the rare positives' gradient, and the probability margin ``clip`` (:math:`m`) discards very easy negatives
entirely (and, the paper argues, rejects mislabelled negatives). The loss returned is ``-sum(L)``.

As in the original code, the loss is computed through the "probability of the right answer"
``pt = p * y + p_neg * (1 - y)`` with ``p_neg = min(1 - p + clip, 1) = 1 - p_m``:

.. code-block:: text

    L = y * log(max(p, eps)) + (1 - y) * log(max(p_neg, eps))
    w = (1 - pt) ** (gamma_pos * y + gamma_neg * (1 - y))        # only if gamma_pos > 0 or gamma_neg > 0
    loss = -sum(L * w)

For hard targets (0/1) this is exactly the paper's formula; for soft targets it is the original code's
interpolation, which we keep so that results are identical.

Recommended settings (paper and original training script):

- MS-COCO / NUS-WIDE / Pascal VOC: ``AsymmetricLoss(gamma_neg=4, gamma_pos=0, clip=0.05,
  disable_torch_grad_focal_loss=True)``, summed over the batch (the default ``reduction='sum'``).
- Open Images (many unannotated labels): the same, with ``mask = targets >= 0`` so that unannotated entries
  (target -1) contribute nothing.
- Plain binary cross-entropy is ``gamma_neg=0, gamma_pos=0, clip=0``; focal loss is ``gamma_neg=gamma_pos=2``
  (with ``clip=0``).

Differences from the original code (results are unchanged):

- The original switched the *global* grad mode off and back on around the focal weight, which silently
  re-enabled gradients when the loss was called inside ``torch.no_grad()``. Here the weight is computed from
  detached tensors: identical values and gradients, no global side effect.
- ``AsymmetricLossOptimized`` stored its intermediate tensors on the module between calls; nothing is stored here
  (it computes exactly what ``AsymmetricLoss`` computes and is kept for API compatibility).
- Inputs are promoted to float32 and autocast is disabled inside the loss, so the loss is computed in fp32 under
  AMP (the original training script achieved this with ``model(x).float()``). float64 inputs stay float64.
- Optional ``reduction`` (multi-label) and ``mask`` arguments, and clear ``ValueError`` on shape mismatch.
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


def _asymmetric_loss(logits: torch.Tensor, targets: torch.Tensor, mask: Optional[torch.Tensor], *,
                     gamma_neg: float, gamma_pos: float, clip: Optional[float], eps: float,
                     detach_focal_weight: bool, reduction: str) -> torch.Tensor:
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
            # Unannotated entries are often marked -1: give them a harmless target so that neither the value nor
            # the gradient of the (discarded) entry can be NaN, since NaN * 0 is still NaN.
            y = torch.where(keep != 0, y, torch.zeros_like(y))

        prob_pos = torch.sigmoid(x)
        prob_neg = 1 - prob_pos
        if clip is not None and clip > 0:
            # Asymmetric probability shifting: 1 - max(p - clip, 0) == min(1 - p + clip, 1).
            prob_neg = (prob_neg + clip).clamp(max=1)

        log_likelihood = (y * torch.log(prob_pos.clamp(min=eps))
                          + (1 - y) * torch.log(prob_neg.clamp(min=eps)))

        if gamma_neg > 0 or gamma_pos > 0:
            if detach_focal_weight:
                # original: computed under torch.set_grad_enabled(False), i.e. the weight is a constant for
                # autograd. Detaching every input of the weight gives the same values and gradients without
                # touching the global grad mode.
                w_pos, w_neg, w_y = prob_pos.detach(), prob_neg.detach(), y.detach()
            else:
                w_pos, w_neg, w_y = prob_pos, prob_neg, y
            prob_right = w_pos * w_y + w_neg * (1 - w_y)
            exponent = gamma_pos * w_y + gamma_neg * (1 - w_y)
            log_likelihood = log_likelihood * torch.pow(1 - prob_right, exponent)

        loss = -log_likelihood
        if keep is not None:
            loss = loss * keep

        if reduction == "none":
            return loss
        total = loss.sum()
        if reduction == "sum":
            return total
        count = keep.sum() if keep is not None else torch.tensor(float(loss.numel()), dtype=loss.dtype,
                                                                   device=loss.device)
        return total / torch.where(count > 0, count, torch.ones_like(count))


class AsymmetricLoss(nn.Module):
    """Asymmetric Loss for multi-label classification.

    Args:
        gamma_neg: focusing parameter of the negatives (:math:`\\gamma_-`); 4 in the paper.
        gamma_pos: focusing parameter of the positives (:math:`\\gamma_+`); the paper trains with 0
            (the original constructor default is 1, kept here).
        clip: probability margin :math:`m` of the negatives; ``0`` or ``None`` disables it.
        eps: lower clamp of the probabilities inside the logarithms.
        disable_torch_grad_focal_loss: when ``True`` the focal weight ``w`` is treated as a constant by autograd
            (the gradient is ``w * dL/dx``); when ``False`` the gradient also flows through ``w``. The original
            trains with ``True``.
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
        return _asymmetric_loss(logits, targets, mask, gamma_neg=self.gamma_neg, gamma_pos=self.gamma_pos,
                                clip=self.clip, eps=self.eps,
                                detach_focal_weight=self.disable_torch_grad_focal_loss,
                                reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"gamma_neg={self.gamma_neg}, gamma_pos={self.gamma_pos}, clip={self.clip}, eps={self.eps}, "
                f"disable_torch_grad_focal_loss={self.disable_torch_grad_focal_loss}, "
                f"reduction={self.reduction!r}")


class AsymmetricLossOptimized(AsymmetricLoss):
    """The original's in-place variant of :class:`AsymmetricLoss`: same arguments, same results.

    The original kept its intermediate tensors on the module to reuse memory; that holds on to the autograd graph
    between calls and is not thread-safe, so this class stores nothing and computes exactly what
    :class:`AsymmetricLoss` computes. Note the original's default here is ``disable_torch_grad_focal_loss=False``
    (the gradient flows through the focal weight), unlike :class:`AsymmetricLoss`; it is kept.
    """

    def __init__(self, gamma_neg: float = 4, gamma_pos: float = 1, clip: Optional[float] = 0.05,
                 eps: float = 1e-8, disable_torch_grad_focal_loss: bool = False, reduction: str = "sum"):
        # original: this class defaults to disable_torch_grad_focal_loss=False
        super().__init__(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, eps=eps,
                         disable_torch_grad_focal_loss=disable_torch_grad_focal_loss, reduction=reduction)


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
