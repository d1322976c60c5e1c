"""Multi-label inference on pictures: one file, folders (recursive), or several paths; headless, CPU or CUDA.

    python infer.py --model_path MS_COCO_TRresNet_L_448_86.6.pth --pic_path pics/ --input_size 448
    python infer.py --dataset_type=MS-COCO --model_name=tresnet_l --model_path=URL --pic_path=a.jpg --json

Prints, per picture, the classes whose probability is above ``--th`` (default: the thresholds the model source
carries, as the folders of ``export.py --format hf --thresholds`` do, else per ``--dataset_type``: 0.7 for MS-COCO,
0.995 for OpenImages, 0.7 otherwise), best first; ``--thresholds FILE`` gives each class its own threshold
(``validate.py --save-thresholds FILE``). ``--top-k K`` alone lists the K best classes of each picture
whatever their scores; with ``--th`` or ``--thresholds`` it keeps at most K of the classes above the threshold.
``--json`` prints one JSON object per picture instead. ``--output`` writes the picture(s) with the detections
drawn on them; where it goes is checked before the model is loaded. Pictures that cannot be read are named on
stderr and skipped; when none could be read, that is bad input: one line, exit code 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from asl.cli import ArgumentParser, check_folder, check_writable, positive_int, probability, run_main, setup_logging
from asl.data.transforms import load_rgb
from asl.distributed import select_device
from asl.errors import UsageError
from asl.evaluation.predictions import default_threshold, detections, predict
from asl.evaluation.report import printable
from asl.models.loading import LoadedModel, load_model
from asl.pictures import (IMAGE_EXTENSIONS, WRITABLE_EXTENSIONS, UnreadableImageError, annotate, find_images,
                          load_picture)
from asl.precision import resolve_amp_dtype
from asl.evaluation.thresholds import checked_threshold, load_thresholds, thresholds_for_classes

from .options import (MODEL_SOURCE_HELP, add_max_pixels, check_pixel_limit, inference_options, model_options,
                      runtime_options)

logger = logging.getLogger("infer")


def build_parser() -> ArgumentParser:
    parents = [model_options(MODEL_SOURCE_HELP, required=True, num_classes=True),
               runtime_options(batch_size=16, workers=8, amp_dtype="none",
                               amp_help="opt-in autocast, on CUDA or the CPU (bfloat16 there); default fp32, "
                                        "as the original"),
               inference_options()]
    parser = ArgumentParser(prog="infer.py", parents=parents,
                            description="ASL inference on pictures (files or folders).")
    parser.add_argument("--pic-path", type=str, nargs="+", required=True,
                        help="picture file(s) and/or folder(s); folders are searched recursively")
    parser.add_argument("--dataset-type", type=str, default="MS-COCO",
                        help="sets the default threshold: MS-COCO 0.7, OpenImages 0.995, others 0.7")
    parser.add_argument("--threshold", "--thre", "--th", dest="th", type=probability, default=None, metavar="T",
                        help="probability threshold of every class (default: the thresholds the model source "
                             "carries, else by --dataset-type)")
    parser.add_argument("--top-k", type=positive_int, default=None, metavar="K",
                        help="alone: list the K best classes of each picture, whatever their scores (the "
                             "--dataset-type threshold does not apply); with --th or --thresholds: at most K of the "
                             "classes above the threshold")
    add_max_pixels(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object per picture")
    parser.add_argument("--output", type=str, default=None,
                        help="annotated picture: a file (one picture) or a folder (any number)")
    # --no-amp stays accepted as a spelling of --amp-dtype none, for command lines written with it.
    parser.add_argument("--no-amp", dest="amp_dtype", action="store_const", const="none", help=argparse.SUPPRESS)
    return parser


class _Pictures(Dataset):
    """Decodes and resizes in the loader workers; an unreadable picture becomes (None, index, reason)."""

    def __init__(self, paths: Sequence[Path], image_size: int):
        self.paths = list(paths)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            _, tensor = load_picture(self.paths[index], self.image_size)
        except OSError as exc:  # UnreadableImageError and plain I/O errors (permissions...)
            return None, index, getattr(exc, "reason", None) or str(exc)
        return tensor, index, None


def _collate(items):
    good = [(t, i) for t, i, _ in items if t is not None]
    bad = [(i, reason) for t, i, reason in items if t is None]
    images = torch.stack([t for t, _ in good]) if good else None
    return images, [i for _, i in good], bad


def _output_plan(output: Optional[str], paths: Sequence[Path], roots: Sequence[Path]) -> dict[int, Path]:
    """Where each annotated picture goes: a single file, or the same relative layout inside a folder. Every place
    is checked here, before the model is loaded, so that a read-only or mistyped --output stops the run at once
    instead of after the whole inference."""
    if output is None:
        return {}
    out = Path(output)
    # os.path, not Path methods: those raise for a name too long, which check_writable names clearly.
    as_file = not os.path.isdir(out) and out.suffix.lower() in IMAGE_EXTENSIONS
    if as_file:
        if len(paths) != 1:
            raise UsageError(f"--output {output} is a file but there are {len(paths)} pictures; give a folder")
        check_writable("--output", out)
        if _same_file(out, paths[0]):
            raise UsageError(f"--output {output} is the picture itself; give another name")
        return {0: out}
    if os.path.lexists(out) and not os.path.isdir(out):
        raise UsageError(f"--output {output} is a file, not a folder; give a folder, or a picture file name "
                         f"({', '.join(WRITABLE_EXTENSIONS)}) for one picture")
    check_folder("--output", out)
    plan = {}
    for i, path in enumerate(paths):
        relative = Path(path.name)
        for root in roots:
            try:
                relative = Path(os.path.abspath(path)).relative_to(root)
                break
            except ValueError:
                continue
        target = out / relative
        if target.suffix.lower() not in WRITABLE_EXTENSIONS:
            # PIL cannot write every format it can read (e.g. GIF frames). The old suffix stays in the name, so
            # that x.gif and x.png of one folder keep two copies.
            target = target.with_name(target.name + ".png")
        plan[i] = target
    folders = set()
    written: dict[Path, int] = {}
    for i, target in plan.items():
        if target in written:
            raise UsageError(f"--output: {printable(paths[written[target]])} and {printable(paths[i])} would both be "
                             f"annotated as {printable(target)}; annotate them in separate runs")
        written[target] = i
        if os.path.isdir(target):
            raise UsageError(f"--output: the annotated copy {printable(target)} would replace a folder")
        if _same_file(target, paths[i]):
            raise UsageError(f"--output: the annotated copy of {printable(paths[i])} would overwrite the picture "
                             f"itself; give another folder")
        folders.add(target.parent)
    probed: set = set()
    for folder in sorted(folders):
        check_folder("--output", folder, probed=probed)
    return plan


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (the usual case for a target) or cannot be examined
        return False


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit code: 0, 2 for bad input (one line; no picture could be read is bad input too), 1 for a bug
    (traceback)."""
    return run_main(run, argv, prog="infer.py")


