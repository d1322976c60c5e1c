"""``train.py``: train a multi-label classifier with the Asymmetric Loss; the defaults are the paper's recipe.

Reads top to bottom: parse, set up (processes, output folder, resume), data, state, :func:`asl.training.loop.fit`.
Outputs, resume and the recipe (the original's numbers are the defaults): README "Reproducing the paper".
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from asl import distributed as dist_utils
from asl.training.run_folder import RunFolder
from asl.cli import (ArgumentParser, check_data_dir, image_size, nonnegative_int, positive_int,
                     run_main, setup_logging)
from asl.data import canonical_name, create_dataset, create_loader, default_split
from asl.data.open_images import UNANNOTATED_MODES
from asl.training.step import StepConfig
from asl.errors import UsageError
from asl.training.loop import FitConfig, fit
from asl.losses import AsymmetricLoss
from asl.models import HEADS, check_head, check_model_name, create_model
from asl.models.loading import load_model_state
from asl.models.ml_decoder import DEFAULT_EMBEDDING, MLDecoder, ml_decoder_sizes
from asl.precision import amp_dtype_name, resolve_amp_dtype
from asl.sources import is_remote
from asl.training.state import (TrainState, check_resume_compatible, check_same_data, create_train_state,
                             data_fingerprint)

from .options import data_options, dataset_options, recipe_options, runtime_options
from .progress import EpochProgress

logger = logging.getLogger("train")


def build_parser() -> ArgumentParser:
    parents = [data_options("--val-split", "default: val2014 for coco (see Datasets.md)"),
               runtime_options(batch_size=128, workers=8, amp_dtype="auto",
                               amp_help="autocast dtype; auto: float16 on CUDA (the original), fp32 on the CPU; an "
                                        "explicit value applies on any device"), recipe_options()]
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
    p.add_argument("--image-size", type=image_size, default=224)
    p.add_argument("--output-dir", type=str, default="models")
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
                   help="openimages: unannotated labels count as negatives, or are ignored by the loss")
    p.add_argument("--difficult", type=str, default="positive", choices=["positive", "ignore", "negative"],
                   help="voc: how 'difficult' objects enter training")
    p.set_defaults(print_freq=100)  # original: a progress line every 100 steps
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit code: 0 (done or cleanly interrupted), 2 for bad input (one line), 1 for a bug (traceback)."""
    return run_main(run, argv, prog="train.py")


