"""Multi-label inference on pictures: one file, folders (recursive), or several paths; headless, CPU or CUDA.

    python infer.py --model_path MS_COCO_TRresNet_L_448_86.6.pth --pic_path pics/ --input_size 448
    python infer.py --dataset_type=MS-COCO --model_name=tresnet_l --model_path=URL --pic_path=a.jpg --json

Prints, per picture, the classes whose probability is above ``--th`` (default per ``--dataset_type``: 0.7 for
MS-COCO, 0.995 for OpenImages, 0.7 otherwise), best first; ``--thresholds FILE`` gives each class its own
threshold (``validate.py --save-thresholds FILE``). ``--json`` prints one JSON object per picture instead.
``--output`` writes the picture(s) with the detections drawn on them. Pictures that cannot be read are named on
stderr and skipped; the exit code is non-zero when none could be read.
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

from asl.cli import ArgumentParser, positive_int, probability, run_main, setup_logging
from asl.data.transforms import load_rgb
from asl.distributed import select_device
from asl.errors import UsageError
from asl.evaluation.predictions import default_threshold, detections, predict
from asl.models.loading import load_model
from asl.pictures import IMAGE_EXTENSIONS, WRITABLE_EXTENSIONS, annotate, find_images, load_picture
from asl.precision import resolve_amp_dtype
from asl.evaluation.thresholds import load_thresholds

from .options import inference_options, model_options, runtime_options

logger = logging.getLogger("infer")


def build_parser() -> ArgumentParser:
    parents = [model_options("checkpoint file or http(s) URL (MODEL_ZOO.md)", required=True),
               runtime_options(batch_size=16, workers=2, amp_dtype="none",
                               amp_help="opt-in autocast, on CUDA or the CPU (bfloat16 there); default fp32, "
                                        "as the original"),
               inference_options()]
    parser = ArgumentParser(prog="infer.py", parents=parents,
                            description="ASL inference on pictures (files or folders).")
    parser.add_argument("--pic-path", type=str, nargs="+", required=True,
                        help="picture file(s) and/or folder(s); folders are searched recursively")
    parser.add_argument("--dataset-type", type=str, default="MS-COCO",
                        help="sets the default threshold: MS-COCO 0.7, OpenImages 0.995, others 0.7")
    parser.add_argument("--th", "--thre", "--threshold", type=probability, default=None,
                        help="probability threshold of every class (default: by --dataset-type)")
    parser.add_argument("--top-k", type=positive_int, default=None, help="report at most K classes per picture")
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
    """Where each annotated picture goes: a single file, or the same relative layout inside a folder."""
    if output is None:
        return {}
    out = Path(output)
    as_file = not out.is_dir() and out.suffix.lower() in IMAGE_EXTENSIONS
    if as_file:
        if len(paths) != 1:
            raise UsageError(f"--output {output} is a file but there are {len(paths)} pictures; give a folder")
        return {0: out}
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
            target = target.with_suffix(".png")  # PIL cannot write every format it can read (e.g. GIF frames)
        plan[i] = target
    return plan


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit code: 0, 2 for bad input (one line), 1 for a bug (traceback) or when no picture could be read."""
    return run_main(run, argv, prog="infer.py")


def run(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.thresholds and args.th is not None:
        raise UsageError("give either --th (one threshold) or --thresholds FILE (one per class), not both")
    threshold = default_threshold(args.dataset_type) if args.th is None else args.th
    device = select_device(args.device)
    amp_dtype = resolve_amp_dtype(args.amp_dtype, device)

    paths = find_images(args.pic_path)
    if not paths:
        raise UsageError(f"no pictures found in {' '.join(args.pic_path)}")
    # abspath, not resolve: a symlinked picture keeps its place in the folder layout of --output.
    roots = [Path(os.path.abspath(p)) for p in args.pic_path if Path(p).is_dir()]
    plan = _output_plan(args.output, paths, roots)

    loaded = load_model(args.model_path, args.model_name, device=device, channels_last=args.channels_last,
                        sha256=args.model_sha256, batch_size=min(args.batch_size, len(paths)))
    if args.image_size is None:
        args.image_size = loaded.image_size
        logger.info("image size %d (%s)", args.image_size, loaded.image_size_source)
    if args.thresholds:
        threshold = load_thresholds(args.thresholds, loaded.class_names)
        logger.info("%d picture(s), per-class thresholds of %s, device %s", len(paths), args.thresholds, device)
    else:
        logger.info("%d picture(s), threshold %.3f, device %s", len(paths), threshold, device)

    loader = DataLoader(_Pictures(paths, args.image_size), batch_size=args.batch_size, shuffle=False,
                        num_workers=min(args.workers, len(paths) - 1) if len(paths) > 1 else 0,
                        collate_fn=_collate, pin_memory=device.type == "cuda")
    # A progress bar only where it helps: several pictures, and stderr a terminal (disable=None: tqdm checks).
    show_bar = len(paths) > 1
    read = 0
    unreadable = []
    with tqdm(total=len(paths), desc="pictures", unit="img", disable=None if show_bar else True, file=sys.stderr,
              leave=False) as bar:
        for images, indices, bad in loader:
            for index, reason in bad:
                unreadable.append(paths[index])
                tqdm.write(f"infer.py: cannot read {paths[index]}: {reason}", file=sys.stderr)
            if images is not None:
                probabilities = predict(loaded.model, images, device, amp_dtype=amp_dtype)
                for row, index in zip(probabilities, indices):
                    found = detections(row, loaded.class_names, threshold, args.top_k)
                    _report(paths[index], found, args.json, bar)
                    if index in plan:
                        _write_annotated(paths[index], found, plan[index])
                    read += 1
            bar.update(len(indices) + len(bad))
    if read == 0:
        print(f"infer.py: error: none of the {len(paths)} picture(s) could be read", file=sys.stderr)
        return 1
    if plan:
        logger.info("annotated picture(s) written to %s", args.output)
    if unreadable:
        logger.warning("%d of %d picture(s) could not be read", len(unreadable), len(paths))
    return 0


def _report(path: Path, found: list, as_json: bool, bar: tqdm) -> None:
    if as_json:
        line = json.dumps({"image": str(path), "detections": found})
    else:
        classes = ", ".join(f"{d['class']} ({d['score']:.3f})" for d in found) or "(none above the threshold)"
        line = f"{path}: {classes}"
    if bar.disable:
        print(line, flush=True)
    else:
        tqdm.write(line, file=sys.stdout)  # keeps the bar (on stderr) intact


def _write_annotated(path: Path, found: list, target: Path) -> None:
    # The annotation is drawn on the full-resolution picture, so it is decoded again here (the loader worker
    # only returned the resized tensor).
    picture = load_rgb(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    annotate(picture, found).save(target, quality=95)  # quality: JPEG only, ignored by the other formats
    logger.debug("wrote %s", target)


if __name__ == "__main__":
    sys.exit(main())
