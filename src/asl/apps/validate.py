"""Evaluate a checkpoint (official model-zoo file or ours, by path or URL) on a multi-label dataset.

    python validate.py /data/coco --model-name tresnet_l --model-path MS_COCO_TRresNet_L_448_86.6.pth
    python validate.py /data/coco --model_name=tresnet_l --model_path=https://.../MS_COCO_TRresNet_L_448_86.6.pth
    torchrun --nproc_per_node=8 validate.py /data/coco --model-path ...        # the same mAP, faster

Prints the original's progress lines (``Test: [i/N] ...`` and the cumulative ``P_C R_C F_C P_O R_O F_O`` at
``--thre``), the final `` * P_C ...`` line, the throughput, and last ``mAP score: X``. Datasets whose targets mark
labels as not annotated (-1: Open Images, VOC "difficult") are scored with the partial-label mAP.

``--save-thresholds FILE`` chooses a threshold per class on the evaluated set (:mod:`asl.evaluation.thresholds`),
``--thresholds FILE`` scores with such a file instead of ``--thre``, and ``--report DIR`` writes an evaluation
page with pictures (:mod:`asl.evaluation.report`).
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from asl import distributed as dist_utils
from asl.atomic import atomic_write_text
from asl.cli import ArgumentParser, check_writable, probability, run_main, setup_logging
from asl.data import canonical_name, create_dataset, create_loader, default_split
from asl.data.base import stop_loader_workers
from asl.data.shards_read import ShardDataset, create_shard_loader
from asl.evaluation.predictions import evaluate
from asl.errors import UsageError
from asl.models.loading import load_model
from asl.evaluation.metrics import (ThresholdMetrics, map_from_ap, partial_map_from_ap, per_class_ap,
                                    per_class_partial_ap, weighted_partial_map_from_ap)
from asl.precision import resolve_amp_dtype
from asl.sources import is_remote
from asl.evaluation.report import markdown_text, printable, write_report
from asl.evaluation.thresholds import (NEVER, check_unique_classes, load_thresholds, max_f1_thresholds,
                                       precision_thresholds, save_thresholds)

from .options import (MODEL_SOURCE_HELP, check_data, check_pixel_limit, data_options, dataset_options,
                      inference_options, model_options, runtime_options)
from .progress import BatchPrinter

logger = logging.getLogger("validate")
#: dataset options that validate.py sets from its own flags, beyond those every script sets
_SET_BY_VALIDATE = {"split": "--val-split"}
#: original: validate.py's --thre default
DEFAULT_THRE = 0.8

MAX_NAMED_SKIPPED = 20


def build_parser() -> ArgumentParser:
    parents = [data_options("--val-split", "default: val2014 for coco (see Datasets.md)"),
               model_options(MODEL_SOURCE_HELP, required=True),
               runtime_options(batch_size=32, workers=8, amp_dtype="none",
                               amp_help="opt-in autocast, on CUDA or the CPU (bfloat16 there); default fp32, "
                                        "as the original"),
               inference_options()]
    p = ArgumentParser(prog="validate.py", parents=parents,
                       description="Evaluate an ASL checkpoint: mAP and threshold metrics.")
    p.add_argument("--threshold", "--thre", "--th", dest="thre", type=probability, default=None, metavar="T",
                   help=f"threshold of the P_C/R_C/F_C/P_O/R_O/F_O metrics (default {DEFAULT_THRE})")
    p.add_argument("--save-thresholds", type=str, default=None, metavar="FILE",
                   help="choose a threshold per class on this set (max F1) and write them as JSON")
    p.add_argument("--threshold-precision", type=probability, default=None, metavar="P",
                   help="with --save-thresholds: the lowest threshold reaching precision P instead of max F1")
    p.add_argument("--report", type=str, default=None, metavar="DIR",
                   help="write DIR/README.md: per-class table, precision-recall curves, score histograms")
    p.add_argument("--output-json", type=str, default=None, help="write every metric, per-class AP included")
    p.add_argument("--per-class", action="store_true", help="print the per-class AP table")
    return p


def check_args(args) -> None:
    dataset_options(args.dataset_option, "validate.py", _SET_BY_VALIDATE)
    if args.thre is not None and args.thresholds:
        raise UsageError("--thre and --thresholds: give one or the other (--thresholds sets one per class)")
    if args.thre is None:
        args.thre = DEFAULT_THRE
    check_data(args.data, args.dataset)
    if args.threshold_precision is not None and not args.save_thresholds:
        raise UsageError("--threshold-precision chooses the thresholds of --save-thresholds FILE; give that too")
    if args.threshold_precision == 0:
        raise UsageError("--threshold-precision must be above 0")
    # Found out now rather than after the whole validation.
    for flag, value in (("--output-json", args.output_json), ("--save-thresholds", args.save_thresholds)):
        if value:
            check_writable(flag, Path(value))
    if args.report:
        if os.path.lexists(args.report) and not os.path.isdir(args.report):
            raise UsageError(f"--report {args.report} is a file; give a folder")
        check_writable("--report", Path(args.report) / "README.md")


def per_class_rows(classes: Sequence[str], targets: np.ndarray, scores: np.ndarray, partial: bool,
                   meter: ThresholdMetrics, ap: Optional[np.ndarray] = None) -> list[dict[str, Any]]:
    """One row per class; ``ap``: the per-class AP (partial or not, as ``partial`` says) when the caller has it."""
    if ap is None:
        ap = per_class_partial_ap(targets, scores) if partial else per_class_ap(targets, scores)
    at_threshold = meter.per_class()
    threshold = np.broadcast_to(np.asarray(meter.threshold, dtype=np.float64), (len(classes),))
    rows = []
    for k, name in enumerate(classes):
        value = float(ap[k])
        rows.append({
            "index": k,
            "class": name,
            "ap": None if math.isnan(value) else 100.0 * value,
            "positives": int((targets[:, k] == 1).sum()),
            "negatives": int((targets[:, k] == 0).sum()),
            "threshold": float(threshold[k]),
            "precision": float(at_threshold["precision"][k]),
            "recall": float(at_threshold["recall"][k]),
            "f1": float(at_threshold["f1"][k]),
        })
    return rows


def print_per_class(rows: Sequence[dict[str, Any]]) -> None:
    # printable: one line per class, whatever control characters the dataset's class names hold.
    names = [printable(r["class"]) for r in rows]
    width = max([len("class")] + [len(n) for n in names])
    print(f"{'idx':>5}  {'class':<{width}}  {'AP':>7}  {'pos':>6}  {'P':>6}  {'R':>6}  {'F1':>6}")
    for r, name in zip(rows, names):
        ap = "-" if r["ap"] is None else f"{r['ap']:.2f}"
        print(f"{r['index']:>5}  {name:<{width}}  {ap:>7}  {r['positives']:>6}  {r['precision']:>6.2f}  "
              f"{r['recall']:>6.2f}  {r['f1']:>6.2f}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit code: 0, 2 for bad input (one line), 1 for a bug (traceback)."""
    code = run_main(run, argv, prog="validate.py")
    if code:
        stop_loader_workers()  # a failed run's loader workers would block the exit (asl.data.base)
    return code


