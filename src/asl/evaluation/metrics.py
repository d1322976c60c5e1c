"""Multi-label metrics: the paper's mAP, a partial-label mAP, and validate.py's threshold metrics.

All functions take ``targets`` and ``scores`` of shape ``(N, C)`` (N samples, C classes) as NumPy arrays or torch
tensors on any device (they are copied to host memory). Only the order of the scores matters for the AP, so
logits and probabilities give the same mAP; the threshold metrics need probabilities.

Average precision (the original's definition, **non-interpolated**): sort the samples by score, descending; at
the rank of every positive compute the precision ``positives so far / rank``; sum these precisions and divide by
``number of positives + 1e-8``. A class without positives therefore scores 0. Without ties this equals
``sklearn.metrics.average_precision_score``.

Ties: samples are ordered by ``np.argsort(scores, kind='stable')[::-1]``, i.e. among equal scores the sample with
the larger index is ranked first. The original used NumPy's default (unstable) quicksort, whose tie order is
unspecified; a stable sort makes the result reproducible. NaN scores sort as the largest values.

A target counts as positive when it equals 1; anything else (0, and in :func:`mAP` also -1) is a negative, as in
the original. :func:`partial_mAP` instead treats negative targets (Open Images' -1) as "not annotated", and
:func:`weighted_partial_mAP` (CSL's figure) weights its classes by their number of positives.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    "average_precision",
    "per_class_ap",
    "mAP",
    "map_from_ap",
    "per_class_partial_ap",
    "partial_mAP",
    "partial_map_from_ap",
    "weighted_partial_mAP",
    "weighted_partial_map_from_ap",
    "score",
    "ThresholdMetrics",
    "threshold_metrics",
    "precision_recall_curve",
    "ranked_cut_points",
]

logger = logging.getLogger(__name__)

_AP_EPS = 1e-8  # original: added to the number of positives
# Rank at most this many scores at once, so that huge score matrices (Open Images: ~125k x 9605) stay in memory.
_MAX_ELEMENTS_PER_CHUNK = 1 << 24


def _to_numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach()
        if a.dtype in (torch.bfloat16, torch.float16):
            a = a.float()
        return a.cpu().numpy()
    return np.asarray(a)


def _as_matrix_pair(targets, scores) -> Tuple[np.ndarray, np.ndarray]:
    t, s = _to_numpy(targets), _to_numpy(scores)
    if t.shape != s.shape:
        raise ValueError(f"targets and scores must have the same shape, got targets {t.shape} and scores {s.shape}")
    if t.ndim == 1:  # a single class
        t, s = t[:, None], s[:, None]
    if t.ndim != 2:
        raise ValueError(f"targets and scores must be (num_samples, num_classes), got shape {t.shape}")
    return t, s


def _ap_columns(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Non-interpolated AP of every column of ``scores`` (N, K) against ``targets`` (N, K); fractions."""
    n, k = scores.shape
    out = np.zeros(k, dtype=np.float64)
    if n == 0 or k == 0:
        return out
    ranks = np.arange(1, n + 1, dtype=np.float64)[:, None]
    step = max(1, _MAX_ELEMENTS_PER_CHUNK // n)
    for start in range(0, k, step):
        cols = slice(start, start + step)
        order = np.argsort(scores[:, cols], axis=0, kind="stable")[::-1]
        is_pos = np.take_along_axis(targets[:, cols] == 1, order, axis=0)
        hits = np.cumsum(is_pos, axis=0)
        precision_sum = np.where(is_pos, hits / ranks, 0.0).sum(axis=0)
        out[cols] = precision_sum / (is_pos.sum(axis=0) + _AP_EPS)
    return out


def average_precision(scores, targets) -> float:
    """Non-interpolated average precision of one class, as a fraction in [0, 1].

    Args:
        scores: 1-D scores (any monotone score: logits or probabilities).
        targets: 1-D targets; 1 = positive, anything else negative.

    Note the argument order ``(scores, targets)``, the original's; the matrix functions take ``(targets, scores)``.
    """
    s, t = _to_numpy(scores).reshape(-1), _to_numpy(targets).reshape(-1)
    if s.shape != t.shape:
        raise ValueError(f"scores and targets must have the same length, got {s.shape[0]} and {t.shape[0]}")
    return float(_ap_columns(s[:, None], t[:, None])[0])


def per_class_ap(targets, scores) -> np.ndarray:
    """AP of every class, as fractions in [0, 1] (shape ``(C,)``); classes without positives get 0."""
    t, s = _as_matrix_pair(targets, scores)
    return _ap_columns(s, t)


def mAP(targets, scores) -> float:
    """Mean average precision in percent, the paper's metric.

    The mean runs over **all** classes, including those without any positive sample, which score 0 (original
    behaviour; on the standard benchmarks every class has positives). An empty input gives 0.
    """
    t, s = _as_matrix_pair(targets, scores)
    return map_from_ap(_ap_columns(s, t))


def map_from_ap(ap: np.ndarray) -> float:
    """:func:`mAP` from its :func:`per_class_ap`, for a caller that has it already."""
    if ap.size == 0:  # original: returns 0 for no predictions
        return 0.0
    return float(100.0 * ap.mean())


def per_class_partial_ap(targets, scores) -> np.ndarray:
    """AP of every class over its annotated samples only, as fractions; NaN for a skipped class.

    A negative target (Open Images' -1) means "not annotated": that sample is left out of that class's ranking.
    A class is skipped (NaN) when its annotated samples contain no positive or no negative.
    """
    t, s = _as_matrix_pair(targets, scores)
    out = np.full(t.shape[1], np.nan)
    for k in range(t.shape[1]):
        annotated = t[:, k] >= 0
        col_t = t[annotated, k]
        num_pos = int((col_t == 1).sum())
        if num_pos == 0 or num_pos == col_t.shape[0]:
            continue
        out[k] = _ap_columns(s[annotated, k][:, None], col_t[:, None])[0]
    return out


def partial_mAP(targets, scores) -> float:
    """Mean AP in percent for partially annotated data (target -1 = not annotated).

    Each class is ranked over its annotated samples only, and classes with no positive or no negative among them
    are skipped (see :func:`per_class_partial_ap`). Returns 0 (and logs a warning) when every class is skipped.
    """
    return partial_map_from_ap(per_class_partial_ap(targets, scores))


def partial_map_from_ap(ap: np.ndarray) -> float:
    """:func:`partial_mAP` from its :func:`per_class_partial_ap`, for a caller that has it already."""
    scored = ~np.isnan(ap)
    if not scored.any():
        logger.warning("partial_mAP: no class has both an annotated positive and an annotated negative")
        return 0.0
    return float(100.0 * ap[scored].mean())


def weighted_partial_mAP(targets, scores) -> float:
    """CSL's class-frequency-weighted partial mAP, in percent (the "macro" figure of the official ``AP_partial``).

    The classes scored are those of :func:`partial_mAP` (an annotated positive and an annotated negative); each
    class's AP (over its annotated samples) is weighted by its number of positives. Returns 0 (and logs a warning)
    when every class is skipped.
    """
    t, s = _as_matrix_pair(targets, scores)
    return weighted_partial_map_from_ap(per_class_partial_ap(t, s), t)


def weighted_partial_map_from_ap(ap: np.ndarray, targets) -> float:
    """:func:`weighted_partial_mAP` from its :func:`per_class_partial_ap`, for a caller that has it already."""
    scored = ~np.isnan(ap)
    if not scored.any():
        logger.warning("weighted_partial_mAP: no class has both an annotated positive and an annotated negative")
        return 0.0
    t = _to_numpy(targets)
    # original: the weight is the column sum of the targets with every value <= 0 set to 0 (summed in place: no
    # copy of a 9605-column matrix)
    positives = t.sum(axis=0, where=t > 0, dtype=np.float64)[scored]
    return float(100.0 * np.sum(ap[scored] * positives / positives.sum()))


def score(targets, scores) -> float:
    """The mAP the scripts report: :func:`partial_mAP` when some target is -1 (not annotated: Open Images, VOC
    "difficult"), :func:`mAP` otherwise."""
    t = _to_numpy(targets)
    return partial_mAP(targets, scores) if bool((t < 0).any()) else mAP(targets, scores)


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else 0.0


class ThresholdMetrics:
    """Precision / recall / F1 at a fixed threshold, accumulated over batches (validate.py's CP/CR/CF1/OP/OR/OF1).

    A prediction is positive when ``score > threshold`` (strict, as in the original); ``threshold`` is one number,
    or one per class (see :mod:`asl.evaluation.thresholds`). Targets: 1 positive,
    0 negative, negative values (-1, "not annotated") are ignored.

    :meth:`compute` returns percentages:

    - ``P_C``, ``R_C``: per-class precision and recall averaged over all classes; as in the original a class with no
      true positive counts as 0 (for both).
    - ``F_C``: the original's "CF1", the **mean of the per-class F1** scores.
    - ``F_C_standard``: the usual CF1 of the literature, ``2 * P_C * R_C / (P_C + R_C)``.
    - ``P_O``, ``R_O``, ``F_O``: overall (micro-averaged) precision, recall and F1.

    Every division by zero gives 0 (the original produced NaN for the overall ones).
    """

    def __init__(self, num_classes: int, threshold: Union[float, Sequence[float], np.ndarray] = 0.8):
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        values = np.asarray(threshold, dtype=np.float64)
        if values.ndim == 0:
            self.threshold: Union[float, np.ndarray] = float(values)
        elif values.shape == (self.num_classes,):
            self.threshold = values  # one threshold per class (asl.evaluation.thresholds)
        else:
            raise ValueError(f"expected one threshold or {self.num_classes}, got shape {values.shape}")
        self.reset()

    def reset(self) -> None:
        self.tp, self.fp, self.fn, self.tn = (np.zeros(self.num_classes, dtype=np.int64) for _ in range(4))

    def update(self, scores, targets) -> None:
        """Add a batch: ``scores`` are probabilities of shape ``(N, num_classes)``, ``targets`` the same shape."""
        if tuple(scores.shape) != tuple(targets.shape):
            raise ValueError(f"scores and targets must have the same shape, got scores {tuple(scores.shape)} and "
                             f"targets {tuple(targets.shape)}")
        if len(scores.shape) != 2 or scores.shape[1] != self.num_classes:
            raise ValueError(f"expected (batch, {self.num_classes}) scores, got shape {tuple(scores.shape)}")
        if isinstance(scores, torch.Tensor) and isinstance(targets, torch.Tensor):
            # Count on the tensors' device and move four small vectors, not the whole batch.
            scores, targets = scores.detach(), targets.detach().to(scores.device)
            pred = self.predict(scores)
            pos, neg = targets == 1, (targets >= 0) & (targets != 1)
            counts = torch.stack([(pred & pos).sum(0), (pred & neg).sum(0),
                                  (~pred & pos).sum(0), (~pred & neg).sum(0)]).cpu().numpy()
        else:
            s, t = _to_numpy(scores), _to_numpy(targets)
            pred = self.predict(s)
            pos, neg = t == 1, (t >= 0) & (t != 1)
            counts = np.stack([(pred & pos).sum(0), (pred & neg).sum(0), (~pred & pos).sum(0), (~pred & neg).sum(0)])
        self.tp += counts[0]
        self.fp += counts[1]
        self.fn += counts[2]
        self.tn += counts[3]

    def predict(self, scores):
        """``scores > threshold`` for a tensor or an array of shape ``(N, num_classes)``. Per-class thresholds are
        compared in the scores' dtype, as a single Python-float threshold is."""
        threshold = self.threshold
        if isinstance(threshold, np.ndarray):
            threshold = (torch.as_tensor(threshold, dtype=scores.dtype, device=scores.device)
                         if isinstance(scores, torch.Tensor) else threshold.astype(scores.dtype))
        return scores > threshold

    def per_class(self) -> Dict[str, np.ndarray]:
        """Per-class precision, recall and F1 in percent (0 where a class has no true positive)."""
        tp, fp, fn = (a.astype(np.float64) for a in (self.tp, self.fp, self.fn))
        has_tp = tp > 0
        precision = np.where(has_tp, 100.0 * tp / np.maximum(tp + fp, 1), 0.0)
        recall = np.where(has_tp, 100.0 * tp / np.maximum(tp + fn, 1), 0.0)
        f1 = np.where(has_tp, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
        return {"precision": precision, "recall": recall, "f1": f1}

    def compute(self) -> Dict[str, float]:
        per_class = self.per_class()
        p_c = float(per_class["precision"].mean())
        r_c = float(per_class["recall"].mean())
        tp, fp, fn = int(self.tp.sum()), int(self.fp.sum()), int(self.fn.sum())
        p_o = 100.0 * _ratio(tp, tp + fp)
        r_o = 100.0 * _ratio(tp, tp + fn)
        return {
            "P_C": p_c,
            "R_C": r_c,
            "F_C": float(per_class["f1"].mean()),  # original: mean of the per-class F1
            "F_C_standard": _ratio(2 * p_c * r_c, p_c + r_c),
            "P_O": p_o,
            "R_O": r_o,
            "F_O": _ratio(2 * p_o * r_o, p_o + r_o),
        }

    def format_line(self, values: Optional[Dict[str, float]] = None) -> str:
        """The original's summary line: ``P_C .. R_C .. F_C .. P_O .. R_O .. F_O ..`` (F_C = mean per-class F1)."""
        v = self.compute() if values is None else values
        return "P_C {:.2f} R_C {:.2f} F_C {:.2f} P_O {:.2f} R_O {:.2f} F_O {:.2f}".format(
            v["P_C"], v["R_C"], v["F_C"], v["P_O"], v["R_O"], v["F_O"])


def threshold_metrics(targets, scores, threshold: float = 0.8) -> Dict[str, float]:
    """:meth:`ThresholdMetrics.compute` for one ``(N, C)`` array of probabilities."""
    t, s = _as_matrix_pair(targets, scores)
    meter = ThresholdMetrics(t.shape[1], threshold)
    meter.update(s, t)
    return meter.compute()


def ranked_cut_points(scores, targets) -> Tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """One class's possible predictions "score >= s", one per distinct score s, highest first.

    Returns ``(s, true_positives, predicted, positives)``: the distinct scores, and for each the true positives
    and the number of samples predicted; ``positives`` counts the class's positives. Targets of -1 (not
    annotated) are left out. Ties are never split: a prediction takes all samples of a score or none.
    """
    s, t = _to_numpy(scores).reshape(-1), _to_numpy(targets).reshape(-1)
    if s.shape != t.shape:
        raise ValueError(f"scores and targets must have the same length, got {s.shape[0]} and {t.shape[0]}")
    annotated = t >= 0
    s, positive = s[annotated], t[annotated] == 1
    order = np.argsort(-s, kind="stable")
    s, positive = s[order], positive[order]
    # The last index of each run of equal scores.
    last = np.flatnonzero(np.append(s[1:] != s[:-1], True)) if s.size else np.zeros(0, dtype=np.int64)
    hits = np.cumsum(positive)[last] if s.size else np.zeros(0, dtype=np.int64)
    return s[last], hits, last + 1, int(positive.sum())


def precision_recall_curve(scores, targets) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One class's precision-recall curve: ``(precision, recall, thresholds)``, highest threshold first.

    Point i is the prediction "score >= thresholds[i]", one point per distinct score; targets of -1 (not
    annotated) are left out. Without positives the recall is 0 throughout (instead of undefined).
    """
    cut, hits, predicted, positives = ranked_cut_points(scores, targets)
    recall = hits / positives if positives else np.zeros(hits.shape)
    return hits / predicted, recall, cut
