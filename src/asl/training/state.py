"""Everything a training run carries from step to step, and what makes it resumable bit for bit.

:class:`TrainState` holds the model, its EMA, the optimizer, the schedule, the AMP scaler and the position
(``epoch``, ``step`` = the next step to run, the best score so far); ``state_dict()`` / ``load_state_dict()`` are
what ``last.pth`` stores. :func:`create_train_state` builds the paper's recipe around a model.
"""
from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..data.shards_source import is_remote_data
from .ema import ModelEma
from .step import create_optimizer
from ..errors import UsageError

__all__ = ["TrainState", "create_train_state", "check_resume_compatible", "SCHEDULE_FLAGS", "rng_state",
           "set_rng_state", "data_fingerprint", "check_same_data"]

#: flags that define the model or the learning-rate schedule: a resumed run must use the checkpoint's values.
SCHEDULE_FLAGS = ("dataset", "train_split", "model_name", "bottleneck_head", "num_classes", "image_size",
                  "batch_size", "lr", "epochs", "max_steps_per_epoch", "weight_decay", "ema_decay", "gamma_neg",
                  "gamma_pos", "clip", "unannotated", "difficult", "seed", "head", "num_of_groups", "decoder_embedding",
                  "partial_loss_mode", "gamma_unann", "alpha_pos", "alpha_neg", "alpha_unann", "likelihood_topk",
                  "prior_threshold", "simulate_partial")


@dataclass
class TrainState:
    """The run's state. ``train_model`` is what the forward runs (a DDP or compiled wrapper of ``model``, or None
    for ``model`` itself); it is not saved, the plain ``model`` is."""

    model: nn.Module
    ema: Optional[ModelEma]
    optimizer: torch.optim.Optimizer
    scheduler: Optional[Any] = None
    scaler: Optional[torch.amp.GradScaler] = None
    epoch: int = 0
    step: int = 0
    highest: float = 0.0
    #: the current epoch's summed step losses and step count, kept across a mid-epoch resume for log.txt
    loss_sum: float = 0.0
    loss_steps: int = 0
    train_model: Optional[nn.Module] = None
    #: with --partial-loss-mode, the class prior's running estimate (asl.class_prior.PriorEstimate); saved too
    prior: Optional[Any] = None

    @property
    def forward_model(self) -> nn.Module:
        return self.train_model if self.train_model is not None else self.model

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "epoch": self.epoch, "step": self.step, "highest_mAP": self.highest, "rng": rng_state(),
                "epoch_loss": {"sum": self.loss_sum, "steps": self.loss_steps},
                "class_prior": self.prior.state_dict() if self.prior is not None else None}

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Everything, counters and random states included: a resumed run continues exactly."""
        self.model.load_state_dict(saved["model"])
        if self.ema is not None:
            self.ema.load_state_dict(saved["ema"])
        # The saved groups carry the implementation flags of the device that wrote them (fused Adam on CUDA); this
        # run keeps its own, chosen for its device.
        implementation = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(saved["optimizer"])
        for group, flags in zip(self.optimizer.param_groups, implementation):
            group.update(flags)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(saved["scheduler"])
        # The scaler's state is empty when it was saved disabled (CPU, bfloat16).
        if self.scaler is not None and (saved["scaler"] or not self.scaler.is_enabled()):
            self.scaler.load_state_dict(saved["scaler"])
        self.epoch, self.step = int(saved["epoch"]), int(saved["step"])
        self.highest = float(saved.get("highest_mAP", 0.0))
        running = saved.get("epoch_loss", {"sum": 0.0, "steps": 0})
        self.loss_sum, self.loss_steps = float(running["sum"]), int(running["steps"])
        set_rng_state(saved["rng"])
        if self.prior is not None and saved.get("class_prior") is not None:
            self.prior.load_state_dict(saved["class_prior"])


def create_train_state(model: nn.Module, *, lr: float, weight_decay: float, ema_decay: float, epochs: int,
                       steps_per_epoch: int, amp_dtype: Optional[torch.dtype], device: torch.device) -> TrainState:
    """The original recipe around ``model`` (already on ``device``): Adam with L2 on weights only, OneCycleLR,
    a GradScaler for fp16, and an EMA that starts from the model."""
    # Fused Adam on CUDA: fewer kernels, and it takes GradScaler's overflow flag without a read-back (docs/speed.md).
    optimizer = create_optimizer(model, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")
    # original: OneCycleLR(max_lr=lr, steps_per_epoch=len(train_loader), epochs=80, pct_start=0.2), stepped
    # every iteration; the run stops after --stop-epoch but the schedule keeps its full length.
    pct_start = 0.2
    if pct_start * steps_per_epoch * epochs - 1 == 0:
        # OneCycleLR divides by the length of its warm-up phase, pct_start * total - 1 steps: zero for a schedule of
        # exactly 5 steps ("float division by zero"). A nudge too small to change any other step avoids it.
        pct_start += 1e-9
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, steps_per_epoch=steps_per_epoch,
                                                    epochs=epochs, pct_start=pct_start)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return TrainState(model=model, ema=ModelEma(model, ema_decay), optimizer=optimizer, scheduler=scheduler,
                      scaler=scaler)


def check_resume_compatible(saved_args: Mapping[str, Any], args: Any, path: str,
                            flags: Sequence[str] = SCHEDULE_FLAGS) -> None:
    for key in flags:
        if key in saved_args and saved_args[key] != getattr(args, key):
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"--resume {path}: it was trained with {flag} {saved_args[key]!r} but this run has "
                             f"{flag} {getattr(args, key)!r}; flags defining the model or schedule must match "
                             f"(start a new --output-dir to train differently)")


def data_fingerprint(root: str, split: str, dataset: Any) -> dict[str, Any]:
    """What identifies the training data of a run: its folder, split, image count and class names."""
    names = "\n".join(dataset.classes).encode("utf-8")
    where = root if is_remote_data(root) else os.path.abspath(root)
    return {"root": where, "split": split, "images": len(dataset),
            "classes_sha256": hashlib.sha256(names).hexdigest()}


def check_same_data(saved: Optional[Mapping[str, Any]], current: Mapping[str, Any], path: str, force: bool) -> None:
    """A resumed run must train on the data it started with (the same counts alone could hide another folder)."""
    if saved is None or force:
        return
    differs = [key for key in current if saved.get(key) != current[key]]  # the keys of data_fingerprint
    if differs:
        what = ", ".join(f"{k} {saved.get(k)!r} then, {current[k]!r} now" for k in differs if k != "classes_sha256")
        if "classes_sha256" in differs:
            what = (what + ", " if what else "") + "other class names"
        raise UsageError(f"--resume {path}: the training data differs from the run's ({what}); pass --force-resume "
                         f"if that is intended")


def rng_state() -> dict[str, Any]:
    """Global RNG states (nothing in the recipe draws from them after set-up, but user code may)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