def run(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.dataset = canonical_name(args.dataset)
    split = args.val_split or default_split(args.dataset, train=False)
    info = dist_utils.init_distributed(args.device)
    try:
        setup_logging(args.verbose, main_process=info.is_main)
        check_pixel_limit()
        check_args(args)
        loaded = _load(args, info)
        dataset = _dataset(args, split, loaded, info)
        if args.save_thresholds:
            # Checked now: found at the end, it would cost the whole evaluation and the outputs written after it.
            check_unique_classes(dataset.classes, f"--save-thresholds {args.save_thresholds}")
        # Read before the long part, so that a file that does not fit this model stops the run at once.
        thresholds = load_thresholds(args.thresholds, dataset.classes) if args.thresholds else args.thre
        out, elapsed = _scores(args, dataset, loaded, info, thresholds)
        if info.is_main:
            _report(args, split, loaded, dataset, out, elapsed, info, thresholds)
        return 0
    finally:
        dist_utils.destroy_distributed()


def _load(args, info):
    # Under torchrun, rank 0 downloads a remote source into the cache while the others wait, then they read it.
    with dist_utils.main_process_first(info, enabled=is_remote(args.model_path)):
        loaded = load_model(args.model_path, args.model_name, num_classes=args.num_classes, device=info.device,
                            channels_last=args.channels_last, sha256=args.model_sha256,
                            batch_size=dist_utils.per_rank_batch(args.batch_size, info.world_size, exact=False))
    args.image_size, size_from = loaded.input_size(args.image_size)
    if info.is_main:
        head = (" (bottleneck head)" if loaded.bottleneck_head else
                f" (ML-Decoder head, {loaded.num_of_groups} groups, {loaded.decoder_embedding} wide)"
                if loaded.head == "ml-decoder" else "")
        print(f"model: {loaded.model_name}{head}, "
              f"{loaded.num_classes} classes, from {args.model_path}")
        print(f"image size: {args.image_size} ({size_from})")
    return loaded


def _dataset(args, split: str, loaded, info):
    options: dict[str, Any] = {"strict": args.strict_data, "with_index": True}
    options.update(dataset_options(args.dataset_option, "validate.py", _SET_BY_VALIDATE))
    if (args.dataset == "openimages" and not {"idx_to_class", "classes_file"} & set(options)
            and not loaded.class_names[0].startswith("class_")):
        # A 9605-class model only scores right in its own class order, which its file carries.
        options["idx_to_class"] = dict(enumerate(loaded.class_names))
    dataset = create_dataset(args.dataset, args.data, split, args.image_size, train=False,
                             cache_dir=args.cache_dir, **options)
    if dataset.num_classes != loaded.num_classes:
        raise UsageError(f"the checkpoint has {loaded.num_classes} classes but the {args.dataset} {split} data has "
                         f"{dataset.num_classes}")
    if loaded.class_names != list(dataset.classes) and not loaded.class_names[0].startswith("class_"):
        logger.warning("the checkpoint's class names differ from the dataset's (first: %r vs %r); the dataset's "
                       "are reported", loaded.class_names[0], dataset.classes[0])
    if info.is_main:
        print(f"{args.dataset} {split}: {len(dataset)} images, {dataset.num_classes} classes")
    if len(dataset) == 0:
        raise UsageError(f"the {args.dataset} {split} split of {args.data} has no images")
    return dataset


def _scores(args, dataset, loaded, info, thresholds) -> tuple[dict[str, Any], float]:
    local_batch = dist_utils.per_rank_batch(args.batch_size, info.world_size, exact=False)
    if isinstance(dataset, ShardDataset):
        # Each sample is read by one rank's worker (asl.data.shards_read); evaluate() gathers them by index.
        loader = create_shard_loader(dataset, local_batch, rank=info.rank, world_size=info.world_size,
                                     num_workers=args.workers, pin_memory=info.device.type == "cuda")
    else:
        # DistributedSampler pads with repeated images so every rank has as many; evaluate() removes the repeats.
        sampler = (torch.utils.data.DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank,
                                                       shuffle=False) if info.distributed else None)
        loader = create_loader(dataset, local_batch, sampler=sampler, num_workers=args.workers,
                               pin_memory=info.device.type == "cuda")
    printer = BatchPrinter(dataset.num_classes, thresholds, args.print_freq, len(loader), info.is_main)
    if info.is_main:
        print("starting validation")
    start = time.perf_counter()
    out = evaluate(loaded.model, loader, info.device, amp_dtype=resolve_amp_dtype(args.amp_dtype, info.device),
                   on_batch=printer.on_batch)
    if out["num_images"] == 0:
        raise UsageError(f"none of the {len(dataset)} images of {args.data} could be read")
    return out, time.perf_counter() - start


