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
- Partially labelled data (targets 1 / 0 / -1 unknown): :class:`PartialSelectiveLoss`, the authors' follow-up
  (CSL, CVPR 2022).

Differences from the original code (values and gradients are the same):

- With ``disable_torch_grad_focal_loss=True`` the original switches the global grad mode off and on around the
  focal weight, which turns gradients back on when the loss is called inside ``torch.no_grad()``. Here the weight
  is computed from detached tensors and the grad mode is never touched.
- ``AsymmetricLossOptimized`` stores nothing on the module between calls (the original keeps its intermediate
  tensors, and with them the autograd graph, as attributes).
- Inputs are promoted to float32 and autocast is disabled inside the loss, so it is computed in fp32 under AMP
  (the original training script calls it on ``model(x).float()``); float64 stays float64.
- Extras: a ``mask`` keyword, a ``reduction`` argument for the multi-label losses, a ``ValueError`` on
  mismatched shapes, and a warning when the first call without a mask has targets below 0.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .class_prior import prior_length_error, read_prior_csv
from .errors import UsageError
from .precision import autocast_disabled

__all__ = ["AsymmetricLoss", "AsymmetricLossOptimized", "ASLSingleLabel", "PartialSelectiveLoss", "PARTIAL_LOSS_MODES"]

_MULTI_LABEL_REDUCTIONS = ("sum", "mean", "none")
_SINGLE_LABEL_REDUCTIONS = ("mean", "sum", "none")


def _check_reduction(reduction: str, allowed: tuple) -> str:
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}, got {reduction!r}")
    return reduction