def run(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    check_pixel_limit()
    if args.thresholds and args.th is not None:
        raise UsageError("give either --th (one threshold) or --thresholds FILE (one per class), not both")
    device = select_device(args.device)
    amp_dtype = resolve_amp_dtype(args.amp_dtype, device)

    paths = find_images(args.pic_path)
    if not paths:
        raise UsageError(f"no pictures found in {' '.join(args.pic_path)}")
    # abspath, not resolve: a symlinked picture keeps its place in the folder layout of --output.
    roots = [Path(os.path.abspath(p)) for p in args.pic_path if Path(p).is_dir()]
    plan = _output_plan(args.output, paths, roots)

    loaded = load_model(args.model_path, args.model_name, num_classes=args.num_classes, device=device,
                        channels_last=args.channels_last, sha256=args.model_sha256,
                        batch_size=min(args.batch_size, len(paths)))
    args.image_size, size_from = loaded.input_size(args.image_size)
    logger.info("image size %d (%s)", args.image_size, size_from)
    threshold, rule = _threshold(args, loaded)
    logger.info("%d picture(s), %s, device %s", len(paths), rule, device)

    loader = DataLoader(_Pictures(paths, args.image_size), batch_size=args.batch_size, shuffle=False,
                        num_workers=min(args.workers, len(paths) - 1) if len(paths) > 1 else 0,
                        collate_fn=_collate, pin_memory=device.type == "cuda")
    # A progress bar only where it helps: several pictures, and stderr a terminal (disable=None: tqdm checks).
    show_bar = len(paths) > 1
    read = 0
    unreadable = []
    empty = 0
    with tqdm(total=len(paths), desc="pictures", unit="img", disable=None if show_bar else True, file=sys.stderr,
              leave=False) as bar:
        for images, indices, bad in loader:
            for index, reason in bad:
                unreadable.append(paths[index])
                tqdm.write(f"infer.py: cannot read {printable(paths[index])}: {printable(reason)}", file=sys.stderr)
            if images is not None:
                probabilities = predict(loaded.model, images, device, amp_dtype=amp_dtype)
                for row, index in zip(probabilities, indices):
                    found = detections(row, loaded.class_names, threshold, args.top_k)
                    _report(paths[index], found, args.json, bar)
                    empty += not found
                    if index in plan:
                        _write_annotated(paths[index], found, plan[index])
                    read += 1
            bar.update(len(indices) + len(bad))
    if read == 0:
        raise UsageError(f"none of the {len(paths)} picture(s) could be read (each is named above)")
    if plan:
        logger.info("annotated picture(s) written to %s", args.output)
    if unreadable:
        logger.warning("%d of %d picture(s) could not be read", len(unreadable), len(paths))
    if empty:
        lower = "them in the file" if args.thresholds else "it with --th (e.g. --th 0.3)"
        logger.warning("%d of %d picture(s) have no class above %s: lower %s, or list each picture's best classes "
                       "whatever their scores with --top-k K alone", empty, read, rule, lower)
    return 0


def _threshold(args, loaded: LoadedModel):
    """The threshold(s) a class must exceed, and the rule in words. In order: --thresholds, --th, --top-k alone,
    the thresholds the model source carries (``export.py --format hf --thresholds/--threshold`` stores them in
    config.json under ``asl``), the --dataset-type default."""
    if args.thresholds:
        return load_thresholds(args.thresholds, loaded.class_names), f"the per-class thresholds of {args.thresholds}"
    if args.th is not None:
        return args.th, f"the threshold {args.th:g}"
    if args.top_k is not None:
        # --top-k alone ranks every class: a threshold from the model or the dataset type is not the user's.
        return float("-inf"), f"the {args.top_k} best classes of each picture, whatever their scores"
    stored = _stored_threshold(loaded)
    if stored is not None:
        return stored
    threshold = default_threshold(args.dataset_type)
    return threshold, f"the threshold {threshold:g} (the {args.dataset_type} default)"


def _stored_threshold(loaded: LoadedModel):
    """The per-class thresholds or the one threshold that the model source carries, with the rule in words; None
    when it carries neither."""
    where = f"the thresholds stored with the model ({printable(loaded.source)}, config.json asl.thresholds)"
    if loaded.thresholds is not None:
        values = thresholds_for_classes(loaded.thresholds, loaded.class_names, where)
        return values, "the per-class thresholds stored with the model (--th T overrides them)"
    single = loaded.checkpoint_info.get("threshold")
    if single is None:
        return None
    single = checked_threshold(single, f"the threshold stored with the model ({printable(loaded.source)}, "
                                       f"config.json asl.threshold)", "; give --th T")
    return single, f"the threshold {single:g} stored with the model (--th T overrides it)"


def _report(path: Path, found: list, as_json: bool, bar: tqdm) -> None:
    if as_json:
        line = json.dumps({"image": str(path), "detections": found})
    else:
        # printable: one line per picture, whatever control characters a class or file name holds.
        classes = ", ".join(f"{printable(d['class'])} ({d['score']:.3f})" for d in found) \
            or "(none above the threshold)"
        line = f"{printable(path)}: {classes}"
    if bar.disable:
        print(line, flush=True)
    else:
        tqdm.write(line, file=sys.stdout)  # keeps the bar (on stderr) intact


def _write_annotated(path: Path, found: list, target: Path) -> None:
    # The annotation is drawn on the full-resolution picture, so it is decoded again here (the loader worker
    # only returned the resized tensor); a picture changed or removed since then loses its copy, not the run.
    try:
        picture = load_rgb(path)
    except UnreadableImageError as exc:
        logger.warning("no annotated copy of %s: %s", printable(path), printable(exc.reason))
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        annotate(picture, found).save(target, quality=95)  # quality: JPEG only, ignored by the other formats
    except OSError as exc:  # checked before the run; a disk that fills up or a folder changed since can remain
        raise UsageError(f"cannot write the annotated picture {printable(target)}: {exc.strerror or exc}") from None
    logger.debug("wrote %s", target)


if __name__ == "__main__":
    sys.exit(main())