def _report(args, split: str, loaded, dataset, out: dict[str, Any], elapsed: float, info, thresholds) -> None:
    scores, targets = out["scores"], out["targets"]
    skipped = sorted(set(range(len(dataset))) - set(int(i) for i in out["indices"]))
    partial = bool((targets < 0).any())
    meter = ThresholdMetrics(dataset.num_classes, thresholds)
    meter.update(scores, targets)
    at_threshold = meter.compute()
    # The per-class AP once: the rows, the mAP and CSL's weighted figure all read it (a Python loop over the classes).
    ap = per_class_partial_ap(targets, scores) if partial else per_class_ap(targets, scores)
    score_value = partial_map_from_ap(ap) if partial else map_from_ap(ap)
    rows = per_class_rows(dataset.classes, targets, scores, partial, meter, ap)
    print("--------------------------------------------------------------------")
    print(" * " + meter.format_line(at_threshold))
    if args.thresholds:
        print(f"(at the per-class thresholds of {args.thresholds})")
    # Each output is written on its own: one that fails (a disk full, a folder removed since the check) is named
    # at the end, after the others are written and the mAP is printed.
    failed: list[str] = []
    if args.save_thresholds:
        _write(failed, "--save-thresholds", args.save_thresholds,
               lambda: save_tuned_thresholds(args, dataset.classes, targets, scores, meter))
    if args.report:
        summary = report_summary(args, split, loaded, out["num_images"], score_value, partial, at_threshold)
        _write(failed, "--report", args.report,
               lambda: print(f"report written to {write_report(args.report, rows, targets, scores, summary)}"))
    if skipped:
        named = ", ".join(printable(dataset.image_path(i)) for i in skipped[:MAX_NAMED_SKIPPED])
        more = f" (+{len(skipped) - MAX_NAMED_SKIPPED} more)" if len(skipped) > MAX_NAMED_SKIPPED else ""
        print(f"skipped {len(skipped)} unreadable image(s): {named}{more}")
    if isinstance(dataset, ShardDataset) and out["num_images"] != dataset.count:
        print(f"scored {out['num_images']} of the {dataset.count} samples that {split}.json lists")
    if args.per_class:
        print_per_class(rows)
    if args.output_json:
        _write(failed, "--output-json", args.output_json,
               lambda: write_json(args, split, loaded, out["num_images"], skipped, dataset, partial, score_value,
                                  at_threshold, rows, elapsed))
    images_per_s = out["num_images"] / elapsed if elapsed > 0 else float("inf")
    print(f"{out['num_images']} images in {elapsed:.1f} s: {images_per_s:.1f} images/s "
          f"({info.world_size} process{'es' if info.world_size > 1 else ''}, {info.device.type})")
    if partial:
        print("(partial-label mAP: targets of -1 are not annotated and left out of each class's ranking)")
    for line in coverage_lines(rows, partial, score_value):
        print(line)
    if partial:  # CSL's second figure: each class's AP weighted by its number of positives
        print(f"partial mAP: {score_value:.2f}, class-weighted partial mAP (CSL): "
              f"{weighted_partial_map_from_ap(ap, targets):.2f}")
    # original: print("mAP score:", mAP_score) -- the last line, full precision
    print("mAP score:", score_value, flush=True)
    if failed:
        raise UsageError(f"the evaluation ran, but {'; '.join(failed)}")


