"""Simulated partial annotation: turn fully labelled targets into partially labelled ones (-1 = unknown).

CSL (Ben-Baruch, Ridnik et al., CVPR 2022) studies partial labels on MS-COCO by hiding annotations of its training
set in two ways:

- ``fpc`` (fix per class): for every class, keep ``param`` of its positives and ``param`` of its negatives, drawn
  at random (all of them where there are fewer); the paper's setting is ``fpc`` 1000.
- ``rps`` (random per sample): drop every annotation independently with probability ``param``; the paper's
  setting is ``rps`` 0.5.

A hidden label becomes -1; a kept label keeps its value. The draw comes from ``numpy.random.default_rng(seed)``
alone, so the same targets, mode, param and seed give the same result (not the official's draws, which come from
NumPy's global generator).
"""
from __future__ import annotations

import math
from typing import TypeVar, Union

import numpy as np
import torch

from .base import DatasetError, LabelTable, MultiLabelDataset

__all__ = ["PARTIAL_SIMULATIONS", "simulate_partial_labels", "simulate_partial_dataset", "has_unknown_labels",
           "parse_simulation"]

#: mode -> what ``param`` means
PARTIAL_SIMULATIONS = {"fpc": "positives and negatives kept per class", "rps": "probability of dropping a label"}
# original: simulate_coco also takes the long names
_ALIASES = {"fix_per_class": "fpc", "random_per_sample": "rps"}

Targets = TypeVar("Targets", np.ndarray, torch.Tensor)


def _check(mode: str, param) -> tuple[str, Union[int, float]]:
    key = _ALIASES.get(str(mode).strip().lower(), str(mode).strip().lower())
    if key not in PARTIAL_SIMULATIONS:
        raise DatasetError(f"unknown partial-label simulation {mode!r}; known: fpc (fix per class), "
                           f"rps (random per sample)")
    number = isinstance(param, (int, float, np.integer, np.floating)) and not isinstance(param, bool)
    if not number or not math.isfinite(param):
        raise DatasetError(f"partial-label simulation {key}: param must be a number, got {param!r}")
    if key == "fpc":
        if param < 0 or param != int(param):
            raise DatasetError(f"partial-label simulation fpc: param is the number of positives and of negatives "
                               f"kept per class, a whole number >= 0, got {param!r}")
        return key, int(param)
    if not 0 <= param <= 1:
        raise DatasetError(f"partial-label simulation rps: param is the probability of dropping a label, "
                           f"within [0, 1], got {param!r}")
    return key, float(param)


def parse_simulation(text: str) -> tuple[str, Union[int, float]]:
    """``'fpc:N'`` or ``'rps:P'`` (train.py's ``--simulate-partial``) as ``(mode, param)``, checked."""
    mode, sep, value = str(text).partition(":")
    if not sep:
        raise DatasetError(f"expected fpc:N or rps:P, got {text!r}")
    try:
        number = float(value)
    except ValueError:
        raise DatasetError(f"expected fpc:N or rps:P with a number after the colon, got {text!r}") from None
    return _check(mode, number)


def simulate_partial_labels(targets: Targets, mode: str, param, seed: int = 0) -> Targets:
    """Hide annotations of ``targets`` ``(N, C)`` (1 positive, 0 negative) as CSL's simulation does.

    Args:
        targets: an ndarray or a tensor of a signed or floating dtype; entries that are neither 1 nor 0 (e.g. an
            unknown -1 already) are never kept by ``fpc`` and never changed by ``rps``.
        mode: ``fpc`` (``param`` positives and ``param`` negatives kept per class) or ``rps`` (each label dropped
            with probability ``param``).
        param: a whole number >= 0 for ``fpc``, a probability for ``rps``.
        seed: the seed of the draw.

    Returns a new array or tensor of the input's type, dtype and device with -1 where a label was hidden; the
    input is not modified. :class:`DatasetError` for a bad mode, param or input.
    """
    key, value = _check(mode, param)
    is_tensor = isinstance(targets, torch.Tensor)
    array = targets.detach().cpu().numpy() if is_tensor else np.asarray(targets)
    if array.ndim != 2:
        raise DatasetError(f"simulate_partial_labels: targets must be (num_samples, num_classes), "
                           f"got shape {array.shape}")
    if array.dtype == np.bool_ or np.issubdtype(array.dtype, np.unsignedinteger):
        raise DatasetError(f"simulate_partial_labels: targets of dtype {array.dtype} cannot hold -1")
    rng = np.random.default_rng(seed)
    if key == "fpc":
        out = np.full_like(array, -1)  # original: start from all unknown, then mark the kept labels
        for c in range(array.shape[1]):
            for label in (1, 0):
                rows = np.flatnonzero(array[:, c] == label)
                chosen = rng.choice(rows, size=min(value, rows.size), replace=False)
                out[chosen, c] = label
    else:
        out = array.copy()
        out[rng.random(array.shape) < value] = -1  # original: one uniform draw per entry, dropped below param
    if is_tensor:
        return torch.from_numpy(out).to(device=targets.device, dtype=targets.dtype)
    return out


def simulate_partial_dataset(dataset: MultiLabelDataset, mode: str, param, seed: int = 0) -> tuple[int, int]:
    """Replace ``dataset``'s labels by a simulated partial annotation of them, in place.

    Returns ``(kept, annotated)``: the number of annotations (targets 1 or 0) after and before. The dense target
    matrix is built once, so this suits sets of COCO's size, not Open Images'.
    """
    before = dataset.labels.dense()
    after = simulate_partial_labels(before, mode, param, seed=seed)
    parts = {value: [np.flatnonzero(row == value).tolist() for row in after] for value in (1.0, 0.0)}
    dataset.labels = LabelTable(before.shape[1], -1.0, parts)
    return int(((after == 1) | (after == 0)).sum()), int(((before == 1) | (before == 0)).sum())


def has_unknown_labels(dataset: MultiLabelDataset) -> bool:
    """Whether some target of ``dataset`` is -1 (unknown), from its label table alone (no image is read)."""
    labels = dataset.labels
    return any(bool((labels.target_array(i) < 0).any()) for i in range(len(labels)))
