"""``train.py``'s command line: the parser, the recipe files of ``--config``, and :class:`TrainOptions`, the
options resolved once into one typed, frozen object.

A new option is one ``add_argument`` line in :func:`build_parser` and one field of :class:`TrainOptions` (its name
is the option's dest); ``args.json`` and the checkpoints record every field under that name, and a ``--config``
file may set it under that name too.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Optional, Sequence

import yaml

from asl.cli import ArgumentParser, image_size, nonnegative_int, positive_int
from asl.data import canonical_name, default_split
from asl.data.open_images import UNANNOTATED_MODES
from asl.errors import UsageError
from asl.file_kind import NotRegularFileError, open_regular
from asl.models import HEADS, check_head, check_model_name
from asl.models.ml_decoder import DEFAULT_EMBEDDING, ml_decoder_sizes

from .options import check_data, data_options, dataset_options, recipe_options, runtime_options
from .partial_options import defer_loss_defaults, partial_label_options, resolve_partial_options

__all__ = ["TrainOptions", "build_parser", "parse_options", "resolve_options", "read_config", "SET_BY_TRAIN"]

#: dataset options that train.py sets from its own flags, beyond those every script sets
SET_BY_TRAIN = {"seed": "--seed", "unannotated": "--unannotated", "difficult": "--difficult",
                "split": "--train-split and --val-split"}


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """Every option of train.py, resolved: the dataset's canonical name, both splits, the one head choice with
    ML-Decoder's sizes, and after set-up (``dataclasses.replace``) the class count and the autocast dtype that ran.
    Field names are the options' dests; see ``train.py --help`` for each."""

    # data (asl.apps.options.data_options)
    data: str
    dataset: str
    val_split: str
    num_classes: Optional[int]
    print_freq: int
    cache_dir: Optional[str]
    strict_data: bool
    dataset_option: tuple[str, ...]
    max_pixels: Optional[int]
    # runtime (asl.apps.options.runtime_options)
    batch_size: int
    workers: int
    device: str
    amp_dtype: str
    channels_last: Optional[bool]
    verbose: bool
    # recipe (asl.apps.options.recipe_options)
    lr: float
    epochs: int
    stop_epoch: int
    ema_decay: float
    weight_decay: float
    gamma_neg: float
    gamma_pos: float
    clip: float
    seed: int
    # train.py's own
    train_split: str
    model_name: str
    model_path: str
    bottleneck_head: bool
    head: Optional[str]
    use_ml_decoder: Optional[int]
    num_of_groups: Optional[int]
    decoder_embedding: Optional[int]
    image_size: int
    output_dir: str
    resume: str
    force_resume: bool
    compile: bool
    grad_accum_steps: int
    save_every_steps: int
    max_steps_per_epoch: Optional[int]
    tensorboard: bool
    unannotated: Optional[str]
    difficult: str
    # partial labels (asl.apps.partial_options); unannotated is None with --partial-loss-mode
    partial_loss_mode: Optional[str]
    gamma_unann: float
    alpha_pos: float
    alpha_neg: float
    alpha_unann: float
    likelihood_topk: int
    prior_path: Optional[str]
    prior_threshold: float
    simulate_partial: Optional[str]
    simulate_partial_type: Optional[str]
    simulate_partial_param: Optional[float]
    config: Optional[str]

    def as_dict(self) -> dict[str, Any]:
        """One flat dict keyed by the option dests (``args.json``, the checkpoints' ``args``)."""
        return dataclasses.asdict(self)