def present_classes_map(rows: Sequence[dict[str, Any]]) -> tuple[int, Optional[float]]:
    """How many classes have no positive in the evaluated set, and the mean AP (percent) over those that have one
    (``None`` when none has). Rows of :func:`per_class_rows`; a class whose partial AP is undefined counts as
    missing."""
    present = [r["ap"] for r in rows if r["positives"] > 0 and r["ap"] is not None]
    return len(rows) - len(present), (float(np.mean(present)) if present else None)


def coverage_lines(rows: Sequence[dict[str, Any]], partial: bool, score_value: float) -> list[str]:
    """The console lines on classes without positives. original: such a class counts as AP 0 in the mAP (the
    small sets people try first, coco128 among them, lack several classes), which the last line keeps; the mean
    over the classes present shows how much of the figure that costs."""
    missing, present_map = present_classes_map(rows)
    total = len(rows)
    if not missing:
        return [f"classes with no positive in the evaluated set: 0 of {total}"]
    if partial:
        return [f"classes with no positive (or no negative) among the annotated labels: {missing} of {total}, left "
                f"out of the partial-label mAP"]
    lines = [f"classes with no positive in the evaluated set: {missing} of {total}; each counts as AP 0 in the "
             f"mAP score below, as in the original"]
    if present_map is not None:
        lines.append(f"mAP over the {total - missing} classes present: {present_map:.2f} (over all {total} "
                     f"classes: {score_value:.2f})")
    return lines


