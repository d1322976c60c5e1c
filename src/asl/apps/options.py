"""Options the apps share, declared once (argparse ``parents=``); each app adds its own and its defaults."""
from __future__ import annotations

import argparse
import os
from typing import Any, Mapping, Optional, Sequence

from ..cli import (ArgumentParser, check_data_dir, image_size, learning_rate, margin, nonnegative_float,
                   nonnegative_int, parse_key_values, positive_int, probability)
from ..data import DATASET_NAMES
from ..data.shards_source import is_remote_data
from ..data.transforms import MAX_PIXELS_ENV, pixel_limit
from ..errors import UsageError
from ..precision import amp_dtype_arg

#: what --model-path takes in every script (asl.sources)
MODEL_SOURCE_HELP = "model source: a .pth/.safetensors file, a folder, hf-hub:ORG/NAME or an http(s) URL (MODEL_ZOO.md)"

__all__ = ["MODEL_SOURCE_HELP", "cpu_cores", "model_options", "runtime_options", "inference_options", "data_options",
           "recipe_options", "add_max_pixels", "check_pixel_limit"]


def _checkpoint_source(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a model source: a checkpoint file, a folder, hf-hub:ORG/NAME or an "
                                         "http(s) URL (see MODEL_ZOO.md), got ''")
    return text


def model_options(model_path_help: str, required: bool, num_classes: bool = False) -> ArgumentParser:
    """The model-source flags; ``num_classes``: also ``--num-classes`` for a checkpoint (scripts that read no dataset,
    whose class count would otherwise check it)."""
    p = ArgumentParser(add_help=False)
    p.add_argument("--model-path", type=_checkpoint_source if required else str, required=required,
                   default=None if required else "", help=model_path_help)
    p.add_argument("--model-name", type=str, default=None,
                   help="tresnet_m|tresnet_l|tresnet_xl|tresnet_v2_l|timm/<name>; detected from the checkpoint when "
                        "omitted")
    p.add_argument("--model-sha256", type=str, default=None,
                   help="expected SHA-256 of the checkpoint (64 hex digits): checked before it is loaded")
    p.add_argument("--image-size", "--input-size", type=image_size, default=None,
                   help="square input size (default: the checkpoint's own, else the size in an official file's "
                        "name, else 448)")
    if num_classes:
        p.add_argument("--num-classes", type=positive_int, default=None,
                       help="class count of a checkpoint that does not store it (a bare state dict of a timm/<name> "
                            "model); otherwise an optional check against the file")
    return p


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. under taskset or a container's cpuset, where
    the platform has one), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def runtime_options(batch_size: int, workers: int, amp_dtype: str, amp_help: str) -> ArgumentParser:
    """``workers`` is the app's most loader workers by default; the default is capped at the CPU cores, since more
    workers than cores only compete for them (and torch's DataLoader warns)."""
    default_workers = min(workers, cpu_cores())
    p = ArgumentParser(add_help=False)
    p.add_argument("-b", "--batch-size", type=positive_int, default=batch_size,
                   help="batch size (train.py and validate.py: the global one, split across the torchrun processes)")
    p.add_argument("-j", "--workers", type=nonnegative_int, default=default_workers,
                   help=f"data loading workers per process (default: min({workers}, CPU cores) = {default_workers})")
    p.add_argument("--device", type=str, default="auto", help="auto|cpu|cuda|cuda:N")
    p.add_argument("--amp-dtype", type=amp_dtype_arg, default=amp_dtype, metavar="{auto,none,float16,bfloat16}",
                   help=amp_help)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory layout for the model and its inputs, same results (default: the faster layout "
                        "for the device and the job)")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    return p


def _existing_file(text: str) -> str:
    # Checked while parsing, before a large checkpoint is loaded. A path that exists but is no regular file gets
    # its own message: "no such file" for a folder that is there would send the user looking for a typo.
    if os.path.isfile(text):
        return text
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file")
    if os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text} is not a regular file (a FIFO, device or socket)")
    if os.path.lexists(text):
        raise argparse.ArgumentTypeError(f"{text} is a symbolic link to nothing (broken, or a loop)")
    raise argparse.ArgumentTypeError(f"no such file: {text}")


def inference_options() -> ArgumentParser:
    """Options of the scripts that run a loaded checkpoint (validate, infer)."""
    p = ArgumentParser(add_help=False)
    p.add_argument("--thresholds", type=_existing_file, default=None, metavar="FILE",
                   help="one threshold per class: the JSON {class: threshold} of validate.py --save-thresholds, "
                        "instead of one threshold for every class")
    return p