def _output_dir(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder, got '' (the default is models; '.' is this folder)")
    return text


def build_parser() -> ArgumentParser:
    parents = [data_options("--val-split", "default: val2014 for coco (see Datasets.md)"),
               runtime_options(batch_size=128, workers=8, amp_dtype="auto",
                               amp_help="autocast dtype; auto: float16 on CUDA (the original), fp32 on the CPU; an "
                                        "explicit value applies on any device"), recipe_options(),
               partial_label_options()]
    p = ArgumentParser(prog="train.py", parents=parents,
                       description="Train with the Asymmetric Loss (ASL, ICCV 2021).")
    p.add_argument("--train-split", type=str, default=None, help="default: train2014 for coco (see Datasets.md)")
    p.add_argument("--model-name", type=str, default="tresnet_m",
                   help="tresnet_m|tresnet_l|tresnet_xl|tresnet_v2_l|timm/<name>")
    p.add_argument("--model-path", type=str, default="",
                   help="ImageNet-pretrained backbone to start from, any model source (a .pth/.safetensors file, a "
                        "folder, hf-hub:timm/tresnet_m.miil_in21k, a URL; the classifier is skipped); '' = from "
                        "scratch")
    p.add_argument("--bottleneck-head", action="store_true", help="TResNet head Linear->512->classes (Open Images)")
    p.add_argument("--head", type=str, default=None, choices=list(HEADS),
                   help="classification head instead of the linear one: ml-decoder (ML-Decoder, on any backbone)")
    p.add_argument("--use-ml-decoder", type=int, default=None, choices=[0, 1],
                   help="ML-Decoder's own spelling: 1 is --head ml-decoder")
    p.add_argument("--num-of-groups", type=int, default=None,
                   help="ML-Decoder queries, at most the class count; -1: min(100, classes) (default)")
    p.add_argument("--decoder-embedding", type=int, default=None,
                   help=f"ML-Decoder width, a multiple of 8 (default {DEFAULT_EMBEDDING})")
    p.add_argument("--image-size", type=image_size, default=224,
                   help="square training and validation input side in pixels (original: 224; 448 for TResNet-L)")
    p.add_argument("--output-dir", type=_output_dir, default="models",
                   help="the run's folder: checkpoints, log.txt, args.json")
    p.add_argument("--resume", type=str, default="", help="PATH of a last.pth, or 'auto' (OUTPUT_DIR/last.pth if any)")
    p.add_argument("--force-resume", action="store_true", help="resume even if the training data differs")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--grad-accum-steps", type=positive_int, default=1,
                   help="run each batch of -b images in N micro-batches with one optimizer step: the same batch and "
                        "learning rate on a device that cannot hold the batch (BatchNorm statistics follow the "
                        "micro-batch)")
    p.add_argument("--save-every-steps", type=nonnegative_int, default=0,
                   help="also write last.pth every N steps within an epoch (0: at epoch ends only)")
    p.add_argument("--max-steps-per-epoch", type=positive_int, default=None,
                   help="cap the steps of each epoch (quick runs and demos; shortens the schedule accordingly)")
    p.add_argument("--tensorboard", action="store_true", help="also log to OUTPUT_DIR/tensorboard")
    p.add_argument("--unannotated", type=str, default="negative", choices=UNANNOTATED_MODES,
                   help="openimages and webdataset: unannotated labels (-1) count as negatives, or are ignored by "
                        "the loss")
    p.add_argument("--difficult", type=str, default="positive", choices=["positive", "ignore", "negative"],
                   help="voc: how 'difficult' objects enter training")
    p.add_argument("--config", type=str, default=None, metavar="FILE.yaml",
                   help="a recipe file (configs/): its keys are these options' dests (model_name, image_size...); "
                        "the command line overrides it, args.json records the result")
    # original: a progress line every 100 steps; the loss is read back from the device at those steps only
    p.set_defaults(print_freq=100)
    defer_loss_defaults(p)
    return p


def parse_options(argv: Optional[Sequence[str]] = None) -> TrainOptions:
    """The command line (over the ``--config`` file's values), parsed and resolved; bad input raises (argparse's
    exit 2, or a one-line ``AslError``)."""
    parser = build_parser()
    config = _config_path(argv)
    if config is not None:
        values = read_config(config, parser)
        for action in parser._actions:  # the file may give DATA, which the command line then need not
            if not action.option_strings and action.dest in values:
                action.nargs, action.required, action.default = "?", False, values.pop(action.dest)
        parser.set_defaults(**values)
        for action in parser._actions:
            # An option with an action of its own (--max-pixels puts itself in force) acts on the file's value too.
            if action.dest in values and type(action).__module__ != argparse.__name__:
                action(parser, argparse.Namespace(), values[action.dest])
    return resolve_options(parser.parse_args(argv))


def _config_path(argv: Optional[Sequence[str]]) -> Optional[str]:
    """``--config``'s value, read before the real parse (which then takes the file's values as defaults)."""
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    early.add_argument("--config", type=str, default=None)
    return early.parse_known_args(argv)[0].config


#: the largest recipe file read: a recipe is a few hundred bytes, and a FIFO or a device must not hang the run
MAX_CONFIG_BYTES = 1 << 20