def _write(failed: list, flag: str, target: str, write) -> None:
    try:
        write()
    except OSError as exc:
        failed.append(f"{flag} {target} could not be written: {exc.strerror or exc}")


def save_tuned_thresholds(args, classes: Sequence[str], targets, scores, before: ThresholdMetrics) -> None:
    """Chooses a threshold per class on the evaluated set, writes them, and prints F1 before and after."""
    t, s = np.asarray(targets), np.asarray(scores)
    if args.threshold_precision is None:
        tuned, rule = max_f1_thresholds(t, s), "max F1"
    else:
        tuned, rule = precision_thresholds(t, s, args.threshold_precision), f"precision >= {args.threshold_precision}"
    save_thresholds(args.save_thresholds, classes, tuned)
    after = ThresholdMetrics(len(classes), tuned)
    after.update(s, t)
    old, new = before.compute(), after.compute()
    never = int((tuned >= NEVER).sum())
    print(f"per-class thresholds ({rule}) written to {args.save_thresholds}"
          + (f"; {never} class(es) never predicted (no positive, or the precision is never reached)" if never else ""))
    print(f"  on this same set: micro F1 (F_O) {old['F_O']:.2f} -> {new['F_O']:.2f}, macro F1 (F_C) "
          f"{old['F_C']:.2f} -> {new['F_C']:.2f}; judge them on another split (validate.py --thresholds FILE)")


def report_summary(args, split: str, loaded, num_images: int, score_value: float, partial: bool,
                   at_threshold: dict[str, float]) -> list[str]:
    # Paths and names as Markdown text: a backtick or a '<' in a path must not open code or HTML on the page.
    rule = (f"the per-class thresholds of {markdown_text(args.thresholds)}" if args.thresholds
            else f"{args.thre} for every class")
    return [
        f"- model: {markdown_text(loaded.model_name)}, {loaded.num_classes} classes, {markdown_text(args.model_path)} "
        f"at {args.image_size} px",
        f"- data: {args.dataset} {markdown_text(args.data)}, split {markdown_text(split)}, {num_images} images",
        f"- {'partial-label ' if partial else ''}mAP: **{score_value:.2f}**",
        f"- threshold: {rule}; micro F1 (F_O) {at_threshold['F_O']:.2f}, macro F1 (F_C, mean per-class F1) "
        f"{at_threshold['F_C']:.2f}",
    ]


def write_json(args, split, loaded, num_images, skipped, dataset, partial, score, at_threshold, rows,
               elapsed) -> None:
    missing, present_map = present_classes_map(rows)
    report = {
        "mAP": score,
        "metric": "partial_mAP" if partial else "mAP",
        "threshold": args.thre,
        "thresholds_file": args.thresholds,
        **{k: float(v) for k, v in at_threshold.items()},
        "num_images": num_images,
        "skipped": [dataset.image_path(i) for i in skipped],
        "seconds": elapsed,
        "images_per_second": num_images / elapsed if elapsed > 0 else None,
        "model_name": loaded.model_name,
        "model_path": args.model_path,
        "num_classes": loaded.num_classes,
        "dataset": args.dataset,
        "data": str(args.data),
        "split": split,
        "image_size": args.image_size,
        "classes_without_positives": missing,
        "mAP_present_classes": present_map,
        "per_class": rows,
    }
    path = Path(args.output_json)
    path.parent.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: a NaN would make the file unreadable for strict JSON parsers; AP of skipped classes is null.
    atomic_write_text(path, json.dumps(report, indent=2, allow_nan=False) + "\n")


if __name__ == "__main__":
    sys.exit(main())
