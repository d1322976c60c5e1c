"""The training step, usable from train.py and user code.

- :func:`param_groups_weight_decay` / :func:`create_optimizer`: the original's Adam with weight decay on
  conv/linear weights only.
- :func:`train_one_epoch`: one epoch of the original recipe (AMP forward, fp32 summed loss, GradScaler, a
  scheduler step and an EMA update after every optimizer step), resumable mid-epoch.

Batches are unpacked by :mod:`asl.data.batches`; images become ``float / 255`` on the device (the original's
``ToTensor``).

Nothing here prints: progress goes to the ``on_step`` callback and to ``logging``.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn

from .. import distributed as dist_utils
from ..data.batches import images_to_float, unpack_batch
from ..errors import TrainingDivergedError, UsageError
from ..precision import autocast

__all__ = [
    "NonFiniteLossError", "param_groups_weight_decay", "create_optimizer", "StepConfig", "train_one_epoch",
    "UNANNOTATED_MODES",
]

logger = logging.getLogger(__name__)

#: How targets of -1 ("not annotated", Open Images) enter the loss: ignored (masked out) or counted as negatives.
UNANNOTATED_MODES = ("ignore", "negative")


class NonFiniteLossError(TrainingDivergedError):
    """The loss became NaN or infinite; raised before the optimizer step, so the weights stay the last good ones."""

    def __init__(self, epoch: int, step: int, value: float) -> None:
        self.epoch, self.step, self.value = epoch, step, value
        super().__init__(f"non-finite loss ({value}) at epoch {epoch}, step {step}: training diverged "
                         f"(try a lower --lr, or --amp-dtype bfloat16)")


# --------------------------------------------------------------------------------------------- optimizer

def param_groups_weight_decay(model: nn.Module, weight_decay: float,
                              skip: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Two parameter groups: no decay for biases and 1-D parameters (norm scales), decay for the rest.

    original: the "true weight decay" helper puts a parameter in the no-decay group when it is 1-D or its name
    ends with ``.bias`` (or is listed in ``skip``), and returns ``[no_decay, decay]`` in that order; the decay
    group carries ``weight_decay``, which Adam adds to the gradient (L2), the no-decay group carries 0.
    Frozen parameters (``requires_grad=False``) are left out.
    """
    skip = set(skip)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def create_optimizer(model: nn.Module, lr: float = 1e-4, weight_decay: float = 1e-4) -> torch.optim.Adam:
    """original: ``Adam(params=[no_decay, decay], lr=lr, weight_decay=0)`` (the groups override the 0)."""
    return torch.optim.Adam(param_groups_weight_decay(model, weight_decay), lr=lr, weight_decay=0.0)


# ----------------------------------------------------------------------------------------------- helpers

def _accumulate_gradients(state: Any, images: torch.Tensor, targets: torch.Tensor, criterion: nn.Module,
                          config: StepConfig) -> torch.Tensor:
    """Forward and backward of one batch in ``config.grad_accum_steps`` micro-batches; returns the summed loss.

    The loss is a sum over images, so the micro-batches' gradients add up to the whole batch's. Under DDP only the
    last micro-batch all-reduces (``no_sync`` for the others): the reduction of a sum of gradients is the sum of
    their reductions, at one communication per optimizer step.
    """
    device, distributed = config.device, config.world_size > 1
    chunks = max(1, min(config.grad_accum_steps, images.shape[0]))
    no_sync = getattr(state.forward_model, "no_sync", None) if distributed else None
    total = torch.zeros((), device=device)
    for i, (part_images, part_targets) in enumerate(zip(images.tensor_split(chunks), targets.tensor_split(chunks))):
        last = i == chunks - 1
        with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
            x = images_to_float(part_images, device)
            y, mask = _split_unannotated(part_targets.to(device, non_blocking=device.type == "cuda").float(),
                                         config.unannotated)
            with autocast(device, config.amp_dtype):
                # original: the loss is computed in fp32 on model(x).float(), outside autocast.
                output = _forward(state.forward_model, x).float()
            loss = criterion(output, y) if mask is None else criterion(output, y, mask=mask)
            scaled = loss * config.world_size if distributed else loss
            if state.scaler is not None:
                scaled = state.scaler.scale(scaled)
            scaled.backward()
        total = total + loss.detach()
    return total