def _max_pixels(text: str) -> int:
    try:
        return pixel_limit(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _SetPixelLimit(argparse.Action):
    """Puts ``--max-pixels`` in force as it is parsed, through the environment, which every process that decodes
    inherits (loader workers however started, torchrun ranks): no script has to remember to apply it."""

    def __call__(self, parser, namespace, values, option_string=None):
        os.environ[MAX_PIXELS_ENV] = str(values)
        setattr(namespace, self.dest, values)


def add_max_pixels(p: argparse.ArgumentParser) -> None:
    """``--max-pixels``, in every script that decodes pictures."""
    p.add_argument("--max-pixels", type=_max_pixels, default=None, action=_SetPixelLimit, metavar="N",
                   help=f"largest picture decoded, in pixels (0: no limit); larger ones are refused as possible "
                        f"decompression bombs (default: ${MAX_PIXELS_ENV}, else PIL's 89,478,485)")


def check_pixel_limit() -> None:
    """Refuses an ``ASL_MAX_PIXELS`` that is no pixel count in one line, before any long work (the decoder would
    ignore it)."""
    try:
        pixel_limit(os.environ.get(MAX_PIXELS_ENV))
    except ValueError as exc:
        raise UsageError(f"the environment variable {MAX_PIXELS_ENV}: {exc}") from None


def check_data(data: str, dataset: str) -> None:
    """DATA is a readable folder, unless it is generated on first use (synthetic) or shards served over HTTP or by a
    command (webdataset), which are checked when their index is read."""
    if dataset == "webdataset" and is_remote_data(data):
        return
    check_data_dir(data, generated=dataset == "synthetic")


def data_options(split_flag: str, split_help: str) -> ArgumentParser:
    p = ArgumentParser(add_help=False)
    p.add_argument("data", type=str, metavar="DATA",
                   help="dataset root (layouts: Datasets.md); webdataset: shard folder, http(s) URL or pipe:COMMAND")
    p.add_argument("--dataset", type=str, default="coco", help=f"one of {', '.join(DATASET_NAMES)}")
    p.add_argument(split_flag, type=str, default=None, help=split_help)
    p.add_argument("--num-classes", type=positive_int, default=None,
                   help="optional check: must match the dataset (and the checkpoint)")
    p.add_argument("-p", "--print-freq", type=positive_int, default=64, help="progress line every N batches/steps")
    p.add_argument("--cache-dir", type=str, default=None, help="cache of resized images (faster later passes)")
    p.add_argument("--strict-data", action="store_true", help="fail on an unreadable image instead of skipping it")
    p.add_argument("--dataset-option", type=str, action="append", default=[], metavar="KEY=VALUE",
                   help="extra dataset option (e.g. csv_file=..., synthetic num_train=64); repeatable")
    add_max_pixels(p)
    return p


#: create_dataset's arguments that every script sets itself, and the flag that sets each (None: no flag). Given again
#: with --dataset-option they would reach create_dataset twice (a TypeError), or silently override the flag.
_SET_BY_EVERY_SCRIPT = {"name": "--dataset", "root": "DATA", "split": None, "image_size": "--image-size",
                        "train": None, "cache_dir": "--cache-dir", "strict": "--strict-data", "with_index": None}


def dataset_options(items: Sequence[str], prog: str,
                    set_by_script: Optional[Mapping[str, Optional[str]]] = None) -> dict[str, Any]:
    """``--dataset-option`` as a dict; malformed ones, and those the script sets itself (``set_by_script``: more of
    them, with their flags), are one-line errors."""
    options = parse_key_values(items)
    taken = {**_SET_BY_EVERY_SCRIPT, **(set_by_script or {})}
    for key in options:
        if key in taken:
            flag = taken[key]
            raise UsageError(f"--dataset-option {key}: {prog} sets it itself"
                             + (f"; give {flag} instead" if flag else ""))
    return options


#: the largest --seed: torch's generators take 64 bits, and the data order seeds one with --seed + epoch.
MAX_SEED = 2**32 - 1


def _seed(text: str) -> int:
    value = nonnegative_int(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_SEED}, got {value}")
    return value


def recipe_options() -> ArgumentParser:
    """The training recipe's numbers; the defaults are the original's."""
    p = ArgumentParser(add_help=False)
    p.add_argument("--lr", type=learning_rate, default=1e-4, help="peak learning rate of OneCycleLR")
    p.add_argument("--epochs", type=positive_int, default=80, help="length of the OneCycleLR schedule")
    p.add_argument("--stop-epoch", type=nonnegative_int, default=40,
                   help="stop after this epoch (inclusive, counted from 0); the schedule keeps --epochs")
    p.add_argument("--ema-decay", type=probability, default=0.9997,
                   help="weight of the old average in the EMA of the weights, updated every step")
    p.add_argument("--weight-decay", type=nonnegative_float, default=1e-4,
                   help="L2 on conv/linear weights (not biases/norms)")
    p.add_argument("--gamma-neg", type=nonnegative_float, default=4.0, help="ASL focusing of the negatives")
    p.add_argument("--gamma-pos", type=nonnegative_float, default=0.0, help="ASL focusing of the positives")
    p.add_argument("--clip", type=margin, default=0.05, help="probability margin of the negatives (0 = off)")
    p.add_argument("--seed", type=_seed, default=0, help="seeds initialisation, data order and augmentation")
    return p
