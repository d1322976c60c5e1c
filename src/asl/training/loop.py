"""The epoch loop of ``train.py``: train, evaluate the regular and the EMA model, keep the best, save to resume.

Nothing here prints: the caller gets every step and every epoch through callbacks.
"""
from __future__ import annotations

import enum
import logging
import signal
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import numpy as np
import torch.nn as nn
from torch.utils.data import IterableDataset

from .. import distributed as dist_utils
from .run_folder import HIGHEST, RunFolder, describe_kept
from ..evaluation.predictions import evaluate_many
from .step import NonFiniteLossError, StepConfig, train_one_epoch
from ..errors import NonFiniteScoresError, TrainingDivergedError
from ..evaluation.metrics import score
from .state import TrainState

__all__ = ["FitConfig", "FitOutcome", "fit", "StopFlag", "has_positive_labels"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitConfig:
    """``epochs``: length of the schedule; ``stop_epoch``: the last epoch run (original: 80 and 40).
    ``save_every_steps``: also write ``last.pth`` within an epoch (0: at epoch ends only)."""

    epochs: int
    stop_epoch: int
    steps_per_epoch: int
    local_batch: int
    save_every_steps: int
    step: StepConfig


class FitOutcome(str, enum.Enum):
    """How :func:`fit` ended: the schedule ran to ``stop_epoch``, or a signal stopped it (``last.pth`` then holds
    the exact position to resume from)."""

    DONE = "done"
    INTERRUPTED = "interrupted"


class StopFlag:
    """SIGINT/SIGTERM: finish the current step, save ``last.pth``, exit cleanly. A second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("%s received: stopping after the current step and saving last.pth",
                       signal.Signals(signum).name)

    def __enter__(self) -> "StopFlag":
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (e.g. called from a test thread): no signal handling
            self._previous.clear()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __call__(self) -> bool:
        return self.requested


def fit(state: TrainState, train_loader: Any, val_loader: Any, criterion: nn.Module, run_folder: RunFolder,
        config: FitConfig, *, on_step: Optional[Callable[[dict[str, Any]], None]] = None,
        on_epoch: Optional[Callable[[dict[str, Any]], None]] = None) -> FitOutcome:
    """Trains from ``state``'s position to the end of ``config.stop_epoch``; see :class:`FitOutcome`.

    ``on_step`` receives each step's dict (see :func:`asl.training.step.train_one_epoch`); ``on_epoch`` each epoch's
    record (also appended to ``log.txt``): epoch, train_loss, mAP_regular, mAP_ema, mAP, highest_mAP, lr,
    images_per_sec, steps, images (training images of the epoch, all ranks), skipped_images, time.
    """
    run_folder.check_space(state)
    if run_folder.is_main and state.epoch >= config.epochs:
        # The schedule is spent: a higher --stop-epoch would change nothing, and a resumed run keeps --epochs.
        logger.warning("nothing to train: the run has finished its schedule (--epochs %d); a longer one needs a new "
                       "--output-dir", config.epochs)
    elif run_folder.is_main and state.epoch > config.stop_epoch:
        logger.warning("nothing to train: the run is at epoch %d (--epochs %d, --stop-epoch %d); raise --stop-epoch "
                       "to continue", state.epoch, config.epochs, config.stop_epoch)
    warned_no_positives = False
    # The mid-epoch saves come right after a read-back of the loss: a state with a non-finite loss is never saved.
    step_config = replace(config.step, check_every=config.save_every_steps)
    with StopFlag() as stop_flag:
        while state.epoch < config.epochs and state.epoch <= config.stop_epoch:  # original: break after stop_epoch
            if state.step == 0:
                state.loss_sum, state.loss_steps = 0.0, 0
            _start_epoch(train_loader, state.epoch, state.step, config.local_batch)

            def step_done(info: dict[str, Any]) -> None:
                if on_step is not None:
                    on_step(info)
                if config.save_every_steps and state.step % config.save_every_steps == 0 \
                        and state.step < config.steps_per_epoch:
                    run_folder.save_last(state)

            try:
                stats = train_one_epoch(state, train_loader, criterion, step_config, on_step=step_done,
                                        stop_requested=stop_flag)
            except NonFiniteLossError as exc:
                raise TrainingDivergedError(f"{exc}; {describe_kept(run_folder.kept())}") from None
            if stats["interrupted"]:
                run_folder.save_last(state)
                return FitOutcome.INTERRUPTED
            record, meaningful = _evaluate_and_keep_best(state, val_loader, run_folder, config, stats)
            if not meaningful and not warned_no_positives and run_folder.is_main:
                logger.warning("the validation set has no positive label in any image: its mAP (%.2f) means "
                               "nothing, so no epoch is kept as the best model (%s); check the validation labels",
                               record["mAP"], HIGHEST)
                warned_no_positives = True
            state.epoch, state.step = state.epoch + 1, 0
            run_folder.save_last(state, synced=True)
            run_folder.log_epoch(record)
            if on_epoch is not None:
                on_epoch(record)
            if stop_flag.requested:
                return FitOutcome.INTERRUPTED
    return FitOutcome.DONE


def _start_epoch(loader: Any, epoch: int, step: int, local_batch: int) -> None:
    """Sets the loader up for ``epoch`` from its ``step``-th batch on. A map-style dataset's order is its sampler's;
    an iterable one (shards) has no sampler and orders, and skips, its batches itself."""
    loader.dataset.set_epoch(epoch)
    if isinstance(loader.dataset, IterableDataset):
        loader.dataset.set_start(step)
    else:
        loader.sampler.set_epoch(epoch)
        loader.sampler.set_start(step * local_batch)


def has_positive_labels(targets: Any) -> bool:
    """Whether any validation target is positive (1). Without one, every class's AP is 0 whatever the scores, so
    the mAP says nothing about the model and no epoch can be called the best."""
    return bool((np.asarray(targets) == 1).any())


def _evaluate_and_keep_best(state: TrainState, val_loader: Any, run_folder: RunFolder, config: FitConfig,
                            stats: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """original (validate_multi): the regular and the EMA model are scored; the epoch's mAP is the higher one.
    Returns the epoch's record, and whether its mAP means anything (see :func:`has_positive_labels`)."""
    dist_utils.broadcast_module_state(state.model)
    dist_utils.broadcast_module_state(state.ema.module)
    try:
        out = evaluate_many({"regular": state.model, "ema": state.ema.module}, val_loader, config.step.device,
                            amp_dtype=config.step.amp_dtype)
    except NonFiniteScoresError as exc:
        raise TrainingDivergedError(f"training diverged (try a lower --lr): {exc}; "
                                    f"{describe_kept(run_folder.kept())}") from None
    map_regular = score(out["targets"], out["scores"]["regular"])
    map_ema = score(out["targets"], out["scores"]["ema"])
    current = max(map_regular, map_ema)
    best_is_ema = map_ema > map_regular
    meaningful = has_positive_labels(out["targets"])
    if meaningful and current > state.highest:
        state.highest = current
        weights = state.ema.state_dict() if best_is_ema else state.model.state_dict()
        run_folder.save_best(weights, "ema" if best_is_ema else "regular", current, state.epoch)
    return {"epoch": state.epoch, "train_loss": stats["loss"], "mAP_regular": map_regular, "mAP_ema": map_ema,
            "mAP": current, "highest_mAP": state.highest, "lr": stats["lr"],
            "images_per_sec": stats["images_per_sec"], "steps": stats["steps"], "images": stats["images"],
            "skipped_images": stats["skipped"] + out["skipped"], "time": time.time()}, meaningful
