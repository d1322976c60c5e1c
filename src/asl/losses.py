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
  re-enabled gradients when the loss was called inside ``torch.no_grad()``. Here the grad mode is never touched:
  the weight is a constant of the closed-form gradient below (or is computed from detached tensors where autograd
  is used), with identical values and gradients.
- The gradient with respect to the logits is computed in closed form, element by element, in the forward pass of a
  custom autograd function that keeps only that one tensor for backward, instead of autograd through some twenty
  element-wise operations and their saved tensors. Values and gradients are the original's to rounding (about
  1e-7 relative in float32), including where the ``eps`` and margin clamps are active: no gradient there, as with
  ``torch.clamp``, which passes none at its bound either. When every target is 0 or 1 (checked on CPU, where it
  costs no device sync) each element's branch is selected with one ``lerp`` and one logarithm, and integer powers
  of the weight are multiplications. The original operations under autograd are still used where the closed form
  would not reproduce autograd exactly: targets or a mask that require a gradient, negative gammas, ``eps=0``, and
  the gradient through the weight (``disable_torch_grad_focal_loss=False``) unless the targets are 0/1 (on CPU) and
  each gamma is 0 or at least 1. The closed form cannot be differentiated twice (``once_differentiable``).
- ``AsymmetricLossOptimized`` stored its intermediate tensors on the module between calls; nothing is stored here
  (it computes exactly what ``AsymmetricLoss`` computes and is kept for API compatibility).
- Inputs are promoted to float32 and autocast is disabled inside the loss, so the loss is computed in fp32 under
  AMP (the original training script achieved this with ``model(x).float()``). float64 inputs stay float64.
- Optional ``reduction`` (multi-label) and ``mask`` arguments, and clear ``ValueError`` on shape mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

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


@dataclass(frozen=True)
class _Focusing:
    """The constants of one multi-label ASL; ``clip`` is 0 when the margin is disabled."""

    gamma_neg: float
    gamma_pos: float
    clip: float
    eps: float
    weight_gradient: bool  # the gradient flows through the focal weight (disable_torch_grad_focal_loss=False)

    @property
    def weighted(self) -> bool:
        # original: the focal weight is applied only if gamma_neg > 0 or gamma_pos > 0
        return self.gamma_neg > 0 or self.gamma_pos > 0

    @property
    def fusable(self) -> bool:
        """Whether the fused path applies: with a negative gamma the weight can be infinite."""
        return self.gamma_neg >= 0 and self.gamma_pos >= 0

    @property
    def finite_weight_slope(self) -> bool:
        """Whether ``gamma * base ** (gamma - 1)`` is finite for every base in [0, 1] (or the gamma is 0).

        For a gamma in (0, 1) autograd's gradient through the weight is NaN where the base is 0; that case is left
        to autograd.
        """
        return all(gamma == 0 or gamma >= 1 for gamma in (self.gamma_neg, self.gamma_pos))


@dataclass(frozen=True)
class _Plan:
    """How the fused path computes one call: ``hard`` when every target is 0 or 1, and a free buffer like ``x``.

    It reaches the autograd function as a plain object, not a tensor input: the forward overwrites the buffer (it
    becomes the gradient), and it is no part of the graph.
    """

    hard: bool
    scratch: Optional[torch.Tensor]


# ------------------------------------------------------------------------------ the original formulation (autograd)

def _elementwise_loss_autograd(x: torch.Tensor, y: torch.Tensor, keep: Optional[torch.Tensor],
                               focusing: _Focusing) -> torch.Tensor:
    """The element-wise loss as the original computes it, differentiated by autograd.

    Used where the closed-form gradient does not apply: targets or masks that require a gradient themselves, the
    gradient through the weight for soft targets or a gamma in (0, 1), negative gammas and ``eps=0``.
    """
    prob_pos = torch.sigmoid(x)
    prob_neg = 1 - prob_pos
    if focusing.clip > 0:
        # Asymmetric probability shifting: 1 - max(p - clip, 0) == min(1 - p + clip, 1).
        prob_neg = (prob_neg + focusing.clip).clamp(max=1)

    log_likelihood = (y * torch.log(prob_pos.clamp(min=focusing.eps))
                      + (1 - y) * torch.log(prob_neg.clamp(min=focusing.eps)))

    if focusing.weighted:
        if focusing.weight_gradient:
            w_pos, w_neg, w_y = prob_pos, prob_neg, y
        else:
            # original: computed under torch.set_grad_enabled(False), i.e. the weight is a constant for
            # autograd. Detaching every input of the weight gives the same values and gradients without
            # touching the global grad mode.
            w_pos, w_neg, w_y = prob_pos.detach(), prob_neg.detach(), y.detach()
        prob_right = w_pos * w_y + w_neg * (1 - w_y)
        exponent = focusing.gamma_pos * w_y + focusing.gamma_neg * (1 - w_y)
        log_likelihood = log_likelihood * torch.pow(1 - prob_right, exponent)

    loss = -log_likelihood
    return loss if keep is None else loss * keep


