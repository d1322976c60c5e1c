"""The training step, usable from train.py and user code.

- :func:`param_groups_weight_decay` / :func:`create_optimizer`: the original's Adam with weight decay on
  conv/linear weights only.
- :func:`train_one_epoch`: one epoch of the original recipe (AMP forward, fp32 summed loss, GradScaler, a
  scheduler step and an EMA update after every optimizer step), resumable mid-epoch.

Batches are unpacked by :mod:`asl.data.batches`; images become ``float / 255`` on the device (the original's
``ToTensor``).

No step waits for the device: the loss stays there, summed in a tally, and is read back (one transfer, one
collective under ``torchrun``) only at the *read-back steps*: every ``print_freq``-th step, the epoch's last, and
those the caller asks for (:attr:`StepConfig.check_every`). docs/speed.md lists what still waits.

Nothing here prints: progress goes to the ``on_step`` callback and to ``logging``.
"""
from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn

from .. import distributed as dist_utils
from ..data.batches import images_to_float, unpack_batch
from ..data.open_images import UNANNOTATED_MODES
from ..errors import TrainingDivergedError, UsageError
from ..precision import autocast

__all__ = [
    "NonFiniteLossError", "param_groups_weight_decay", "create_optimizer", "StepConfig", "StepResult", "Readback",
    "train_one_epoch", "UNANNOTATED_MODES", "STOP_AGREEMENT_STEPS",
]

logger = logging.getLogger(__name__)

#: Under torchrun a stop request (Ctrl-C, SIGTERM) is agreed by all ranks at read-back steps only, and at least this
#: often, so that a preempted job stops within a few steps even with a long --print-freq.
STOP_AGREEMENT_STEPS = 8


class NonFiniteLossError(TrainingDivergedError):
    """The loss became NaN or infinite at ``step`` (the first such step of the epoch). Raised at the next read-back,
    before that step's optimizer step; nothing is saved after the bad step."""

    def __init__(self, epoch: int, step: int, value: float) -> None:
        self.epoch, self.step, self.value = epoch, step, value
        super().__init__(f"non-finite loss ({value}) at epoch {epoch}, step {step} (the first step that went bad): "
                         f"training diverged (try a lower --lr, or --amp-dtype bfloat16)")


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