#: torch's words when BatchNorm, in training, sees one value per channel.
_ONE_VALUE_PER_CHANNEL = "Expected more than 1 value per channel when training"


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)``; a micro-batch too small for BatchNorm is bad input (-b, --grad-accum-steps, --image-size)."""
    try:
        return model(x)
    except ValueError as exc:
        if not str(exc).startswith(_ONE_VALUE_PER_CHANNEL):
            raise
        # One picture whose last feature map is 1x1 (a small --image-size) leaves BatchNorm one value per channel.
        raise UsageError(f"a micro-batch of {x.shape[0]} picture(s) at {x.shape[-1]} px is too small to train "
                         f"BatchNorm ({exc}); use a larger --image-size, or a -b and --grad-accum-steps that put at "
                         f"least 2 pictures in every micro-batch, the epoch's last batch included") from exc


def _split_unannotated(targets: torch.Tensor, unannotated: Optional[str]) -> tuple[torch.Tensor,
                                                                                  Optional[torch.Tensor]]:
    if unannotated is None:
        return targets, None
    if unannotated == "ignore":
        return targets.clamp(min=0), targets >= 0
    if unannotated == "negative":
        return targets.clamp(min=0), None
    raise ValueError(f"unannotated must be one of {UNANNOTATED_MODES} or None, got {unannotated!r}")


def _current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


# ----------------------------------------------------------------------------------------------- training

@dataclass(frozen=True)
class StepConfig:
    """How training steps run: where, in which precision, across how many processes.

    ``world_size``: each rank's loss is a sum over its share of the global batch and DDP *averages* gradients, so
    the loss is multiplied by ``world_size`` to give the gradient of the summed loss over the whole global batch,
    as one process with batch ``-b`` would have (Adam's epsilon and the L2 weight decay make the scale matter).
    ``unannotated``: ``None`` (targets are 0/1), ``'ignore'`` (targets of -1 are masked out of the loss) or
    ``'negative'`` (-1 counts as 0). ``max_steps``: the epoch ends after this many steps in total.
    ``grad_accum_steps``: each batch of the loader (one optimizer step) goes through the model in this many
    micro-batches, their gradients summed; the summed loss is the whole batch's, so the recipe's batch and learning
    rate keep their meaning on a device that cannot hold the batch. BatchNorm statistics follow the micro-batch.
    """

    device: torch.device
    amp_dtype: Optional[torch.dtype] = None
    world_size: int = 1
    unannotated: Optional[str] = None
    max_steps: Optional[int] = None
    grad_accum_steps: int = 1


def train_one_epoch(state: Any, loader: Iterable, criterion: nn.Module, config: StepConfig, *,
                    on_step: Optional[Callable[[dict[str, Any]], None]] = None,
                    stop_requested: Optional[Callable[[], bool]] = None) -> dict[str, Any]:
    """Trains ``state`` (a :class:`asl.training.state.TrainState`) for one epoch, from step ``state.step`` of
    ``state.epoch``; ``loader`` yields the batches from that step on. ``state.step`` advances with every step.

    One step is exactly the original's: ``with autocast: out = model(x).float()``; ``loss = criterion(out, y)``
    (fp32, summed); ``scaler.scale(loss).backward()``; ``scaler.step(optimizer)``; ``scaler.update()``;
    ``scheduler.step()``; ``ema.update(model)``. ``on_step`` gets ``epoch, step, steps, loss, lr, images,
    images_per_sec`` after each step (``loss``: the global batch's summed loss). ``stop_requested`` is polled
    every step; when it is True on any rank the epoch ends after the current step with ``interrupted=True``.

    Returns ``loss`` (mean over the epoch's steps, those before a resume included), ``steps`` (done in this call),
    ``images`` (global count), ``images_per_sec``, ``skipped`` (unreadable images dropped), ``lr``,
    ``interrupted``. Raises
    :class:`NonFiniteLossError` before the optimizer step when the loss is NaN/inf (on any rank).
    """
    state.forward_model.train()
    num_steps = len(loader) + state.step if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    if config.max_steps is not None:
        num_steps = min(num_steps, config.max_steps) if num_steps is not None else config.max_steps
    totals = {"images": 0, "skipped": 0, "steps": 0}
    interrupted = False
    start_time = time.perf_counter()
    for step, batch in enumerate(loader, start=state.step):
        if num_steps is not None and step >= num_steps:
            break
        loss_value, n_global, skipped, stop = _train_step(state, batch, criterion, config, step,
                                                          stop_requested)
        state.step = step + 1
        state.loss_sum += loss_value
        state.loss_steps += 1
        totals["images"] += n_global
        totals["skipped"] += skipped
        totals["steps"] += 1
        if on_step is not None:
            elapsed = time.perf_counter() - start_time
            on_step({"epoch": state.epoch, "step": step, "steps": num_steps, "loss": loss_value,
                     "lr": _current_lr(state.optimizer), "images": totals["images"],
                     "images_per_sec": totals["images"] / elapsed if elapsed > 0 else 0.0})
        if stop:
            interrupted = True
            break
    elapsed = time.perf_counter() - start_time
    skipped = totals["skipped"]
    if config.world_size > 1:
        skipped = int(dist_utils.all_reduce_sum(torch.tensor([skipped], device=config.device))[0])
    # The epoch's mean loss, over the steps run before a mid-epoch resume too.
    return {"loss": state.loss_sum / state.loss_steps if state.loss_steps else float("nan"),
            "steps": totals["steps"], "images": totals["images"],
            "images_per_sec": totals["images"] / elapsed if elapsed > 0 else 0.0, "skipped": skipped,
            "lr": _current_lr(state.optimizer), "interrupted": interrupted}


def _train_step(state: Any, batch: Any, criterion: nn.Module, config: StepConfig, step: int,
                stop_requested: Optional[Callable[[], bool]]) -> tuple[float, int, int, bool]:
    """One optimizer step; returns (global loss, global images, locally skipped images, stop agreed)."""
    device, distributed = config.device, config.world_size > 1
    images, targets, _, skipped = unpack_batch(batch)
    n_local = images.shape[0]
    if n_local == 0 and distributed:
        raise RuntimeError(f"every image of a batch was unreadable (epoch {state.epoch}, step {step}); under "
                           f"DDP every rank must run each step: fix the data or use --strict-data")
    if n_local > 0:
        state.optimizer.zero_grad(set_to_none=True)
        local_loss = _accumulate_gradients(state, images, targets, criterion, config)
    else:
        # Every image of this batch was unreadable (single process): nothing to learn from, but the
        # schedule still advances so the run keeps the recipe's length.
        local_loss = torch.zeros((), device=device)

    # One small synchronisation per step: the global loss (shown, and checked for NaN/inf) and the
    # stop flag, which must be agreed by all ranks or the others would wait forever in the next all-reduce.
    stop_local = bool(stop_requested()) if stop_requested is not None else False
    if distributed:
        status = torch.stack([local_loss.float(), torch.tensor(float(stop_local), device=local_loss.device),
                              torch.tensor(float(n_local), device=local_loss.device)])
        status = dist_utils.all_reduce_sum(status)
        loss_value, stop, n_global = float(status[0]), bool(status[1] > 0), int(status[2])
    else:
        loss_value, stop, n_global = float(local_loss), stop_local, n_local
    if not math.isfinite(loss_value):
        state.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(state.epoch, step, loss_value)

    if n_local > 0:
        if state.scaler is not None:
            state.scaler.step(state.optimizer)
            state.scaler.update()
        else:
            state.optimizer.step()
    if state.scheduler is not None:
        with warnings.catch_warnings():
            # The schedule advances on every step, as the original's does, also when GradScaler skipped the optimizer
            # step (an fp16 overflow, typically the first step) or no image was readable; torch's warning that the
            # first learning rate is then skipped describes exactly that, and is not a mistake here.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before",
                                    category=UserWarning)
            state.scheduler.step()
    if state.ema is not None and n_local > 0:
        # original: ema.update(model) right after scheduler.step(), every step.
        state.ema.update(state.model)
    return loss_value, n_global, skipped, stop
