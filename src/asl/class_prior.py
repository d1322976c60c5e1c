"""The class prior of the CSL partial-label method: its CSV file and its running estimate during training.

CSL (Ben-Baruch, Ridnik et al., CVPR 2022) estimates how likely each class is to be present in an image as the
mean of the training sigmoid outputs since the run started. A first run (the "temporary model") writes it; a
second run reads it so that :class:`asl.losses.PartialSelectiveLoss` in ``selective`` mode can ignore the unknown
labels of frequent classes.

The file is the official one (``outputs/priors/prior_fpc_1000.csv`` in the authors' repository)::

    Classes,avg_pred
    person,0.542279
    bicycle,0.13131638
    ...

one row a class, in class order. As the official reads it (``pandas.read_csv``), the first line is the header,
blank lines count for nothing, and a row that does not hold two fields (the authors' file ends with one such
line) adds no class.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from .errors import UsageError

__all__ = ["PRIOR_HEADER", "read_prior_csv", "prior_csv_text", "PriorEstimate", "prior_length_error"]

#: the header of the prior file; original: pandas DataFrame({"Classes": ..., "avg_pred": ...})
PRIOR_HEADER = ("Classes", "avg_pred")


def prior_length_error(source: str, prior_classes: int, num_classes: int) -> UsageError:
    """The one-line refusal of a prior whose length is not the class count."""
    return UsageError(f"{source} holds a prior for {prior_classes} classes, but the model has {num_classes}")


def read_prior_csv(path: Union[str, Path]) -> tuple[list[str], list[float]]:
    """``(class names, prior values)`` from a ``Classes,avg_pred`` file; :class:`UsageError` if unreadable."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise UsageError(f"cannot read the class prior {path}: {reason}") from None
    names, values = [], []
    rows = csv.reader(io.StringIO(text))
    next(rows, None)  # original: pandas takes the first line as the header, whatever it holds
    for line_no, row in enumerate(rows, 2):
        if len(row) != 2:  # original: such a row gets a NaN prior, which never passes the threshold
            continue
        try:
            value = float(row[1])
        except ValueError:
            raise UsageError(f"class prior {path}:{line_no}: avg_pred {row[1]!r} is not a number") from None
        names.append(row[0])
        values.append(value)
    if not values:
        raise UsageError(f"class prior {path} holds no 'class,avg_pred' rows")
    return names, values


def prior_csv_text(class_names: Sequence[str], values: Sequence[float]) -> str:
    """The file :func:`read_prior_csv` reads: the header, then one ``name,value`` row a class."""
    if len(class_names) != len(values):
        raise ValueError(f"{len(class_names)} class names for {len(values)} prior values")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(PRIOR_HEADER)
    for name, value in zip(class_names, values):
        # original: the estimate is float32, written with its shortest exact decimal form (pandas' to_csv)
        writer.writerow([name, str(np.float32(value))])
    return out.getvalue()


class PriorEstimate:
    """Running mean of the sigmoid outputs over every training sample seen since the run started.

    original: ``ComputePrior.update``: a float32 sum of ``sigmoid(logits)`` over the batch dimension and a count of
    samples, never reset between epochs. The sum stays on the logits' device and :meth:`update` reads nothing back,
    so it adds no host synchronisation to a training step.

    Under several processes each keeps the sum of its own samples. ``reduce`` sums a tensor over the processes (an
    all-reduce): :meth:`mean` and :meth:`state_dict` call it, so every process must call them at the same point.
    ``holds_total``: whether this process takes the saved sum on :meth:`load_state_dict` (exactly one does; the
    others start from zero, so that the sum over the processes is the saved one).
    """

    def __init__(self, num_classes: int, device: Union[str, torch.device] = "cpu", *,
                 reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, holds_total: bool = True):
        self.num_classes = int(num_classes)
        self.total = torch.zeros(self.num_classes, dtype=torch.float32, device=device)
        self.count = 0  # samples of this process; a host number, known from the batch shape without a sync
        self.reduce = reduce
        self.holds_total = holds_total

    def update(self, logits: torch.Tensor) -> None:
        with torch.no_grad():
            probs = torch.sigmoid(logits.detach().float())
            self.total += probs.reshape(-1, self.num_classes).sum(dim=0)
            self.count += probs.numel() // self.num_classes

    def _summed(self) -> tuple[torch.Tensor, int]:
        if self.reduce is None:
            return self.total.clone(), self.count
        # float64 for the exchange: a count of millions of samples stays exact
        both = torch.cat([self.total.double(), self.total.new_tensor([self.count], dtype=torch.float64)])
        both = self.reduce(both)
        return both[:-1].float(), int(both[-1].item())

    def mean(self) -> Optional[torch.Tensor]:
        """The prior over every sample seen (by all processes); ``None`` before the first sample."""
        total, count = self._summed()
        if count == 0:
            return None
        return total / count

    def state_dict(self) -> dict:
        """The sum and count over all processes, on the CPU: what a resumed run starts from."""
        total, count = self._summed()
        return {"total": total.cpu(), "count": count}

    def load_state_dict(self, state: dict) -> None:
        total = torch.as_tensor(state["total"], dtype=torch.float32)
        count = float(state["count"])
        if total.shape != (self.num_classes,) or not math.isfinite(count) or count < 0:
            raise UsageError(f"the saved class prior holds {total.numel()} classes, the model has {self.num_classes}")
        if self.holds_total:
            self.total = total.to(self.total.device)
            self.count = int(count)
        else:
            self.total = torch.zeros_like(self.total)
            self.count = 0