def _as_float(t: torch.Tensor) -> torch.Tensor:
    """Promote to float32 (half, bfloat16, integer and bool inputs); float64 stays float64."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _warn_if_unknown_targets(targets: torch.Tensor) -> None:
    if targets.numel() and bool((targets < 0).any()):
        warnings.warn("AsymmetricLoss got targets below 0 (e.g. -1 for 'not annotated') and no mask: they are not "
                      "ignored and give a meaningless term; pass mask=targets >= 0 to ignore them, or use "
                      "PartialSelectiveLoss", UserWarning, stacklevel=3)


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
        # Whether the first call without a mask has been checked for targets of -1; checking once per instance
        # reads the targets back to the host once, not on every step.
        self._unmasked_targets_checked = False

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, *,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if logits.shape != targets.shape:
            raise ValueError(f"ASL: logits and targets must have the same shape, got logits {tuple(logits.shape)} "
                             f"and targets {tuple(targets.shape)}")
        if mask is not None and mask.shape != targets.shape:
            raise ValueError(f"ASL: mask must have the shape of targets {tuple(targets.shape)}, "
                             f"got {tuple(mask.shape)}")
        # Not while torch.compile traces: reading a tensor there would break the graph; the eager call checks.
        if mask is None and not self._unmasked_targets_checked and not torch.compiler.is_compiling():
            self._unmasked_targets_checked = True
            _warn_if_unknown_targets(targets)
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


#: the ways :class:`PartialSelectiveLoss` treats unknown labels (target -1)
PARTIAL_LOSS_MODES = ("negative", "ignore", "ignore_normalize_classes", "selective")

_LOG_EPS = 1e-8  # original: the probabilities are clamped to at least 1e-8 inside the logarithms


class PartialSelectiveLoss(nn.Module):
    """The Class-aware Selective Loss for partially annotated labels (CSL; Ben-Baruch, Ridnik et al., CVPR 2022).

    Targets are 1 (positive), 0 (annotated negative) or -1 (unknown). With ``p = sigmoid(logit)`` and
    ``q = min(1 - p + clip, 1)`` (``q = 1 - p`` without ``clip``), every entry contributes

    .. code-block:: text

        positive:  alpha_pos   * (1 - p) ** gamma_pos   * log(max(p, 1e-8))
        negative:  alpha_neg   * (1 - q) ** gamma_neg   * log(max(q, 1e-8))
        unknown:   alpha_unann * (1 - q) ** gamma_unann * log(max(q, 1e-8)) * r

    and the loss is minus the sum over the batch (no averaging), as in the official code. The focusing weights
    ``(1 - .) ** gamma`` and ``r`` are constants for autograd. ``partial_loss_mode`` sets ``r``:

    - ``negative``: every unknown label is a negative, ``r = 1``;
    - ``ignore``: unknown labels count for nothing, ``r = 0``;
    - ``ignore_normalize_classes``: ``r = 0``, and every annotated entry of an image is weighted by
      ``1 + 1 / (1 + number of annotated labels of the image)`` (Durand et al. 2019);
    - ``selective``: ``r = 0`` for the unknown labels of a class whose prior exceeds ``prior_threshold`` and for
      the ``likelihood_topk * batch_size`` unknown labels of the batch with the highest ``p``; ``r = 1`` for
      the others.

    Args:
        gamma_pos, gamma_neg, gamma_unann: focusing parameters of positives, annotated negatives and unknown
            labels (the official training script's 0, 1, 2).
        alpha_pos, alpha_neg, alpha_unann: their weights (1 each).
        clip: the probability margin of ``q``; it applies to the unknown labels too. ``0`` or ``None``: none.
        partial_loss_mode: one of :data:`PARTIAL_LOSS_MODES`.
        likelihood_topk: unknown labels ignored per image of the batch in ``selective`` mode.
        prior_threshold: in ``selective`` mode with a prior, the unknown labels of classes whose prior exceeds it
            are ignored; ``0`` or ``None`` turns the prior off.
        prior: ``None``, one number per class, or the path of a ``Classes,avg_pred`` CSV file
            (:mod:`asl.class_prior`); used only in ``selective`` mode.

    ``forward(logits, targets)`` takes two tensors of the same shape, e.g. ``(N, C)``. Half-precision logits are
    computed in float32 (float64 stays float64). The loss reads nothing back to the host and builds no tensor
    whose shape depends on the data. :class:`asl.errors.UsageError` for a prior whose length is not the class
    count, an unreadable prior file or a bad argument.
    """

    prior: Optional[torch.Tensor]

    def __init__(self, *, gamma_pos: float = 0, gamma_neg: float = 1, gamma_unann: float = 2, alpha_pos: float = 1,
                 alpha_neg: float = 1, alpha_unann: float = 1, clip: Optional[float] = 0,
                 partial_loss_mode: str = "negative", likelihood_topk: int = 5,
                 prior_threshold: Optional[float] = 0.05, prior=None):
        super().__init__()
        if partial_loss_mode not in PARTIAL_LOSS_MODES:
            raise UsageError(f"partial_loss_mode must be one of {', '.join(PARTIAL_LOSS_MODES)}, "
                             f"got {partial_loss_mode!r}")
        whole = (isinstance(likelihood_topk, (int, float)) and not isinstance(likelihood_topk, bool)
                 and math.isfinite(likelihood_topk))
        if not whole or int(likelihood_topk) != likelihood_topk or likelihood_topk < 0:
            raise UsageError(f"likelihood_topk must be a whole number >= 0, got {likelihood_topk!r}")
        self.gamma_pos, self.gamma_neg, self.gamma_unann = gamma_pos, gamma_neg, gamma_unann
        self.alpha_pos, self.alpha_neg, self.alpha_unann = alpha_pos, alpha_neg, alpha_unann
        self.clip = clip
        self.partial_loss_mode = partial_loss_mode
        self.likelihood_topk = int(likelihood_topk)
        self.prior_threshold = prior_threshold
        self.prior_source = "the class prior"
        values = None
        if isinstance(prior, (str, os.PathLike)):
            self.prior_source = f"the class prior {prior}"
            values = read_prior_csv(prior)[1]
        elif prior is not None:
            values = torch.as_tensor(prior).detach().reshape(-1).tolist()
        # original: the prior is a float32 tensor, compared with the threshold in float32
        self.register_buffer("prior", None if values is None else torch.tensor(values, dtype=torch.float32),
                             persistent=False)

    def check_num_classes(self, num_classes: int) -> None:
        """Refuse (one line, both counts) a prior that is not one number per class."""
        if self.prior is not None and self.prior.numel() != num_classes:
            raise prior_length_error(self.prior_source, self.prior.numel(), num_classes)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.shape != targets.shape:
            raise ValueError(f"PartialSelectiveLoss: logits and targets must have the same shape, got logits "
                             f"{tuple(logits.shape)} and targets {tuple(targets.shape)}")
        if self.partial_loss_mode == "selective" and self._prior_applies():
            self.check_num_classes(logits.shape[-1] if logits.dim() else 1)
        with autocast_disabled(logits.device.type):
            x = _as_float(logits)
            prob = torch.sigmoid(x)
            prob_neg = 1 - prob
            if self.clip is not None and self.clip > 0:
                # original: the margin shifts the unknown labels' probability too
                prob_neg = (prob_neg + self.clip).clamp(max=1)
            coef_pos, coef_neg = self._coefficients(targets, prob.detach(), prob_neg.detach())
            log_pos = torch.log(prob.clamp(min=_LOG_EPS))
            log_neg = torch.log(prob_neg.clamp(min=_LOG_EPS))
            # original: minus the sum over the batch of alpha * weight * r * log-likelihood (no averaging)
            return -((coef_pos * log_pos).sum() + (coef_neg * log_neg).sum())

    def _prior_applies(self) -> bool:
        return self.prior is not None and bool(self.prior_threshold)  # original: a threshold of 0 turns it off

    def _coefficients(self, targets: torch.Tensor, prob: torch.Tensor,
                      prob_neg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The constant factors of ``log p`` and ``log q`` in every entry: alpha * focusing weight * r.

        original: the focusing weight is ``(1 - p) ** gamma_pos`` on positives and ``(1 - q) ** gamma`` on the
        others, computed without gradient; a target that is neither 1, 0 nor -1 contributes nothing.
        """
        pos, neg, unann = targets == 1, targets == 0, targets == -1
        zero = prob.new_zeros(())
        coef_pos = torch.where(pos, self._focus(1 - prob, self.gamma_pos, self.alpha_pos), zero)
        base_neg = 1 - prob_neg
        coef_neg = self._focus(base_neg, self.gamma_neg, self.alpha_neg)
        counted_unknown, row_scale = self._unknown_labels_counted(targets, unann, prob_neg)
        if counted_unknown is None:
            coef_neg = torch.where(neg, coef_neg, zero)
        else:
            coef_unann = self._focus(base_neg, self.gamma_unann, self.alpha_unann)
            coef_neg = torch.where(neg, coef_neg, torch.where(counted_unknown, coef_unann, zero))
        if row_scale is not None:
            coef_pos, coef_neg = coef_pos * row_scale, coef_neg * row_scale
        return coef_pos, coef_neg

    @staticmethod
    def _focus(base: torch.Tensor, gamma: float, alpha: float) -> torch.Tensor:
        """``alpha * base ** gamma`` (a 0-d tensor when ``gamma`` is 0: ``x ** 0`` is 1, 0 ** 0 included)."""
        if gamma == 0:
            return base.new_tensor(float(alpha))
        weight = base.pow(gamma)
        return weight if alpha == 1 else alpha * weight

    def _unknown_labels_counted(self, targets, unann, prob_neg) -> tuple[Optional[torch.Tensor],
                                                                         Optional[torch.Tensor]]:
        """The mode's ``r``: which unknown labels count (a mask, ``None`` for none), and a per-image factor of
        every annotated label (``None`` for 1)."""
        mode = self.partial_loss_mode
        if mode == "negative":
            return unann, None
        if mode == "ignore":
            return None, None
        if mode == "ignore_normalize_classes":
            annotated = (~unann).sum(dim=-1, keepdim=True)
            # original: 1 / (1 + n) + 1 with n the image's annotated labels, computed in float32 whatever the
            # logits' dtype
            return None, 1 / (1 + annotated).to(torch.float32) + 1
        counted = unann & ~self._most_likely_unknown(unann, prob_neg)
        if self._prior_applies():
            counted = counted & ~(self.prior.to(unann.device) > self.prior_threshold)
        return counted, None

    def _most_likely_unknown(self, unann: torch.Tensor, prob_neg: torch.Tensor) -> torch.Tensor:
        """The ``likelihood_topk * batch_size`` unknown entries with the smallest ``q``, as a mask.

        original: taken over every unknown label of the batch, flattened, including those the prior already
        ignores, ranked by the clipped ``q``. The k-th smallest ``q`` over a tensor of fixed size, in which
        annotated entries rank last, keeps the shapes independent of the data (no host synchronisation). Unknown
        labels tied at the k-th ``q`` (frequent in float32, where ``q`` saturates) are taken in row-major order:
        the official sorts with an unstable ``argsort``, which leaves the choice among them unspecified.
        """
        flat_unann = unann.reshape(-1)
        k = min(self.likelihood_topk * (unann.shape[0] if unann.dim() else 1), flat_unann.numel())
        if k == 0:
            return torch.zeros_like(unann)
        key = prob_neg.reshape(-1).masked_fill(~flat_unann, float("inf"))
        kth = torch.kthvalue(key, k).values
        below, tied = key < kth, key == kth
        room = k - below.sum()
        chosen = below | (tied & (tied.cumsum(0) <= room))
        # With fewer unknown labels than k, annotated entries (key inf) fill the rest of the k: left out here.
        return (chosen & flat_unann).reshape(unann.shape)

    def extra_repr(self) -> str:
        prior = "None" if self.prior is None else f"<{self.prior.numel()} classes>"
        return (f"partial_loss_mode={self.partial_loss_mode!r}, gamma_pos={self.gamma_pos}, "
                f"gamma_neg={self.gamma_neg}, gamma_unann={self.gamma_unann}, alpha_pos={self.alpha_pos}, "
                f"alpha_neg={self.alpha_neg}, alpha_unann={self.alpha_unann}, clip={self.clip}, "
                f"likelihood_topk={self.likelihood_topk}, prior_threshold={self.prior_threshold}, prior={prior}")