# ------------------------------------------------------------------------- the fused formulation (closed-form gradient)
#
# Per element, with p = sigmoid(x), q = 1 - p, p_neg = min(q + clip, 1) and pt = p on positives, p_neg on negatives:
#
#     L = log(max(pt, eps)),  w = (1 - pt) ** gamma,  loss = -L * w * mask
#     dloss/dx = (slope * w - L * dw/dx) * mask,  slope = -dL/dx = -q on positives, p * q / p_neg on negatives
#
# where dw/dx = gamma * (1 - pt) ** (gamma - 1) * dp/dx * (-1 on positives, +1 on negatives), dp/dx = p * q, is
# used only when the gradient flows through the weight. Soft targets interpolate with y exactly as the original
# does. Where a clamp is active its branch passes no gradient: torch.clamp passes none where its input equals the
# bound either, so the masks below are strict. The gradient is computed in the forward pass and is the only tensor
# kept for backward. On CPU a fresh tensor (first-touch page faults) costs more than most operations on it, so the
# 0/1-target path works in place, in three buffers for the recipe.

#: Devices where the 0/1 test of the targets is read back without a device synchronisation.
_HARD_CHECK_DEVICES = ("cpu",)


def _scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim tensor of ``like``'s dtype and device, broadcast by the ops that take it."""
    return torch.full((), value, dtype=like.dtype, device=like.device)


def _power_(base: torch.Tensor, exponent: float) -> torch.Tensor:
    """``base ** exponent``, overwriting ``base``.

    Exponents 1 to 4 are computed by multiplication: on CPU ``torch.pow`` with other scalar exponents calls the scalar
    libm ``pow`` per element, which costs more than the rest of the loss. A non-zero base here is at least 2**-24 in
    float32 (it is 1 - p or 1 - p_neg), so base**4 stays a normal number, within a few ulps of ``pow``'s.
    """
    if exponent == 0:
        return base.fill_(1)  # like pow, which gives 1 even for 0 ** 0
    if exponent in (1, 2, 4):
        for _ in range(int(exponent).bit_length() - 1):
            base.mul_(base)
        return base
    if exponent == 3:
        return base.mul_(base * base)
    return base.pow_(exponent)


def _plan(x: torch.Tensor, y: torch.Tensor) -> _Plan:
    """Check whether every target is exactly 0 or 1, only where reading the answer back needs no device sync."""
    if y.device.type not in _HARD_CHECK_DEVICES or y.numel() == 0:
        return _Plan(False, None)
    scratch = torch.empty_like(x)
    # y - y*y is 0 exactly for 0 and 1, positive elsewhere in (0, 1), negative outside [0, 1] and NaN for NaN.
    low, high = torch.aminmax(torch.addcmul(y, y, y, value=-1, out=scratch))
    return _Plan(low.item() == 0 and high.item() == 0, scratch)


def _hard_weight(base: torch.Tensor, y: torch.Tensor, focusing: _Focusing) -> torch.Tensor:
    """The focal weight for 0/1 targets, in ``base``'s buffer: ``base ** gamma_pos`` or ``base ** gamma_neg``."""
    gamma_neg, gamma_pos = focusing.gamma_neg, focusing.gamma_pos
    if gamma_pos == gamma_neg:
        return _power_(base, gamma_neg)
    one = _scalar(1.0, base)
    if gamma_neg == 0:
        weight_pos = _power_(base, gamma_pos)
        return torch.lerp(one, weight_pos, y, out=weight_pos)
    weight_pos = one if gamma_pos == 0 else _power_(base.clone(), gamma_pos)
    weight_neg = _power_(base, gamma_neg)
    return torch.lerp(weight_neg, weight_pos, y, out=weight_neg)


def _hard_weight_slope(base: torch.Tensor, y: torch.Tensor, beyond: Optional[torch.Tensor],
                       focusing: _Focusing) -> torch.Tensor:
    """dw/dx divided by dp/dx, for 0/1 targets.

    ``-gamma_pos * base ** (gamma_pos - 1)`` on positives (the base is 1 - p) and ``gamma_neg * base ** (gamma_neg
    - 1)`` on negatives (the base is 1 - p_neg), 0 beyond the margin where the clamp passes no gradient.
    """

    def branch(gamma: float, sign: float) -> torch.Tensor:
        if gamma == 0:
            return _scalar(0.0, base)  # original: pow's gradient is 0 where the exponent is 0
        return _power_(base.clone(), gamma - 1).mul_(sign * gamma)

    slope_pos, slope_neg = branch(focusing.gamma_pos, -1.0), branch(focusing.gamma_neg, 1.0)
    if beyond is not None and slope_neg.dim() > 0:
        slope_neg.masked_fill_(beyond, 0)
    return torch.lerp(slope_neg, slope_pos, y, out=slope_neg if slope_neg.dim() > 0 else slope_pos)