def read_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The recipe file's values by option dest, each through its option's type (and choices): YAML's ``2`` is a
    fine float and its ``1e-4`` (a string to YAML) too. An unknown key or a value its option rejects is a
    :class:`UsageError` naming the file and the key."""
    raw = _load_yaml(path)
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in actions:
            raise UsageError(f"--config {path}: unknown key {key!r}: keys are train.py's option dests, such as "
                             f"model_name or image_size (see train.py --help)")
        try:
            values[name] = _config_value(actions[name], value)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            raise UsageError(f"--config {path}: {name}: {exc}") from None
    return values


def _load_yaml(path: str) -> dict[Any, Any]:
    try:
        f = open_regular(path)  # checked on the open file: a FIFO swapped in after a check cannot hang the run
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except NotRegularFileError:
        raise UsageError(f"--config {path}: not a regular file") from None
    except OSError as exc:
        raise UsageError(f"--config {path}: cannot read it ({exc})") from None
    with f:
        if os.fstat(f.fileno()).st_size > MAX_CONFIG_BYTES:
            raise UsageError(f"--config {path}: larger than {MAX_CONFIG_BYTES} bytes; a recipe is a short YAML file")
        data = f.read(MAX_CONFIG_BYTES)
    try:
        raw = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UsageError(f"--config {path}: cannot read it ({exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"--config {path}: not valid YAML{where} ({getattr(exc, 'problem', None) or exc})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UsageError(f"--config {path}: expected a mapping of option dests to values, got a YAML "
                         f"{type(raw).__name__}")
    return raw


def _config_value(action: argparse.Action, value: Any) -> Any:
    """``value`` as the command line would have given it to ``action``."""
    if action.nargs == 0:  # a switch (store_true, --x/--no-x)
        if not isinstance(value, bool) and not (value is None and action.default is None):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        items = [f"{k}={v}" for k, v in value.items()] if isinstance(value, dict) else value
        items = items if isinstance(items, list) else [items]
        return [_typed(action, item) for item in items]
    if value is None:
        if action.default is not None:
            raise ValueError("expected a value, got null")
        return None
    return _typed(action, value)


def _typed(action: argparse.Action, value: Any) -> Any:
    if isinstance(value, (dict, list)):
        raise ValueError(f"expected one value, got {value!r}")
    text = "" if value is None else str(value)
    # YAML reads yes/no/true/false as booleans: a text option would get 'True'
    if isinstance(value, bool) and action.type not in (None, str):
        raise ValueError(f"expected a {getattr(action.type, '__name__', 'value')}, got {value!r}")
    converted = action.type(text) if action.type is not None else text
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"expected one of {', '.join(map(str, action.choices))}, got {value!r}")
    return converted


def resolve_options(args: argparse.Namespace) -> TrainOptions:
    """Checks what can be checked before any work (model name, head flags, data folder, dataset options) and
    fills in what the flags leave to the dataset and the head."""
    check_model_name(args.model_name)
    dataset = canonical_name(args.dataset)
    check_data(args.data, dataset)
    dataset_options(args.dataset_option, "train.py", SET_BY_TRAIN)  # checked before the output folder is made
    return TrainOptions(**{**vars(args), **_resolve_head(args), **resolve_partial_options(args), "dataset": dataset,
                           "dataset_option": tuple(args.dataset_option),
                           "train_split": args.train_split or default_split(dataset, True),
                           "val_split": args.val_split or default_split(dataset, False)})


def _resolve_head(args: argparse.Namespace) -> dict[str, Any]:
    """One head choice (``--use-ml-decoder`` folded into ``head``), ML-Decoder's sizes filled in; conflicting or
    stray head flags are one-line errors before any data is read."""
    head = args.head
    if args.use_ml_decoder is not None:
        chosen = "ml-decoder" if args.use_ml_decoder else None
        if head is not None and head != chosen:
            raise UsageError(f"--use-ml-decoder {args.use_ml_decoder} contradicts --head {head}")
        head = chosen
    head = check_head(head, args.bottleneck_head)
    if head != "ml-decoder":
        stray = [flag for flag, value in (("--num-of-groups", args.num_of_groups),
                                          ("--decoder-embedding", args.decoder_embedding)) if value is not None]
        if stray:
            raise UsageError(f"{' and '.join(stray)} apply to the ML-Decoder head only (--head ml-decoder)")
        return {"head": head}
    # original (ML-Decoder's train.py): --num-of-groups -1 ("full decoding") and DEFAULT_EMBEDDING's width
    groups = -1 if args.num_of_groups is None else args.num_of_groups
    embedding = DEFAULT_EMBEDDING if args.decoder_embedding is None else args.decoder_embedding
    ml_decoder_sizes(args.num_classes or 1, groups, embedding)  # bad values fail here
    return {"head": head, "num_of_groups": groups, "decoder_embedding": embedding}
