"""A training run's files in its output folder: ``last.pth`` (resume), ``model-highest.pth`` (the best weights,
in the model-zoo format), ``log.txt`` (one JSON object per epoch) and ``args.json``.

Only the main process writes; every write is atomic. Under ``torchrun`` every rank calls :meth:`save_last`,
which first makes all ranks' weights equal to rank 0's.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .. import distributed as dist_utils
from ..atomic import atomic_write_text
from ..checkpoint import load_checkpoint, make_model_checkpoint, save_checkpoint
from ..errors import TrainingDivergedError, UsageError
from .state import TrainState

__all__ = ["RunFolder", "LAST", "HIGHEST"]

logger = logging.getLogger(__name__)

LAST = "last.pth"
HIGHEST = "model-highest.pth"
#: what a last.pth must hold to resume exactly.
RESUME_KEYS = ("model", "ema", "optimizer", "scheduler", "scaler", "epoch", "step", "rng", "args", "steps_per_epoch")


class RunFolder:
    """Writes the run's files. ``meta`` goes into both checkpoints: ``num_classes``, ``idx_to_class``,
    ``model_name``, ``image_size``, ``bottleneck_head``, ``args`` (a plain dict), ``steps_per_epoch``."""

    def __init__(self, output_dir: Path, is_main: bool, meta: Mapping[str, Any]) -> None:
        self.output_dir = Path(output_dir)
        self.is_main = is_main
        self.meta = dict(meta)
        # Whether last.pth belongs to this run (written by it, or the file it resumed from): an earlier run's
        # file in the same folder is no "last good state" of this one.
        self._last_is_ours = False

    def begin(self, resumed: bool, args: Mapping[str, Any]) -> None:
        """Writes args.json. A resumed run appends to its log; a new run in the folder of an earlier one starts a
        new log.txt (the earlier run's last.pth and model-highest.pth are replaced at this run's first save)."""
        self._last_is_ours = resumed
        if not resumed and self.is_main:
            if self.last_path.is_file() or (self.output_dir / "log.txt").is_file():
                logger.warning("%s holds an earlier run: this new run replaces it (--resume auto would continue "
                               "it)", self.output_dir)
            (self.output_dir / "log.txt").unlink(missing_ok=True)
        self.write_args(args)

    @property
    def last_path(self) -> Path:
        return self.output_dir / LAST

    @staticmethod
    def prepare(output_dir: Path, is_main: bool) -> None:
        """Creates the folder and checks that it is writable (on the main process; every rank learns the answer)."""
        problem = None
        if is_main:
            try:
                output_dir.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-"):
                    pass
                # Left by a save that was killed (SIGKILL, power loss); each can be as large as last.pth.
                for stale in [*output_dir.glob(f".{LAST}.*.tmp"), *output_dir.glob(f".{HIGHEST}.*.tmp")]:
                    stale.unlink()
                    logger.info("removed %s, left by an interrupted save", stale)
            except OSError as exc:
                problem = f"output directory is not writable: {output_dir} ({exc.strerror or exc})"
        problem = dist_utils.broadcast_object(problem)
        if problem:
            raise UsageError(problem)

    @staticmethod
    def find_resume(resume: str, output_dir: Path) -> Optional[str]:
        """``--resume``: '' (a new run), ``auto`` (``OUTPUT_DIR/last.pth`` when it exists) or a path."""
        if not resume:
            return None
        if resume == "auto":
            path = output_dir / LAST
            if not path.is_file():
                logger.info("--resume auto: no %s yet, starting a new run", path)
                return None
            return str(path)
        if not os.path.isfile(resume):
            raise UsageError(f"--resume: checkpoint not found: {resume}")
        return resume

    @staticmethod
    def load_resume(path: str) -> dict[str, Any]:
        saved = load_checkpoint(path)
        if "optimizer" not in saved or "args" not in saved:
            raise UsageError(f"--resume {path}: not a last.pth written by train.py (use --model-path for "
                             f"pretrained weights)")
        missing = [key for key in RESUME_KEYS if key not in saved]
        if missing:
            raise UsageError(f"--resume {path}: this last.pth lacks {', '.join(missing)}, so the run cannot continue "
                             f"exactly; start a new --output-dir (its weights can seed it through --model-path)")
        return saved

    def check_space(self, state: TrainState) -> None:
        """Refuses to start when the folder cannot hold ``last.pth`` (and its temporary copy while it is
        replaced): found out now rather than after the first epoch."""
        if not self.is_main:
            return
        size = 2 * sum(t.numel() * t.element_size() for t in state.model.state_dict().values())  # model + EMA
        size += 2 * sum(p.numel() * p.element_size() for p in state.model.parameters())  # Adam's two moments
        needed = 2 * size  # the new file is written beside the old one before it replaces it
        free = shutil.disk_usage(self.output_dir).free
        if free < needed:
            raise UsageError(f"no space left for checkpoints in {self.output_dir}: about {needed / 2**20:.0f} MiB "
                             f"needed for last.pth while it is replaced, {free / 2**20:.0f} MiB free")

    def write_args(self, args: Mapping[str, Any]) -> None:
        if self.is_main:
            atomic_write_text(self.output_dir / "args.json", json.dumps(dict(args), indent=2) + "\n")

    def save_last(self, state: TrainState, synced: bool = False) -> None:
        """``last.pth`` at the state's position. ``synced``: the ranks' weights were just made identical (right
        after evaluation), so the broadcast is skipped. Refuses (:class:`TrainingDivergedError`) to replace a good
        file with non-finite weights."""
        if not synced:
            dist_utils.broadcast_module_state(state.model)
            if state.ema is not None:
                dist_utils.broadcast_module_state(state.ema.module)
        self.check_finite(state.model.state_dict(), f"epoch {state.epoch}, step {state.step}")
        self._last_is_ours = True
        if self.is_main:
            save_checkpoint({**state.state_dict(), **self.meta}, self.last_path)

    def save_best(self, weights: Mapping[str, Any], which: str, score: float, epoch: int) -> None:
        """``model-highest.pth``: the weights that scored (``which`` is 'ema' or 'regular')."""
        self.check_finite(weights, f"epoch {epoch}")
        if not self.is_main:
            return
        meta = {k: v for k, v in self.meta.items() if k not in ("num_classes", "idx_to_class", "steps_per_epoch")}
        save_checkpoint(make_model_checkpoint(weights, self.meta["num_classes"], self.meta["idx_to_class"],
                                              weights=which, mAP=score, epoch=epoch, **meta),
                        self.output_dir / HIGHEST)

    def check_finite(self, weights: Mapping[str, Any], where: str) -> None:
        broken = sum(int((~torch.isfinite(v)).sum()) for v in weights.values()
                     if isinstance(v, torch.Tensor) and v.is_floating_point())
        if broken:
            raise TrainingDivergedError(f"{broken} weights are NaN or infinite at {where}: training diverged (try a "
                                        f"lower --lr); {self.kept()}")

    def kept(self) -> str:
        """What the user still has, for messages about a diverged run."""
        if self._last_is_ours and self.last_path.is_file():
            return f"{self.last_path} holds the last good state"
        return "no checkpoint was written yet"

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        if self.is_main:
            with open(self.output_dir / "log.txt", "a") as f:
                f.write(json.dumps(dict(record)) + "\n")
