"""Per-class decision thresholds: chosen on an evaluated set, saved as JSON, read back by infer.py and validate.py.

The original decides every class at one threshold (0.7 in its inference script, 0.8 in its validation). Classes
differ: a rare class's scores sit lower than a frequent one's, so one number is too strict for some and too loose
for others. Two rules pick a threshold per class from a set of scores and labels:

- :func:`max_f1_thresholds`: the threshold that maximises the class's F1;
- :func:`precision_thresholds`: the lowest threshold whose precision reaches a target (the most recall for that
  precision).

A class is predicted when ``score > threshold`` (strict, as everywhere in this package). Only the sets "every
sample scoring at least s" can be predicted, one per distinct score s, so each rule looks at those sets alone; the
threshold returned lies halfway between s and the next lower score, or 0 (exactly representable in the scores'
dtype, so that float32 probabilities compared with it select exactly that set). A score of exactly 0 is never
predicted (no threshold in [0, 1] lies below it). Equal F1 values prefer the higher threshold. A class for which
no set qualifies (no positive sample, no positive above 0, or a precision never reached) gets 1.0: it is never
predicted. Targets of -1 (not annotated) are left out of their class.

The file is a JSON object ``{class name: threshold}`` in the model's class order.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np

from ..atomic import atomic_write_text
from ..errors import UsageError
from .metrics import ranked_cut_points

__all__ = ["NEVER", "max_f1_thresholds", "precision_thresholds", "save_thresholds", "load_thresholds",
           "thresholds_for_classes", "checked_threshold", "check_unique_classes"]

#: the threshold of a class that is never predicted (probabilities are at most 1 and the rule is strict).
NEVER = 1.0


def _cut_points(scores: np.ndarray, targets: np.ndarray):
    """For one class: the candidate sets (the top samples down to each distinct score), with their true
    positives and sizes, the class's positives, and the threshold that selects each set."""
    upper, true_positives, sizes, positives = ranked_cut_points(scores, targets)
    lower = np.append(upper[1:], np.zeros(1, dtype=upper.dtype))
    middle = ((upper + lower) / 2).astype(upper.dtype)
    # Halfway can round onto a neighbour when the two scores are adjacent floats; the lower score itself then
    # separates them (the rule is strict).
    thresholds = np.where((middle >= lower) & (middle < upper), middle, lower)
    # A score of exactly 0 is above no threshold in [0, 1]: sets reaching down to it cannot be predicted.
    possible = upper > 0
    return true_positives[possible], sizes[possible], positives, thresholds[possible]


def _as_arrays(targets, scores) -> tuple[np.ndarray, np.ndarray]:
    t, s = np.asarray(targets), np.asarray(scores)
    if t.shape != s.shape or t.ndim != 2:
        raise ValueError(f"targets and scores must be (num_samples, num_classes) arrays of one shape, got "
                         f"{t.shape} and {s.shape}")
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    return t, s


def max_f1_thresholds(targets, scores) -> np.ndarray:
    """Per class, the threshold maximising F1 = 2 TP / (predicted + positives); ``NEVER`` for a class without
    positives. Returns a float64 array of shape ``(num_classes,)``."""
    t, s = _as_arrays(targets, scores)
    out = np.full(t.shape[1], NEVER)
    for k in range(t.shape[1]):
        tp, sizes, positives, thresholds = _cut_points(s[:, k], t[:, k])
        if positives == 0:
            continue
        f1 = 2.0 * tp / (sizes + positives)
        if f1.size and f1.max() > 0:  # else no predictable set finds a positive: never predicting is as good
            out[k] = float(thresholds[int(np.argmax(f1))])  # argmax: the first maximum, the highest threshold
    return out


