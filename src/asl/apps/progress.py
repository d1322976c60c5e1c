"""What the apps show while they run. :class:`EpochProgress` (train.py): the original's progress lines, a tqdm
bar on a terminal, the per-epoch mAP lines and optionally TensorBoard scalars, fed by :func:`asl.training.loop.fit`'s
callbacks. :class:`BatchPrinter` (validate.py): the original's per-batch lines, fed by the evaluation callback."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from asl.errors import UsageError
from asl.evaluation.metrics import ThresholdMetrics

__all__ = ["EpochProgress", "BatchPrinter"]

TENSORBOARD_KEYS = ("train_loss", "mAP_regular", "mAP_ema", "lr", "images_per_sec")


class EpochProgress:
    """A context manager; ``step(info)`` and ``epoch(record)`` are the callbacks. Silent off the main process."""

    def __init__(self, epochs: int, steps: int, print_freq: int, enabled: bool, output_dir: Path,
                 tensorboard: bool) -> None:
        self.epochs, self.steps, self.print_freq, self.enabled = epochs, steps, print_freq, enabled
        self.bar: Optional[Any] = None
        self.bar_epoch = -1
        self.last_loss = float("nan")
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsageError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self.writer = SummaryWriter(str(output_dir / "tensorboard"))

    def __enter__(self) -> "EpochProgress":
        return self

    def __exit__(self, *exc) -> None:
        self._close_bar()
        if self.writer is not None:
            self.writer.close()

    def step(self, info: dict[str, Any]) -> None:
        if not self.enabled:
            return
        epoch, step = info["epoch"], info["step"]
        if epoch != self.bar_epoch and sys.stderr.isatty():
            from tqdm import tqdm

            self._close_bar()
            self.bar = tqdm(total=self.steps, initial=step, desc=f"epoch {epoch}", dynamic_ncols=True, leave=False)
        self.bar_epoch = epoch
        loss = info["loss"]  # read back from the device at the print interval only; None at the other steps
        if loss is not None:
            self.last_loss = loss
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{self.last_loss:.1f}", lr=f"{info['lr']:.1e}",
                                 img_s=f"{info['images_per_sec']:.0f}", refresh=False)
        if step % self.print_freq == 0 and loss is not None:
            # original: 'Epoch [e/E], Step [iii/NNN], LR x.xe-xx, Loss: y.y' every 100 steps
            self._print(f"Epoch [{epoch}/{self.epochs}], Step [{str(step).zfill(3)}/{str(self.steps).zfill(3)}], "
                        f"LR {info['lr']:.1e}, Loss: {loss:.1f}")

    def epoch(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._close_bar()
        print(f"mAP score regular {record['mAP_regular']:.2f}, mAP score EMA {record['mAP_ema']:.2f}", flush=True)
        print(f"current_mAP = {record['mAP']:.2f}, highest_mAP = {record['highest_mAP']:.2f}", flush=True)
        if self.writer is not None:
            for key in TENSORBOARD_KEYS:
                self.writer.add_scalar(key, record[key], record["epoch"])
            self.writer.flush()

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class BatchPrinter:
    """The original's progress lines, printed every ``print_freq`` batches (rank 0, its own share of the data);
    ``engine.evaluate`` calls :meth:`on_batch` with each batch's scores and targets."""

    def __init__(self, num_classes: int, threshold, print_freq: int, num_batches: int, enabled: bool):
        self.meter = ThresholdMetrics(num_classes, threshold)  # one threshold, or one per class
        self.print_freq = print_freq
        self.num_batches = num_batches
        self.enabled = enabled
        self.end = time.perf_counter()
        self.time_sum = 0.0
        self.batches = 0
        self.count = 0
        self.prec_sum = 0.0
        self.rec_sum = 0.0

    def on_batch(self, i: int, scores: torch.Tensor, targets: torch.Tensor) -> None:
        targets = targets.float()
        self.meter.update(scores, targets)
        pred = self.meter.predict(scores)
        tp = int((pred & (targets == 1)).sum())
        fp = int((pred & (targets == 0)).sum())
        fn = int((~pred & (targets == 1)).sum())
        # original: per-batch overall precision/recall in percent (0 when undefined), averaged over images.
        prec = 100.0 * tp / (tp + fp) if tp + fp else 0.0
        rec = 100.0 * tp / (tp + fn) if tp + fn else 0.0
        n = scores.shape[0]
        now = time.perf_counter()
        batch_time = now - self.end
        self.end = now
        self.time_sum += batch_time
        self.batches += 1
        self.count += n
        self.prec_sum += prec * n
        self.rec_sum += rec * n
        if self.enabled and i % self.print_freq == 0:
            print("Test: [{0}/{1}]\tTime {2:.3f} ({3:.3f})\tPrecision {4:.2f} ({5:.2f})\tRecall {6:.2f} ({7:.2f})"
                  .format(i, self.num_batches, batch_time, self.time_sum / self.batches, prec,
                          self.prec_sum / self.count, rec, self.rec_sum / self.count), flush=True)
            print(self.meter.format_line(), flush=True)