def create_optimizer(model: nn.Module, lr: float = 1e-4, weight_decay: float = 1e-4,
                     fused: bool = False) -> torch.optim.Adam:
    """original: ``Adam(params=[no_decay, decay], lr=lr, weight_decay=0)`` (the groups override the 0).

    ``fused``: torch's fused Adam (CUDA), the same update in fewer kernels; it also takes GradScaler's overflow flag
    on the device, so an fp16 step needs no read-back to decide whether to skip.
    """
    return torch.optim.Adam(param_groups_weight_decay(model, weight_decay), lr=lr, weight_decay=0.0,
                            fused=fused or None)


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
            if getattr(state, "prior", None) is not None:
                state.prior.update(output)  # original: ComputePrior.update(output) after every training step
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
    ``rank``: this process's rank (its slot in the read-back). ``unannotated``: ``None`` (targets are 0/1),
    ``'ignore'`` (targets of -1 are masked out of the loss) or ``'negative'`` (-1 counts as 0). ``max_steps``: the
    epoch ends after this many steps in total. ``grad_accum_steps``: each batch of the loader (one optimizer step)
    goes through the model in this many micro-batches, their gradients summed; the summed loss is the whole
    batch's, so the recipe's batch and learning rate keep their meaning on a device that cannot hold the batch.
    BatchNorm statistics follow the micro-batch. ``print_freq``: the loss is read back at every step whose index is
    a multiple of it (original: 100). ``check_every``: also after every N-th step of the epoch (0: never), so that a
    caller saving there saves a state whose losses were all finite.
    """

    device: torch.device
    amp_dtype: Optional[torch.dtype] = None
    world_size: int = 1
    unannotated: Optional[str] = None
    max_steps: Optional[int] = None
    grad_accum_steps: int = 1
    print_freq: int = 100
    check_every: int = 0
    rank: int = 0

    def reads_back(self, step: int, last: bool) -> bool:
        """Whether ``step`` is a read-back step; the same answer on every rank, so that all join its collective."""
        if last or step % self.print_freq == 0:
            return True
        if self.check_every and (step + 1) % self.check_every == 0:
            return True
        return self.world_size > 1 and step % STOP_AGREEMENT_STEPS == 0


@dataclass(frozen=True)
class Readback:
    """The steps since the previous read-back, as all ranks together ran them. ``first_bad_step``: the first of
    them whose loss was NaN or infinite (any rank), with that loss in ``bad_loss``; None when all were finite."""

    loss_sum: float
    last_loss: float
    steps: int
    images: int
    skipped: int
    stop: bool
    first_bad_step: Optional[int]
    bad_loss: float


@dataclass(frozen=True)
class StepResult:
    """One optimizer step, as seen from the host without waiting for the device: the read-back when the step was a
    read-back step, and whether all ranks agreed to stop after it. (Its images are counted in the tally.)"""

    readback: Optional[Readback]
    stop: bool


class _Tally:
    """The steps since the last read-back: the loss sum, the last step's loss and the first non-finite step stay on
    the device; :meth:`read` brings them back in one transfer (and sums them over ranks in one collective)."""

    def __init__(self, config: StepConfig) -> None:
        self.config = config
        self._reset()

    def _reset(self) -> None:
        self.steps = self.images = self.skipped = 0
        zero = torch.zeros((), dtype=torch.float64, device=self.config.device)
        # float64: a sum over hundreds of summed batch losses, and step numbers, both exact.
        self.loss_sum, self.last_loss, self.bad_mark, self.bad_loss = zero, zero, zero, zero

    def add(self, loss: torch.Tensor, step: int, images: int, skipped: int) -> None:
        loss = loss.detach().to(torch.float64)
        # bad_mark is step + 1 of the first non-finite loss, 0 while there is none; torch.where keeps it on the device.
        first = ~torch.isfinite(loss) & (self.bad_mark == 0)
        self.bad_mark = torch.where(first, step + 1, self.bad_mark)
        self.bad_loss = torch.where(first, loss, self.bad_loss)
        self.loss_sum = self.loss_sum + loss
        self.last_loss = loss
        self.steps += 1
        self.images += images
        self.skipped += skipped

    def read(self, stop: bool) -> Readback:
        """The tally over all ranks (``stop``: this rank's request), then a fresh tally."""
        config, world = self.config, self.config.world_size
        counts = torch.tensor([self.images, self.skipped, float(stop)], dtype=torch.float64)
        # Each rank writes its first bad step and that loss in its own slots: a sum over ranks then gathers them.
        slots = torch.zeros(2 * world, dtype=torch.float64, device=config.device)
        slots[config.rank] = self.bad_mark
        slots[world + config.rank] = self.bad_loss
        packed = torch.cat([torch.stack([self.loss_sum, self.last_loss]), counts.to(config.device), slots])
        if world > 1:
            packed = dist_utils.all_reduce_sum(packed)
        values = packed.tolist()  # the one host read of the read-back
        marks = values[5:5 + world]
        bad = [(mark, values[5 + world + rank]) for rank, mark in enumerate(marks) if mark > 0]
        first_bad = min(bad) if bad else None
        readback = Readback(loss_sum=values[0], last_loss=values[1], steps=self.steps, images=round(values[2]),
                            skipped=round(values[3]), stop=values[4] > 0,
                            first_bad_step=round(first_bad[0]) - 1 if first_bad else None,
                            bad_loss=first_bad[1] if first_bad else 0.0)
        self._reset()
        return readback


def train_one_epoch(state: Any, loader: Iterable, criterion: nn.Module, config: StepConfig, *,
                    on_step: Optional[Callable[[dict[str, Any]], None]] = None,
                    stop_requested: Optional[Callable[[], bool]] = None) -> dict[str, Any]:
    """Trains ``state`` (a :class:`asl.training.state.TrainState`) for one epoch, from step ``state.step`` of
    ``state.epoch``; ``loader`` yields the batches from that step on. ``state.step`` advances with every step.

    One step is exactly the original's: ``with autocast: out = model(x).float()``; ``loss = criterion(out, y)``
    (fp32, summed); ``scaler.scale(loss).backward()``; ``scaler.step(optimizer)``; ``scaler.update()``;
    ``scheduler.step()``; ``ema.update(model)``. ``on_step`` gets ``epoch, step, steps, loss, lr, images,
    images_per_sec`` after each step; ``loss`` (the global batch's summed loss) is a number at read-back steps (see
    :meth:`StepConfig.reads_back`) and None at the others, ``images`` is exact at read-back steps and, between them
    under torchrun, this rank's count times the processes. ``stop_requested`` is polled after every step (under
    torchrun: at read-back steps, by all ranks together); when it is True the epoch ends with ``interrupted=True``.

    Returns ``loss`` (mean over the epoch's steps, those before a resume included), ``steps`` (done in this call),
    ``images`` (global count), ``images_per_sec``, ``skipped`` (unreadable images dropped, all ranks), ``lr``,
    ``interrupted``. A NaN or infinite loss (on any rank) raises :class:`NonFiniteLossError` at the next read-back
    step, naming the first bad step; ``state.loss_sum`` and ``state.loss_steps`` then stay as they were at the
    last good read-back, and the caller must save nothing of ``state`` (its weights may have taken bad steps).
    """
    state.forward_model.train()
    num_steps = len(loader) + state.step if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    if config.max_steps is not None:
        num_steps = min(num_steps, config.max_steps) if num_steps is not None else config.max_steps
    tally = _Tally(config)
    images = skipped = steps = 0  # global counts, as read back
    interrupted = False
    start_time = time.perf_counter()
    for step, batch in enumerate(loader, start=state.step):
        if num_steps is not None and step >= num_steps:
            break
        last = num_steps is not None and step == num_steps - 1
        result = _train_step(state, batch, criterion, config, step, tally,
                             config.reads_back(step, last), stop_requested)
        state.step = step + 1
        steps += 1
        loss = None
        if result.readback is not None:
            images, skipped = _take(state, result.readback, images, skipped)
            loss = result.readback.last_loss
        if on_step is not None:
            elapsed = time.perf_counter() - start_time
            seen = images + tally.images * config.world_size
            on_step({"epoch": state.epoch, "step": step, "steps": num_steps, "loss": loss,
                     "lr": _current_lr(state.optimizer), "images": seen,
                     "images_per_sec": seen / elapsed if elapsed > 0 else 0.0})
        if result.stop:
            interrupted = True
            break
    if tally.steps:  # steps after the last read-back: a loader without a length, or a stop between read-backs
        images, skipped = _take(state, _checked(tally.read(stop=False), state), images, skipped)
    elapsed = time.perf_counter() - start_time
    # The epoch's mean loss, over the steps run before a mid-epoch resume too.
    return {"loss": state.loss_sum / state.loss_steps if state.loss_steps else float("nan"),
            "steps": steps, "images": images, "images_per_sec": images / elapsed if elapsed > 0 else 0.0,
            "skipped": skipped, "lr": _current_lr(state.optimizer), "interrupted": interrupted}


def _take(state: Any, readback: Readback, images: int, skipped: int) -> tuple[int, int]:
    """Adds a read-back to the epoch's loss (kept on ``state``, for a resume) and returns the epoch's image and
    skipped-image counts with it."""
    state.loss_sum += readback.loss_sum
    state.loss_steps += readback.steps
    return images + readback.images, skipped + readback.skipped


def _checked(readback: Readback, state: Any) -> Readback:
    if readback.first_bad_step is not None:
        state.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(state.epoch, readback.first_bad_step, readback.bad_loss)
    return readback


def _train_step(state: Any, batch: Any, criterion: nn.Module, config: StepConfig, step: int, tally: _Tally,
                read_back: bool, stop_requested: Optional[Callable[[], bool]]) -> StepResult:
    """One optimizer step. At a read-back step the tally is read after the backward pass and before the optimizer
    step, so a bad loss found there never reaches the weights; the other steps never wait for the device."""
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
    tally.add(local_loss, step, n_local, skipped)

    # The stop flag is this process's own (a signal handler's) and costs nothing to read; under torchrun all ranks
    # must agree on it, or the others would wait forever in the next collective: that happens at read-back steps.
    wants_stop = bool(stop_requested()) if stop_requested is not None else False
    readback = _checked(tally.read(wants_stop), state) if read_back else None
    stop = (readback is not None and readback.stop) if distributed else wants_stop

    if n_local > 0:
        if state.scaler is not None:
            # With fused Adam (CUDA) the scaler hands its overflow flag to the optimizer on the device; otherwise
            # torch reads the flag back here (docs/speed.md).
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
    return StepResult(readback=readback, stop=stop)