def _hard_terms(x: torch.Tensor, y: torch.Tensor, scratch: torch.Tensor, focusing: _Focusing, with_grad: bool
                ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(L, w or None, d(-L w)/dx or None) for targets that are all 0 or 1; ``scratch`` becomes the gradient.

    With 0/1 targets ``lerp(a, b, y)`` picks ``b`` or ``a`` exactly, so the original's ``p * y + p_neg * (1 - y)`` and
    ``y * log(max(p, eps)) + (1 - y) * log(max(p_neg, eps))`` need one lerp and one logarithm, and the weight needs
    no exponent tensor.
    """
    eps = focusing.eps
    through_weight = with_grad and focusing.weighted and focusing.weight_gradient
    prob = torch.sigmoid(x, out=scratch)
    prob_comp = 1 - prob
    beyond = None
    if focusing.clip > 0:
        prob_right = prob_comp + focusing.clip
        if with_grad and (focusing.gamma_neg == 0 or through_weight):
            # Beyond the margin the clamp passes no gradient. With gamma_neg > 0 the weight (1 - 1) ** gamma_neg
            # is already 0 there, so only an unweighted negative branch, or the weight's own gradient, needs it.
            beyond = prob_right >= 1
        # original: p_neg = min(1 - p + clip, 1), then p * y + p_neg * (1 - y)
        prob_right = prob_right.clamp_(max=1).lerp_(prob, y)
    else:
        prob_right = torch.lerp(prob_comp, prob, y)

    grad = prob_slope = None
    if with_grad:
        if through_weight:
            prob_slope = prob * prob_comp  # dp/dx
        ratio = prob.div_(prob_right)  # p / p_neg on negatives; the positives' entries are replaced by the lerp
        if beyond is not None:
            ratio.masked_fill_(beyond, 0)
        grad = ratio.lerp_(_scalar(-1.0, ratio), y).mul_(prob_comp)
        if bool(prob_right.amin() <= eps):
            # The eps clamp passes no gradient (|logit| beyond about 18). This also clears the non-finite ratios,
            # which need p_right == 0.
            grad.masked_fill_(prob_right <= eps, 0)

    weight = weight_slope = None
    if focusing.weighted:
        base = torch.neg(prob_right, out=prob_comp).add_(1)  # 1 - pt, in q's buffer (q is no longer needed)
        if through_weight:
            weight_slope = _hard_weight_slope(base, y, beyond, focusing).mul_(prob_slope)
        weight = _hard_weight(base, y, focusing)
    log_lik = prob_right.clamp_(min=eps).log_()
    if grad is not None and weight is not None:
        grad.mul_(weight)
        if weight_slope is not None:
            grad.addcmul_(log_lik, weight_slope, value=-1)
    return log_lik, weight, grad


def _soft_terms(x: torch.Tensor, y: torch.Tensor, focusing: _Focusing, with_grad: bool
                ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(L, w or None, d(-L w)/dx or None) for any targets, with a constant weight: the original's interpolations
    written with ``lerp``."""
    eps = focusing.eps
    prob = torch.sigmoid(x)
    prob_comp = 1 - prob
    prob_neg, shifted = prob_comp, None
    if focusing.clip > 0:
        shifted = prob_comp + focusing.clip
        # original: min(1 - p + clip, 1), the probability shifting of the negatives
        prob_neg = shifted.clamp(max=1)
    # original: y * log(max(p, eps)) + (1 - y) * log(max(p_neg, eps))
    log_lik = torch.lerp(prob_neg.clamp(min=eps).log_(), prob.clamp(min=eps).log_(), y)

    weight = None
    if focusing.weighted:
        base = torch.lerp(prob_neg, prob, y).neg_().add_(1)  # original: 1 - (p * y + p_neg * (1 - y))
        if focusing.gamma_pos == focusing.gamma_neg:
            exponent = focusing.gamma_neg
        else:  # original: gamma_pos * y + gamma_neg * (1 - y)
            exponent = torch.lerp(_scalar(focusing.gamma_neg, y), _scalar(focusing.gamma_pos, y), y)
        weight = base.pow_(exponent)

    if not with_grad:
        return log_lik, weight, None
    slope_neg = torch.mul(prob, prob_comp).div_(prob_neg)
    if not min(focusing.clip, 1.0) > eps:  # otherwise p_neg >= min(clip, 1) > eps: that clamp is never active
        slope_neg.masked_fill_(prob_neg <= eps, 0)
    if shifted is not None:
        slope_neg.masked_fill_(shifted >= 1, 0)
    slope_pos = prob_comp.neg_().masked_fill_(prob <= eps, 0)  # -q where p > eps
    grad = slope_neg.lerp_(slope_pos, y)
    return log_lik, weight, grad if weight is None else grad.mul_(weight)


def _fused_value_and_gradient(x: torch.Tensor, y: torch.Tensor, keep: Optional[torch.Tensor], focusing: _Focusing,
                              plan: _Plan, elementwise: bool, with_grad: bool
                              ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The loss (element-wise, or its sum) and, if asked, its element-wise gradient with respect to ``x``."""
    if plan.hard and plan.scratch is not None:
        log_lik, weight, grad = _hard_terms(x, y, plan.scratch, focusing, with_grad)
    else:
        log_lik, weight, grad = _soft_terms(x, y, focusing, with_grad)
    scale = weight if keep is None else keep if weight is None else weight.mul_(keep)
    if scale is not None:
        log_lik.mul_(scale)
    if grad is not None and keep is not None:
        grad.mul_(keep)
    value = log_lik.neg_() if elementwise else log_lik.sum().neg_()
    return value, grad


class _FusedAsymmetricLoss(torch.autograd.Function):
    """ASL whose gradient is computed in closed form alongside the value; backward only scales it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, keep: Optional[torch.Tensor], focusing: _Focusing,
                plan: _Plan, elementwise: bool) -> torch.Tensor:
        value, grad = _fused_value_and_gradient(x, y, keep, focusing, plan, elementwise, with_grad=True)
        ctx.save_for_backward(grad)
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None, None, None, None


def _loss_total(x: torch.Tensor, y: torch.Tensor, keep: Optional[torch.Tensor], focusing: _Focusing,
                elementwise: bool) -> torch.Tensor:
    """The element-wise loss or its sum, by the fused path wherever it gives autograd's gradient exactly."""
    grad_mode = torch.is_grad_enabled()
    other_grads = grad_mode and (y.requires_grad or (keep is not None and keep.requires_grad))
    # With eps 0 (or below the dtype's range) a logarithm can be -inf, and the original's y * log(...) of the branch
    # not taken gives NaN where the fused selection would not.
    finite_logs = focusing.eps >= torch.finfo(x.dtype).tiny
    if focusing.fusable and finite_logs and not other_grads:
        plan = _plan(x, y)
        needs_grad = grad_mode and x.requires_grad
        weight_grad = needs_grad and focusing.weighted and focusing.weight_gradient
        if not needs_grad:
            return _fused_value_and_gradient(x, y, keep, focusing, plan, elementwise, with_grad=False)[0]
        if not weight_grad or (plan.hard and focusing.finite_weight_slope):
            return _FusedAsymmetricLoss.apply(x, y, keep, focusing, plan, elementwise)
    loss = _elementwise_loss_autograd(x, y, keep, focusing)
    return loss if elementwise else loss.sum()


def _asymmetric_loss(logits: torch.Tensor, targets: torch.Tensor, mask: Optional[torch.Tensor], *,
                     gamma_neg: float, gamma_pos: float, clip: Optional[float], eps: float,
                     detach_focal_weight: bool, reduction: str) -> torch.Tensor:
    if logits.shape != targets.shape:
        raise ValueError(f"ASL: logits and targets must have the same shape, got logits {tuple(logits.shape)} "
                         f"and targets {tuple(targets.shape)}")
    if mask is not None and mask.shape != targets.shape:
        raise ValueError(f"ASL: mask must have the shape of targets {tuple(targets.shape)}, "
                         f"got {tuple(mask.shape)}")
    # original: the margin applies only if clip is not None and clip > 0
    focusing = _Focusing(gamma_neg, gamma_pos, clip if clip is not None and clip > 0 else 0.0, eps,
                         weight_gradient=not detach_focal_weight)

    with autocast_disabled(logits.device.type):
        x = _as_float(logits)
        y = targets.to(x.dtype)
        keep = None
        if mask is not None:
            keep = mask.to(x.dtype)
            # Unannotated entries are often marked -1: give them a harmless target so that neither the value nor
            # the gradient of the (discarded) entry can be NaN, since NaN * 0 is still NaN.
            y = y.masked_fill(keep == 0, 0)

        total = _loss_total(x, y, keep, focusing, elementwise=reduction == "none")
        if reduction != "mean":
            return total
        count = keep.sum() if keep is not None else torch.tensor(float(x.numel()), dtype=x.dtype, device=x.device)
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
