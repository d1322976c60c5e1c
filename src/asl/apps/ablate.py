"""``ablate.py``: the paper's loss comparison (CE, focal, ASL and a gamma_neg sweep) with train.py's recipe.

    python ablate.py --output-dir runs/ablation                      # CPU, generated skewed data, minutes
    python ablate.py --output-dir runs/coco -- /data/coco --model-path tresnet_m_21k.pth --image-size 224
    python ablate.py --variants ce:0,0,0 focal:2,2,0 --gamma-neg-sweep 0 1 2 3 4 -- /data/coco ...
    python ablate.py --output-dir runs/oi -- OI-SHARDS --dataset webdataset --train-split train --val-split test

Everything after ``--`` is passed to train.py for every variant, which adds ``--gamma-neg/--gamma-pos/--clip``,
``--output-dir DIR/runs/NAME`` and ``--resume auto``; any data train.py reads works, shards.py's shards
(``--dataset webdataset``, a folder, URL or ``pipe:`` command: Datasets.md) included. Without it the built-in CPU
recipe runs on a generated set whose class frequencies are as skewed as MS-COCO's (see :data:`CPU_RECIPE`). The
variants run one after another; a killed or interrupted ablation continues where it stopped when the same command
runs again, and never trains a finished variant twice. ``DIR/results.md`` (the table), ``DIR/results.json`` and
``DIR/map_vs_gamma_neg.png`` are rewritten after every variant.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from asl.apps.ablate_variants import (DEFAULT_VARIANTS, RunStatus, Variant, best_epoch, check_unique, parse_variant,
                          partial_variants, plot_map_vs_gamma_neg, read_log, read_variants_file, results_table,
                          sweep)
from asl.apps.partial_options import simulation_arg
from asl.atomic import atomic_write_text
from asl.cli import ArgumentParser, run_main, setup_logging
from asl.errors import UsageError

from . import train as train_app

logger = logging.getLogger("ablate")

#: The CPU ablation: 640 generated pictures of 30 classes whose frequencies fall off as 1/rank (the most common 25
#: times the rarest, 3 labels per picture), 20 epochs of train.py's recipe at 64 px with a peak learning rate of
#: 2e-3 (a short run from scratch, as in `make demo`). The network is timm's ResNet-10-T (5 M parameters), the
#: same for every variant: TResNet-M (29 M) gets through 3 epochs in the same time, reaches about 21 mAP and leaves
#: the losses within noise of each other. About 100 s per variant on 2 cores.
CPU_DATA = {"num_train": 640, "num_val": 256, "synthetic_classes": 30, "skew": 1}
CPU_RECIPE = ["--model-name", "timm/resnet10t", "--model-path", "", "--image-size", "64", "-b", "16", "-j", "2",
              "--lr", "2e-3", "--epochs", "20", "--stop-epoch", "19", "--ema-decay", "0.97", "--print-freq", "20",
              "--seed", "0"]
# ablate sets these for each variant.
_OWNED_FLAGS = ("--gamma-neg", "--gamma-pos", "--clip", "--output-dir", "--resume")
# and these too in the partial-label comparison (--partial)
_OWNED_PARTIAL_FLAGS = ("--partial-loss-mode", "--gamma-unann", "--likelihood-topk", "--prior-threshold",
                        "--prior-path", "--simulate-partial", "--simulate-partial-type", "--simulate-partial-param")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="ablate.py", usage="%(prog)s [options] [-- TRAIN.PY ARGUMENTS]",
                       description="Compare losses (CE, focal, ASL) with train.py's recipe.",
                       epilog="Arguments after -- go to train.py for every variant (default: the CPU recipe on "
                              "generated skewed data).")
    p.add_argument("--output-dir", type=str, default="ablation", help="runs/, results.md and the plot go here")
    p.add_argument("--variants", type=str, nargs="+", default=None, metavar="NAME:GN,GP,CLIP",
                   help="loss variants, e.g. ce:0,0,0 focal:2,2,0 asl:4,1,0.05 (none of these three flags: the "
                        "paper's set, see docs/usage.md)")
    p.add_argument("--variants-file", type=str, default=None, help="one NAME:GN,GP,CLIP per line")
    p.add_argument("--gamma-neg-sweep", type=float, nargs="+", default=None, metavar="GN",
                   help="add one ASL variant per gamma_neg, at --sweep-gamma-pos and --sweep-clip")
    p.add_argument("--sweep-gamma-pos", type=float, default=0.0)
    p.add_argument("--sweep-clip", type=float, default=0.05)
    p.add_argument("--partial", type=simulation_arg, default=None, metavar="fpc:N|rps:P",
                   help="instead: CSL's partial-label comparison (ignore, negative, selective) on training labels "
                        "hidden by this simulation")
    p.add_argument("--keep-last", action="store_true",
                   help="keep the last.pth of finished variants (removed by default: 4x a model's size each)")
    p.add_argument("--dry-run", action="store_true", help="print each variant's train.py command; train nothing")
    p.add_argument("--verbose", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit code: 0 (done or cleanly interrupted), 2 for bad input (one line), 1 for a bug, or train.py's code."""
    return run_main(run, argv, prog="ablate.py")


