"""Predictions: sigmoid scores over a loader (validate.py, train.py's evaluation) or of one batch (infer.py),
and the detections a threshold makes of them.

- :func:`evaluate` / :func:`evaluate_many`: sigmoid scores over a loader, gathered from every rank back into
  dataset order (so the mAP under ``torchrun`` equals the single-process one).
- :func:`predict` runs a batch (fp32 unless asked) and returns probabilities; :func:`detections` applies the
  threshold. Pictures themselves: :mod:`asl.pictures`.

Nothing here prints: progress goes to the ``on_batch`` callback and to ``logging``.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from .. import distributed as dist_utils
from ..data.batches import images_to_float, unpack_batch
from ..errors import NonFiniteScoresError
from ..precision import autocast

__all__ = ["evaluate", "evaluate_many", "predict", "detections", "default_threshold", "DATASET_THRESHOLDS"]

logger = logging.getLogger(__name__)

# original (infer.py): the threshold defaults to 0.995 for Open Images and to 0.7 for every other dataset type.
DATASET_THRESHOLDS = {"MS-COCO": 0.7, "OpenImages": 0.995}
OTHER_DATASET_THRESHOLD = 0.7

def default_threshold(dataset_type: Optional[str]) -> float:
    """The original's per-dataset default threshold; the name is matched case- and punctuation-insensitively."""
    def key(name: str) -> str:
        return "".join(ch for ch in name.lower() if ch.isalnum())

    wanted = key(dataset_type or "")
    for name, value in DATASET_THRESHOLDS.items():
        if key(name) == wanted:
            return value
    return OTHER_DATASET_THRESHOLD


@torch.no_grad()
def evaluate_many(models: Mapping[str, nn.Module], loader: Iterable, device: torch.device, *,
                  amp_dtype: Optional[torch.dtype] = None,
                  on_batch: Optional[Callable[[int, dict[str, torch.Tensor], torch.Tensor], None]] = None
                  ) -> dict[str, Any]:
    """Sigmoid scores of several models over one pass of ``loader`` (e.g. the regular and the EMA model).

    ``on_batch(i, {name: scores}, targets)`` is called after each batch (this rank's rows, on the CPU).

    original: validation runs the regular and the EMA model on each batch under autocast and keeps
    ``sigmoid(output)``. Here the sigmoid is taken of the fp32 logits (under fp16 autocast the original's
    scores are rounded to fp16, which creates ties between close scores; the fp32 ranking is the exact one).

    Under ``torchrun`` each rank evaluates its share (the loader's ``DistributedSampler``, which pads with
    repeated items), and the rows are gathered on every rank by dataset index with the padding removed. The
    batches must then carry dataset indices (``with_index=True`` in :func:`asl.data.create_dataset`); a single
    process without indices keeps the loader's order.

    Each model is put in eval mode for the pass and restored to its previous mode afterwards. Pass the plain
    models (not DDP wrappers: their forward would broadcast buffers between ranks).

    Returns a dict: ``scores`` {name: float32 array (N, C)}, ``targets`` (N, C), ``indices`` (N,) dataset
    indices (or 0..N-1), ``skipped`` (unreadable images, all ranks), ``num_images`` N.
    """
    distributed = dist_utils.is_dist()
    modes = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    scores: dict[str, list[torch.Tensor]] = {name: [] for name in models}
    targets_all: list[torch.Tensor] = []
    indices_all: list[torch.Tensor] = []
    skipped = 0
    seen = 0
    try:
        for i, batch in enumerate(loader):
            images, targets, indices, batch_skipped = unpack_batch(batch)
            skipped += batch_skipped
            n = images.shape[0]
            if n == 0:
                continue
            if indices is None:
                if distributed:
                    raise ValueError("distributed evaluation needs dataset indices in the batches "
                                     "(create the dataset with with_index=True)")
                indices = torch.arange(seen, seen + n)
            seen += n
            x = images_to_float(images, device)
            with autocast(device, amp_dtype):
                batch_scores = {name: torch.sigmoid(m(x).float()).cpu() for name, m in models.items()}
            for name, value in batch_scores.items():
                scores[name].append(value)
            targets_all.append(targets.float().cpu())
            indices_all.append(indices.long().cpu())
            if on_batch is not None:
                on_batch(i, batch_scores, targets_all[-1])
    finally:
        for name, m in models.items():
            m.train(modes[name])
    return _gather(list(models), scores, targets_all, indices_all, skipped, distributed)