def run(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    check_model_name(args.model_name)
    resolve_head_args(args)
    args.dataset = canonical_name(args.dataset)
    check_data_dir(args.data, generated=args.dataset == "synthetic")
    dataset_options(args.dataset_option, "train.py", _SET_BY_TRAIN)  # checked before the output folder is made
    args.train_split = args.train_split or default_split(args.dataset, True)
    args.val_split = args.val_split or default_split(args.dataset, False)
    info = dist_utils.init_distributed(args.device)
    try:
        setup_logging(args.verbose, info.is_main)
        return train(args, info)
    finally:
        dist_utils.destroy_distributed()


def train(args, info: dist_utils.DistInfo) -> int:
    output_dir = Path(args.output_dir)
    # Held until the run ends: a second run into the folder is refused rather than mixing its files with ours.
    with RunFolder.prepare(output_dir, info.is_main):
        return _train_in(output_dir, args, info)


def _train_in(output_dir: Path, args, info: dist_utils.DistInfo) -> int:
    resume_path = RunFolder.find_resume(args.resume, output_dir)
    resume = RunFolder.load_resume(resume_path) if resume_path else None
    train_ds, val_ds = build_datasets(args)
    fingerprint = data_fingerprint(args.data, args.train_split, train_ds)
    if resume is not None:
        check_resume_compatible(resume["args"], args, resume_path)
        check_same_data(resume.get("data"), fingerprint, resume_path, args.force_resume)
    local_batch = dist_utils.per_rank_batch(args.batch_size, info.world_size)
    train_loader, val_loader = build_loaders(args, train_ds, val_ds, local_batch, info)
    steps_per_epoch = min(len(train_loader), args.max_steps_per_epoch or len(train_loader))
    amp_dtype = resolve_amp_dtype(args.amp_dtype, info.device)
    args.amp_dtype = amp_dtype_name(amp_dtype)  # the checkpoint's args record what ran, not "auto"
    state = build_state(args, resume, resume_path, train_ds.num_classes, steps_per_epoch, amp_dtype, info)
    run_folder = RunFolder(output_dir, info.is_main, {
        "num_classes": train_ds.num_classes, "idx_to_class": train_ds.idx_to_class(), "model_name": args.model_name,
        "image_size": args.image_size, "bottleneck_head": args.bottleneck_head, **head_meta(state.model),
        "args": dict(vars(args)), "steps_per_epoch": steps_per_epoch, "data": fingerprint})
    run_folder.begin(resumed=resume is not None, args=vars(args))
    config = FitConfig(args.epochs, args.stop_epoch, steps_per_epoch, local_batch, args.save_every_steps,
                       StepConfig(info.device, amp_dtype, info.world_size, _loss_mask_mode(args), steps_per_epoch,
                                  args.grad_accum_steps))
    if info.is_main:
        logger.info("%s: %d training / %d validation images, %d classes; %s on %s x%d, %d steps per epoch",
                    args.dataset, len(train_ds), len(val_ds), train_ds.num_classes, args.model_name, info.device,
                    info.world_size, steps_per_epoch)
    criterion = AsymmetricLoss(gamma_neg=args.gamma_neg, gamma_pos=args.gamma_pos, clip=args.clip,
                               disable_torch_grad_focal_loss=True)  # original: summed, fp32
    with EpochProgress(args.epochs, steps_per_epoch, args.print_freq, info.is_main, output_dir,
                       args.tensorboard) as progress:
        outcome = fit(state, train_loader, val_loader, criterion, run_folder, config, on_step=progress.step,
                      on_epoch=progress.epoch)
    if outcome == "interrupted" and info.is_main:
        print(f"interrupted at epoch {state.epoch}, step {state.step}: state saved to {run_folder.last_path}; "
              f"continue with --resume auto", flush=True)
    return 0


def resolve_head_args(args) -> None:
    """One head choice in ``args.head`` (``--use-ml-decoder`` folded in), ML-Decoder's sizes filled in; conflicting
    or stray head flags are one-line errors before any data is read."""
    if args.use_ml_decoder is not None:
        chosen = "ml-decoder" if args.use_ml_decoder else None
        if args.head is not None and args.head != chosen:
            raise UsageError(f"--use-ml-decoder {args.use_ml_decoder} contradicts --head {args.head}")
        args.head = chosen
    args.head = check_head(args.head, args.bottleneck_head)
    if args.head != "ml-decoder":
        stray = [flag for flag, value in (("--num-of-groups", args.num_of_groups),
                                          ("--decoder-embedding", args.decoder_embedding)) if value is not None]
        if stray:
            raise UsageError(f"{' and '.join(stray)} apply to the ML-Decoder head only (--head ml-decoder)")
        return
    # original (ML-Decoder's train.py): --num-of-groups -1 ("full decoding") and DEFAULT_EMBEDDING's width
    args.num_of_groups = -1 if args.num_of_groups is None else args.num_of_groups
    args.decoder_embedding = DEFAULT_EMBEDDING if args.decoder_embedding is None else args.decoder_embedding
    ml_decoder_sizes(args.num_classes or 1, args.num_of_groups, args.decoder_embedding)  # bad values fail here


def head_meta(model: torch.nn.Module) -> dict[str, Any]:
    """The checkpoint's record of the head: ``head`` and the ML-Decoder's actual sizes (queries after the cap at
    the class count), or None for the linear classifier. validate.py reads the head from the weights themselves."""
    head = getattr(model, "head", None)
    if not isinstance(head, MLDecoder):
        return {"head": None, "num_of_groups": None, "decoder_embedding": None}
    return {"head": "ml-decoder", "num_of_groups": head.num_of_groups, "decoder_embedding": head.decoder_embedding}


#: dataset options that train.py sets from its own flags, beyond those every script sets
_SET_BY_TRAIN = {"seed": "--seed", "unannotated": "--unannotated", "difficult": "--difficult",
                 "split": "--train-split and --val-split"}


def build_datasets(args) -> tuple[Any, Any]:
    options = dataset_options(args.dataset_option, "train.py", _SET_BY_TRAIN)
    common = {"seed": args.seed, "strict": args.strict_data, "with_index": True, "cache_dir": args.cache_dir}
    train_options = dict(common)
    if args.dataset == "openimages":
        train_options["unannotated"] = args.unannotated
    if args.dataset == "voc":
        train_options["difficult"] = args.difficult
    train_ds = create_dataset(args.dataset, args.data, args.train_split, args.image_size, train=True,
                              **train_options, **options)
    val_ds = create_dataset(args.dataset, args.data, args.val_split, args.image_size, train=False,
                            **common, **options)
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise UsageError(f"empty dataset: {len(train_ds)} training and {len(val_ds)} validation images in {args.data}")
    if args.num_classes is not None and args.num_classes != train_ds.num_classes:
        raise UsageError(f"--num-classes {args.num_classes} contradicts the dataset, which has "
                         f"{train_ds.num_classes} classes")
    # The names, not only their count: the validation mAP scores column k as the k-th training class, and a csv
    # set with one file per split and no classes.txt can list as many classes under other names.
    if list(val_ds.classes) != list(train_ds.classes):
        first = next((f", first difference {a!r} vs {b!r}" for a, b in zip(train_ds.classes, val_ds.classes)
                      if a != b), "")
        raise UsageError(f"the {args.train_split} and {args.val_split} splits disagree on the classes "
                         f"({train_ds.num_classes} vs {val_ds.num_classes}{first}); give both one class list "
                         f"(csv: classes.txt, see Datasets.md)")
    args.num_classes = train_ds.num_classes
    return train_ds, val_ds


def build_loaders(args, train_ds, val_ds, local_batch: int, info: dist_utils.DistInfo) -> tuple[Any, Any]:
    pin = info.device.type == "cuda"
    train_sampler = dist_utils.ResumableDistributedSampler(train_ds, num_replicas=info.world_size, rank=info.rank,
                                                           shuffle=True, seed=args.seed)
    val_sampler = (torch.utils.data.DistributedSampler(val_ds, num_replicas=info.world_size, rank=info.rank,
                                                       shuffle=False) if info.distributed else None)
    return (create_loader(train_ds, local_batch, sampler=train_sampler, num_workers=args.workers, seed=args.seed,
                          pin_memory=pin, persistent_workers=True),
            create_loader(val_ds, local_batch, sampler=val_sampler, num_workers=args.workers, seed=args.seed,
                          pin_memory=pin, persistent_workers=True))


def build_state(args, resume: Optional[dict], resume_path: Optional[str], num_classes: int, steps_per_epoch: int,
                amp_dtype: Optional[torch.dtype], info: dist_utils.DistInfo) -> TrainState:
    torch.manual_seed(args.seed)
    # A resumed run takes every weight from last.pth, so the pretrained file is only read for a new run.
    pretrained = args.model_path if args.model_path and resume is None else None
    # Under torchrun, rank 0 downloads a remote source into the cache while the others wait, then they read it.
    with dist_utils.main_process_first(info, enabled=is_remote(pretrained)):
        model = create_model(args.model_name, num_classes, bottleneck_head=args.bottleneck_head, head=args.head,
                             num_of_groups=args.num_of_groups if args.head else -1,
                             decoder_embedding=args.decoder_embedding if args.head else DEFAULT_EMBEDDING,
                             pretrained=pretrained, image_size=args.image_size)
    if pretrained:
        logger.info("backbone initialised from %s", pretrained)
    elif resume is None and args.dataset != "synthetic" and info.is_main:
        logger.warning("training %s from scratch (no --model-path): the paper's numbers (and the original's "
                       "default) start from ImageNet-pretrained weights, see MODEL_ZOO.md", args.model_name)
    # Training keeps channels_last unless --no-channels-last: TResNet's training step is faster in NHWC on both devices.
    layout = torch.preserve_format if args.channels_last is False else torch.channels_last
    model = model.to(info.device, memory_format=layout)
    state = create_train_state(model, lr=args.lr, weight_decay=args.weight_decay,
                               ema_decay=args.ema_decay, epochs=args.epochs, steps_per_epoch=steps_per_epoch,
                               amp_dtype=amp_dtype, device=info.device)
    if resume is not None:
        if resume.get("steps_per_epoch") != steps_per_epoch:
            raise UsageError(f"--resume {resume_path}: {resume.get('steps_per_epoch')} steps per epoch were saved "
                             f"but this run has {steps_per_epoch} (different data or number of images)")
        load_model_state(model, resume["model"], args.model_name)  # a clear error if it does not fit
        state.load_state_dict(resume)
        if info.is_main:
            print(f"resumed from {resume_path} at epoch {state.epoch}, step {state.step} "
                  f"(highest_mAP = {state.highest:.2f})", flush=True)
    if info.distributed:
        state.train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if args.compile:
        state.train_model = torch.compile(state.forward_model)
    return state


def _loss_mask_mode(args) -> Optional[str]:
    """'ignore' when training targets can hold -1 (not annotated / difficult), so the loss masks them."""
    if (args.dataset == "openimages" and args.unannotated == "ignore") or \
            (args.dataset == "voc" and args.difficult == "ignore"):
        return "ignore"
    return None


if __name__ == "__main__":
    sys.exit(main())