def run(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, train_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = build_parser().parse_args(own)
    setup_logging(args.verbose)
    out = Path(args.output_dir)
    variants = choose_variants(args, out)
    generated = not train_args
    if generated:
        train_args = cpu_train_args(out)
    check_train_args(train_args, _OWNED_FLAGS + (_OWNED_PARTIAL_FLAGS if args.partial else ()))
    plan = [(v, out / "runs" / v.name, train_args + v.train_flags() + ["--output-dir", str(out / "runs" / v.name),
                                                                        "--resume", "auto"]) for v in variants]
    if args.dry_run:
        for _, _, command in plan:
            print("python train.py " + shlex.join(command))
        return 0
    check_output_dir(out)
    notes = describe(train_args, generated) + (partial_notes(args.partial, generated) if args.partial else [])
    try:
        for number, (variant, run_dir, command) in enumerate(plan, start=1):
            code, finished = run_variant(number, len(plan), variant, run_dir, command, args.keep_last)
            write_results(out, plan, notes, partial=args.partial is not None)
            if code != 0:
                return code
            if not finished:
                print(f"ablate.py: interrupted during {variant.name}; run the same command again to continue",
                      flush=True)
                return 0
    except KeyboardInterrupt:
        print("ablate.py: interrupted; run the same command again to continue", file=sys.stderr, flush=True)
        return 130
    plot = "" if args.partial else f", plot: {out / 'map_vs_gamma_neg.png'}"
    print(f"\nresults: {out / 'results.md'}{plot}", flush=True)
    print((out / "results.md").read_text(), flush=True)
    return 0


def choose_variants(args, out: Path) -> list[Variant]:
    if args.partial:
        if args.variants or args.variants_file or args.gamma_neg_sweep:
            raise UsageError("--partial runs CSL's three variants (ignore, negative, selective): leave out "
                             "--variants, --variants-file and --gamma-neg-sweep")
        return partial_variants(args.partial, out / "runs" / "ignore" / "prior.csv")
    variants = [parse_variant(v) for v in args.variants or []]
    if args.variants_file:
        listed = read_variants_file(args.variants_file)
        if not listed:
            raise UsageError(f"the variants file {args.variants_file} lists no variant (NAME:GN,GP,CLIP per line)")
        variants += listed
    if args.gamma_neg_sweep:
        variants += sweep(args.gamma_neg_sweep, args.sweep_gamma_pos, args.sweep_clip)
    variants = variants or list(DEFAULT_VARIANTS)
    check_unique(variants)
    unique: dict[str, Variant] = {}
    for v in variants:
        unique.setdefault(v.name, v)
    return list(unique.values())


def check_output_dir(out: Path) -> None:
    try:
        (out / "runs").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the output folder {out / 'runs'}: {exc.strerror or exc}") from None
    if not os.access(out / "runs", os.W_OK | os.X_OK):
        raise UsageError(f"the output folder {out / 'runs'} is not writable")


def cpu_train_args(out: Path) -> list[str]:
    data = [f"--dataset-option={key}={value}" for key, value in CPU_DATA.items()]
    return [str(out / "data"), "--dataset", "synthetic", *data, "--cache-dir", str(out / "cache"), *CPU_RECIPE]


def check_train_args(train_args: list[str], owned: Sequence[str] = _OWNED_FLAGS) -> None:
    for token in train_args:
        flag = token.split("=", 1)[0].replace("_", "-")
        if flag in owned:
            raise UsageError(f"{token.split('=', 1)[0]} is set by ablate.py for each variant; leave it out of the "
                             f"train.py arguments (use --variants and --output-dir)")
    # train.py's own parser, so that a mistyped flag fails now rather than at the first variant.
    train_app.build_parser().parse_args(train_args)


def describe(train_args: list[str], generated: bool) -> list[str]:
    if generated:
        data = (f"Data: generated skewed shapes (`--dataset synthetic`, {CPU_DATA['synthetic_classes']} classes, "
                f"class frequency ~ 1/rank, {CPU_DATA['num_train']} training and {CPU_DATA['num_val']} validation "
                f"pictures of 64 px, about 3 labels per picture).")
    else:
        data = "Data: as given to train.py below."
    return [data, "", f"Recipe, the same for every variant: `train.py {shlex.join(train_args)}`", "",
            "best mAP: train.py's highest_mAP (the better of the regular and the EMA model, over the epochs run); "
            "time: training and evaluation of the variant, all its sessions added up (a session killed outright "
            "counts up to the last progress it kept)."]


def partial_notes(simulation: str, generated: bool) -> list[str]:
    """What the partial-label table compares, and how far it is from CSL's own runs."""
    notes = ["", f"Partial labels: the training labels are hidden by `--simulate-partial {simulation}` (the same "
                 f"draw for every variant; the validation labels stay complete). ignore and negative train with "
                 f"cross-entropy; selective with CSL's loss and the class prior that the ignore run estimated "
                 f"(its prior.csv), as CSL's README describes."]
    if generated:
        notes.append("Scale: generated pictures, a small network and 20 short epochs, not CSL's MS-COCO runs "
                     "(TResNet-M, 448 px; FPC 1000: 83.44 selective vs 76.46 ignore, RPS 0.5: 85.21 vs 84.90). "
                     "The figures here show that the three modes run and how they rank on this data, nothing more.")
    return notes


def run_variant(number: int, total: int, variant: Variant, run_dir: Path, command: list[str],
                keep_last: bool) -> tuple[int, bool]:
    """Trains one variant unless it finished earlier; returns train.py's exit code and whether it is finished."""
    status = RunStatus.read(run_dir)
    if status is not None and status.train_args != command:
        raise UsageError(f"{run_dir} was started with other train.py arguments; use another --output-dir or "
                         f"delete {run_dir}")
    if status is not None and status.finished:
        print(f"=== [{number}/{total}] {variant.name}: finished earlier, skipped", flush=True)
        return 0, True
    status = status or RunStatus(command)
    print(f"\n=== [{number}/{total}] {variant.name} ({variant.describe()})"
          + (" (continuing)" if status.seconds or status.started is not None else ""), flush=True)
    # A session killed outright left its start behind: its time is fixed now, from what it kept, before this one
    # records its own start, which is written before training so that a kill of this session is counted alike.
    status.seconds, status.started = status.total_seconds(run_dir), time.time()
    with _results_disk(run_dir):
        status.write(run_dir)
    start = time.perf_counter()
    code = train_app.main(command)
    status.seconds, status.started = status.seconds + time.perf_counter() - start, None
    status.finished = code == 0 and _finished(run_dir, command)
    with _results_disk(run_dir):
        status.write(run_dir)
    if status.finished and not keep_last:
        # The resume state (weights, EMA, optimizer) of a run that will not be resumed; model-highest.pth stays.
        (run_dir / "last.pth").unlink(missing_ok=True)
    return code, status.finished


def _finished(run_dir: Path, command: list[str]) -> bool:
    """Whether log.txt holds the run's last epoch (an interrupted run returns 0 too)."""
    args = train_app.build_parser().parse_args(command)
    epochs = [r["epoch"] for r in read_log(run_dir / "log.txt")]
    return bool(epochs) and max(epochs) >= min(args.epochs - 1, args.stop_epoch)


def write_results(out: Path, plan, notes: list[str], partial: bool = False) -> None:
    rows: list[dict[str, Any]] = []
    for variant, run_dir, _ in plan:
        status = RunStatus.read(run_dir)
        best = best_epoch(run_dir / "log.txt") if status is not None and status.finished else None
        rows.append({"variant": variant, "mAP": best["mAP"] if best else None,
                     "epoch": best["epoch"] if best else None,
                     "seconds": status.total_seconds(run_dir) if status else 0.0})
    with _results_disk(out):
        atomic_write_text(out / "results.md", results_table(
            rows, notes, "Partial-label ablation (CSL)" if partial else "Loss ablation"))
        atomic_write_text(out / "results.json", json.dumps(
            [{"name": r["variant"].name, "gamma_neg": r["variant"].gamma_neg, "gamma_pos": r["variant"].gamma_pos,
              "clip": r["variant"].clip, "flags": list(r["variant"].extra), "best_mAP": r["mAP"],
              "best_epoch": r["epoch"], "seconds": r["seconds"]} for r in rows], indent=1) + "\n")
        if not partial:  # the three partial-label modes are no gamma_neg sweep
            plot_map_vs_gamma_neg(rows, out / "map_vs_gamma_neg.png", "Loss ablation: best mAP against gamma_neg")


#: errno -> what the one-line message says and what to do; any other OSError is unexpected and keeps its traceback.
_FULL_OR_READ_ONLY = {
    errno.ENOSPC: ("disk full", "make room and run the same command again"),
    errno.EDQUOT: ("disk full (quota exceeded)", "make room and run the same command again"),
    errno.EROFS: ("read-only file system", "make it writable, or copy the folder to a writable place, and run the "
                                           "same command again"),
}


@contextlib.contextmanager
def _results_disk(folder: Path) -> Iterator[None]:
    """A full or read-only disk while ablate writes its own files (results, plot, a run's ablate.json) is bad input,
    not a bug: every such write is atomic, so the trained runs and the files written before stay intact, and the
    same command continues once it can write."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _FULL_OR_READ_ONLY:
            raise
        what, remedy = _FULL_OR_READ_ONLY[exc.errno]
        raise UsageError(f"cannot write in {folder}: {what}; the trained runs are intact: {remedy}") from None


if __name__ == "__main__":
    sys.exit(main())
