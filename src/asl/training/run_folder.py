"""A training run's files in its output folder: ``last.pth`` (resume), ``model-highest.pth`` (the best weights,
in the model-zoo format), ``log.txt`` (one JSON object per epoch) and ``args.json``.

Only the main process writes; every write is atomic. No write follows a symbolic link: the files written whole are
renamed over their path (a link there is replaced, its target untouched), and ``log.txt``, appended to, is opened
with ``O_NOFOLLOW`` (a link there is refused in one line). Under ``torchrun`` every rank calls :meth:`save_last`,
which first makes all ranks' weights equal to rank 0's.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, ContextManager, Mapping, Optional

import torch

from .. import distributed as dist_utils
from ..atomic import atomic_write_text, stale_temporaries
from ..checkpoint import disk_full_reason, load_checkpoint, make_model_checkpoint, save_checkpoint
from ..errors import CheckpointError, TrainingDivergedError, UsageError
from .run_lock import NOFOLLOW, RunLock
from .state import TrainState

__all__ = ["RunFolder", "LAST", "HIGHEST", "describe_kept"]

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
        if resumed and self.is_main and os.path.islink(self.output_dir / "log.txt"):
            raise UsageError(_link_refused(self.output_dir / "log.txt"))
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
    def prepare(output_dir: Path, is_main: bool) -> ContextManager[Any]:
        """Creates the folder, checks that it is writable and locks it for this run (on the main process; every
        rank learns the answer). Returns the lock, to be held for the run's life (a ``with`` block); other ranks
        get an empty one. A folder in use by another run is refused (:class:`UsageError`, naming that run)."""
        problem, lock = None, None
        if is_main:
            try:
                output_dir.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=output_dir, prefix=".write-test-"):
                    pass
                # Locked before the clean-up below: another run's save in progress looks just like a stale file.
                lock = RunLock.acquire(output_dir)
                # Left by a save that was killed (SIGKILL, power loss); each can be as large as last.pth.
                for stale in [*stale_temporaries(output_dir, LAST), *stale_temporaries(output_dir, HIGHEST)]:
                    stale.unlink()
                    logger.info("removed %s, left by an interrupted save", stale)
            except UsageError as exc:
                problem = str(exc)
            except OSError as exc:
                problem = f"output directory is not writable: {output_dir} ({_why_not_a_folder(output_dir, exc)})"
        problem = dist_utils.broadcast_object(problem)
        if problem:
            if lock is not None:
                lock.release()
            raise UsageError(problem)
        return lock if lock is not None else contextlib.nullcontext()

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
        if os.path.isdir(resume):
            raise UsageError(f"--resume {resume} is a folder; give its {LAST}, or --resume auto with --output-dir "
                             f"{resume}")
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
        """Refuses to start when the folder cannot hold this run's checkpoints: found out now rather than after
        the first epoch."""
        if not self.is_main:
            return
        model = sum(t.numel() * t.element_size() for t in state.model.state_dict().values())
        last = 2 * model + 2 * sum(p.numel() * p.element_size() for p in state.model.parameters())  # EMA, Adam
        # The peak: model-highest.pth, and last.pth with its new copy beside it until the copy replaces it. Files
        # already there (an earlier run's, or the one resumed) get replaced, so their space counts as available,
        # except that a new last.pth is always written beside the old one first.
        present = sum(path.stat().st_size for path in (self.last_path, self.output_dir / HIGHEST) if path.is_file())
        needed = max(2 * last + model - present, last) + _SPACE_MARGIN
        free = shutil.disk_usage(self.output_dir).free
        if free < needed:
            need_mib, free_mib = _two_sizes(needed, free)
            raise UsageError(f"no space left for checkpoints in {self.output_dir}: about {need_mib} MiB needed "
                             f"(last.pth, its new copy while it replaces it, and model-highest.pth), {free_mib} "
                             f"MiB free")

    def write_args(self, args: Mapping[str, Any]) -> None:
        self.write_text("args.json", json.dumps(dict(args), indent=2) + "\n")

    def save_last(self, state: TrainState, synced: bool = False) -> None:
        """``last.pth`` at the state's position. ``synced``: the ranks' weights were just made identical (right
        after evaluation), so the broadcast is skipped. Refuses (:class:`TrainingDivergedError`) to replace a good
        file with non-finite weights. A failed save (a full disk) leaves the previous file as it was, and says
        what the user still has."""
        if not synced:
            dist_utils.broadcast_module_state(state.model)
            if state.ema is not None:
                dist_utils.broadcast_module_state(state.ema.module)
        self.check_finite(state.model.state_dict(), f"epoch {state.epoch}, step {state.step}")
        snapshot = state.state_dict()  # on every rank: the class prior's sum is gathered from all of them
        if self.is_main:
            try:
                save_checkpoint({**snapshot, **self.meta}, self.last_path)
            except CheckpointError as exc:
                raise CheckpointError(f"{exc}; {describe_kept(self.kept(), resume_hint=True)}") from exc
        self._last_is_ours = True

    def write_text(self, name: str, text: str) -> None:
        """A small file of the run written whole (``args.json``, ``prior.csv``), by the main process, atomically:
        renamed over its path, so a symbolic link there is replaced, never written through."""
        if self.is_main:
            path = self.output_dir / name
            try:
                atomic_write_text(path, text)
            except OSError as exc:
                raise _write_error(path, exc) from None

    def save_best(self, weights: Mapping[str, Any], which: str, score: float, epoch: int) -> None:
        """``model-highest.pth``: the weights that scored (``which`` is 'ema' or 'regular')."""
        self.check_finite(weights, f"epoch {epoch}")
        if not self.is_main:
            return
        meta = {k: v for k, v in self.meta.items() if k not in ("num_classes", "idx_to_class", "steps_per_epoch")}
        try:
            save_checkpoint(make_model_checkpoint(weights, self.meta["num_classes"], self.meta["idx_to_class"],
                                                  weights=which, mAP=score, epoch=epoch, **meta),
                            self.output_dir / HIGHEST)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc}; {describe_kept(self.kept(), resume_hint=True)}") from exc

    def check_finite(self, weights: Mapping[str, Any], where: str) -> None:
        counts = [(~torch.isfinite(v)).sum() for v in weights.values()
                  if isinstance(v, torch.Tensor) and v.is_floating_point()]
        broken = int(torch.stack(counts).sum()) if counts else 0  # one read-back for the whole model
        if broken:
            raise TrainingDivergedError(f"{broken} weights are NaN or infinite at {where}: training diverged (try a "
                                        f"lower --lr); {describe_kept(self.kept())}")

    def kept(self) -> Optional[Path]:
        """This run's last good checkpoint (its ``last.pth``), or None when it wrote none yet."""
        return self.last_path if self._last_is_ours and self.last_path.is_file() else None

    def log_epoch(self, record: Mapping[str, Any]) -> None:
        if not self.is_main:
            return
        path = self.output_dir / "log.txt"
        data = memoryview((json.dumps(dict(record)) + "\n").encode("utf-8"))
        try:
            if not NOFOLLOW and os.path.islink(path):
                raise UsageError(_link_refused(path))
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NOFOLLOW, 0o644)
            try:
                start = os.lseek(fd, 0, os.SEEK_END)
                try:
                    while data:  # a full disk first writes part of the line, then fails
                        data = data[os.write(fd, data):]
                except OSError:
                    # A line cut short would stay in the log: take back what part of it got in.
                    try:
                        os.ftruncate(fd, start)
                    except OSError:
                        pass
                    raise
            finally:
                os.close(fd)
        except OSError as exc:
            if os.path.islink(path):
                raise UsageError(_link_refused(path)) from None
            raise _write_error(path, exc) from None