def precision_thresholds(targets, scores, precision: float) -> np.ndarray:
    """Per class, the lowest threshold at which the precision TP / predicted is at least ``precision``; ``NEVER``
    where no threshold reaches it (and for a class without positives)."""
    if not 0.0 < precision <= 1.0:
        raise ValueError(f"precision must be within (0, 1], got {precision}")
    t, s = _as_arrays(targets, scores)
    out = np.full(t.shape[1], NEVER)
    for k in range(t.shape[1]):
        tp, sizes, positives, thresholds = _cut_points(s[:, k], t[:, k])
        # tp >= precision * size, with a tolerance: 0.9 * 10 is 9.000000000000002, and 9 of 10 must reach 0.9.
        reached = np.flatnonzero((tp > 0) & (tp >= precision * sizes - 1e-9))
        if positives and reached.size:
            out[k] = float(thresholds[reached[-1]])
    return out


def save_thresholds(path: Union[str, Path], classes: Sequence[str], thresholds: Sequence[float]) -> None:
    """Writes ``{class name: threshold}`` atomically (the model's class order)."""
    if len(classes) != len(thresholds):
        raise ValueError(f"{len(thresholds)} thresholds for {len(classes)} classes")
    check_unique_classes(classes, f"cannot write {path}")
    document = {str(name): float(value) for name, value in zip(classes, thresholds)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(document, indent=1) + "\n")


def check_unique_classes(classes: Sequence[str], context: str) -> None:
    """Raises :class:`UsageError` (``context: ...``) when two classes share a name: a ``{name: threshold}`` file
    cannot hold both. validate.py calls it before evaluating, so that the run does not end in it."""
    first: dict[str, int] = {}
    for k, name in enumerate(str(c) for c in classes):
        if name in first:
            raise UsageError(f"{context}: the class name {name!r} repeats (classes {first[name]} and {k}), so a "
                             f"{{class name: threshold}} file cannot hold every class")
        first[name] = k


def load_thresholds(path: Union[str, Path], classes: Sequence[str]) -> np.ndarray:
    """Reads a thresholds file for a model with these ``classes``; returns the thresholds in the model's order.

    Raises :class:`UsageError` naming the file when it is unreadable, not a ``{name: number}`` object, misses one
    of the classes or names a class the model does not have, or holds a value outside [0, 1].
    """
    try:
        with open(path, "rb") as f:
            document = json.loads(f.read().decode("utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read the thresholds file {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"the thresholds file {path} is not valid JSON ({exc})") from None
    except RecursionError:
        # json's decoder recurses once per nesting level; a flat {name: number} object never comes close.
        raise UsageError(f"the thresholds file {path} is nested too deeply to be a {{class name: threshold}} "
                         f"object") from None
    return thresholds_for_classes(document, classes, f"the thresholds file {path}")


def thresholds_for_classes(document: object, classes: Sequence[str], where: str) -> np.ndarray:
    """The thresholds of a ``{class name: threshold}`` mapping (a file's, or those a model source carries) in the
    model's class order. ``where`` names the mapping in the :class:`UsageError` raised when it is not such a
    mapping, misses one of the classes, names a class the model does not have, or holds a value outside [0, 1]."""
    if not isinstance(document, Mapping):
        raise UsageError(f"{where} must hold a JSON object {{class name: threshold}}")
    known = set(classes)
    missing = [c for c in classes if c not in document]
    unknown = [c for c in document if c not in known]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"no threshold for {len(missing)} of the model's classes (first: {missing[0]!r})")
        if unknown:
            parts.append(f"{len(unknown)} class(es) the model does not have (first: {unknown[0]!r})")
        raise UsageError(f"{where} does not fit this model: {'; '.join(parts)}")
    values = [checked_threshold(document[name], f"{where}: the threshold of {name!r}") for name in classes]
    return np.asarray(values, dtype=np.float64)


def checked_threshold(value: object, what: str, hint: str = "") -> float:
    """``value`` as a float when it is a number within [0, 1]; :class:`UsageError` naming ``what`` (and adding
    ``hint``) otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or not 0.0 <= value <= 1.0:
        raise UsageError(f"{what} must be a number within [0, 1], got {value!r}{hint}")
    return float(value)