def _gather(names: list[str], scores: Mapping[str, list[torch.Tensor]], targets_all: list[torch.Tensor],
            indices_all: list[torch.Tensor], skipped: int, distributed: bool) -> dict[str, Any]:
    """This rank's rows joined, then every rank's rows in dataset order (see :func:`evaluate_many`)."""
    num_classes = targets_all[0].shape[1] if targets_all else 0
    local = {"targets": torch.cat(targets_all) if targets_all else torch.zeros((0, num_classes))}
    for name in names:
        local[f"scores/{name}"] = torch.cat(scores[name]) if scores[name] else torch.zeros((0, num_classes))
    idx = torch.cat(indices_all) if indices_all else torch.zeros(0, dtype=torch.long)
    if distributed:
        # A rank may have seen no batch (tiny sets): give its empty tensors the common class count.
        num_classes = max(int(t[0]) for t in dist_utils.all_gather_varlen(torch.tensor([num_classes])))
        for key, value in local.items():
            if value.numel() == 0:
                local[key] = torch.zeros((0, num_classes))
        skipped = int(dist_utils.all_reduce_sum(torch.tensor([skipped]))[0])
    idx, gathered = dist_utils.gather_by_index(idx, local)
    # The gathered rows are CPU tensors: .numpy() shares their memory (no copy, no device wait), and the checks
    # below run on the arrays.
    out_scores = {name: gathered[f"scores/{name}"].numpy() for name in names}
    for name in names:
        _refuse_non_finite(out_scores[name], name)
    return {
        "scores": out_scores,
        "targets": gathered["targets"].numpy(),
        "indices": idx.numpy(),
        "skipped": skipped,
        "num_images": int(idx.shape[0]),
    }


def _refuse_non_finite(scores: np.ndarray, name: str) -> None:
    """An mAP of NaN scores is meaningless (NaNs sort anywhere): refuse it instead of reporting a number."""
    broken = int((~np.isfinite(scores)).any(axis=1).sum())
    if broken:
        raise NonFiniteScoresError(f"{broken} of {scores.shape[0]} images got non-finite (NaN/inf) scores from the "
                                   f"{name} model: its weights are broken")


def evaluate(model: nn.Module, loader: Iterable, device: torch.device, *, amp_dtype: Optional[torch.dtype] = None,
             on_batch: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None) -> dict[str, Any]:
    """Sigmoid scores of one model over ``loader``, in dataset order (see :func:`evaluate_many`);
    ``on_batch(i, scores, targets)`` after each batch.

    Returns a dict: ``scores`` float32 array (N, C), ``targets`` (N, C), ``indices`` (N,), ``skipped``,
    ``num_images``. Compute the metrics from it with :mod:`asl.metrics`, e.g.
    ``asl.metrics.mAP(out['targets'], out['scores'])``.
    """
    report = None if on_batch is None else (lambda i, scores, targets: on_batch(i, scores["model"], targets))
    out = evaluate_many({"model": model}, loader, device, amp_dtype=amp_dtype, on_batch=report)
    out["scores"] = out["scores"]["model"]
    return out


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, device: Union[str, torch.device],
            amp_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Probabilities ``sigmoid(model(x))`` as float32 on the CPU, for a uint8 (or float [0,1]) NCHW batch.

    original: inference runs in fp32; ``amp_dtype`` opts in to autocast. The sigmoid is taken in float32.
    """
    device = torch.device(device)
    # The batch stays NCHW, as in evaluate_many: a convolution runs in its weights' layout and converts its input,
    # so the layout prepare_for_inference chose (or --no-channels-last) decides, on every device.
    x = images_to_float(images, device)
    with autocast(device, amp_dtype):
        logits = model(x)
    return torch.sigmoid(logits.float()).cpu()


def detections(probabilities: Union[torch.Tensor, np.ndarray, Sequence[float]], class_names: Sequence[str],
               threshold: Union[float, np.ndarray], top_k: Optional[int] = None) -> list[dict[str, Any]]:
    """``[{'class': name, 'score': p}, ...]`` for the classes with ``p > threshold``, highest score first.
    ``threshold``: one number, or one per class (:mod:`asl.evaluation.thresholds`).

    original: a class is detected when its probability is strictly above the threshold. ``top_k`` keeps at most
    the K best of those (use threshold 0 for a plain top-K).
    """
    probs = np.asarray(probabilities.cpu() if isinstance(probabilities, torch.Tensor) else probabilities,
                       dtype=np.float64).reshape(-1)
    if probs.shape[0] != len(class_names):
        raise ValueError(f"{probs.shape[0]} scores for {len(class_names)} class names")
    chosen = np.flatnonzero(probs > threshold)
    # Stable sort on the negated scores: ties keep the class order, so the output is deterministic.
    chosen = chosen[np.argsort(-probs[chosen], kind="stable")]
    if top_k is not None:
        chosen = chosen[:max(int(top_k), 0)]
    return [{"class": str(class_names[i]), "score": float(probs[i])} for i in chosen]