def _link_refused(path: Path) -> str:
    return f"{path} is a symbolic link: the run does not write through links (remove it, or choose another " \
           f"--output-dir)"


def describe_kept(last: Optional[Path], resume_hint: bool = False) -> str:
    """What the user still has, for messages about a diverged run or a failed save (``last``: see
    :meth:`RunFolder.kept`); ``resume_hint``: say how to continue once the cause is fixed."""
    if last is None:
        return "no checkpoint was written yet"
    return f"{last} holds the last good state" + (" (once there is room, continue with --resume auto)"
                                                    if resume_hint else "")


#: beyond the tensors: the checkpoints' other entries and zip records, log.txt and args.json
_SPACE_MARGIN = 16 * 2**20


def _two_sizes(needed: int, free: int) -> tuple[str, str]:
    """Both sizes in MiB, needed rounded up and free down, with as many decimals as it takes to tell them apart."""
    for decimals in range(4):
        scale = 10 ** decimals / 2**20
        a, b = math.ceil(needed * scale), math.floor(free * scale)
        if a != b:
            break
    return f"{a / 10 ** decimals:.{decimals}f}", f"{b / 10 ** decimals:.{decimals}f}"


def _why_not_a_folder(output_dir: Path, exc: OSError) -> str:
    """Why ``output_dir`` could not be made or written: the file in its way when there is one ("File exists" or
    "Not a directory" would leave the user guessing which), else the system's reason."""
    for path in (output_dir, *output_dir.parents):
        if os.path.lexists(path):
            if not os.path.isdir(path):
                return f"{path} is {'a file' if os.path.exists(path) else 'a broken symbolic link'}, not a folder"
            break
    return exc.strerror or str(exc)


def _write_error(path: Path, exc: OSError) -> UsageError:
    """One line for a failed write of a run's small files (log.txt, args.json)."""
    full = disk_full_reason(exc)
    if full:
        return UsageError(f"{full}: could not write {path.name} in {path.parent}")
    return UsageError(f"could not write {path}: {exc.strerror or exc}")
