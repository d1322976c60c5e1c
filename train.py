"""Train a multi-label classifier with the Asymmetric Loss, with the paper's recipe by default.

    python train.py /data/coco --model-path tresnet_m_miil_in21k.pth          # one GPU (or CPU)
    torchrun --nproc_per_node=8 train.py /data/coco --model-path ...          # several GPUs, same recipe

Recipe (original train.py): Adam lr 1e-4 with weight decay 1e-4 on weights only, OneCycleLR over 80 epochs
stopped after epoch 40, batch 128, image 224, AMP, EMA 0.9997, ASL(gamma_neg=4, gamma_pos=0, clip=0.05) summed;
both the regular and the EMA model are evaluated after every epoch.

Outputs in --output-dir (rank 0 alone writes):
- model-highest.pth, whenever the mAP improves: model-zoo format (``model``, ``num_classes``, ``idx_to_class``)
  plus ``model_name``, ``image_size``, ``bottleneck_head``, ``args``, ``weights`` ('ema' or 'regular': the ones
  that scored), ``mAP``, ``epoch``. Loads in validate.py and infer.py as is.
- last.pth, atomically at the end of every epoch, every --save-every-steps steps, and on SIGINT/SIGTERM: model,
  EMA, optimizer, scheduler, scaler, the position (``epoch``, ``step`` = the next step to run), RNG states, args.
- log.txt, one JSON object per epoch: epoch, train_loss, mAP_regular, mAP_ema, mAP, highest_mAP, lr,
  images_per_sec, steps, skipped_images, time.  args.json: the arguments.

Resume (--resume PATH|auto) continues the same schedule; with the same seed on CPU the final weights are
bit-identical to an uninterrupted run (data order from (seed, epoch), augmentation from (seed, epoch, index),
batches already done in an interrupted epoch skipped). The command line's --stop-epoch applies; flags defining
the model or the schedule must match the checkpoint's.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from asl import distributed as dist_utils
from asl.checkpoint import load_checkpoint, load_model_state, make_model_checkpoint, save_checkpoint
from asl.cli import ArgumentParser, UsageError, check_data_dir, parse_key_values, run_main, setup_logging
from asl.data import DATASET_NAMES, canonical_name, create_dataset, create_loader, default_split
from asl.ema import ModelEma
from asl.engine import create_optimizer, evaluate_many, train_one_epoch
from asl.losses import AsymmetricLoss
from asl.metrics import mAP, partial_mAP
from asl.models import check_model_name, create_model
from asl.precision import amp_dtype_arg, resolve_amp_dtype

logger = logging.getLogger("train")

LAST = "last.pth"
HIGHEST = "model-highest.pth"
#: flags that define the model or the learning-rate schedule: a resumed run must use the checkpoint's values.
SCHEDULE_FLAGS = ("dataset", "train_split", "model_name", "bottleneck_head", "num_classes", "image_size",
                  "batch_size", "lr", "epochs", "max_steps_per_epoch", "weight_decay", "ema_decay", "gamma_neg",
                  "gamma_pos", "clip", "unannotated", "difficult", "seed")


# ---------------------------------------------------------------------------------------------- arguments

def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="train.py", description="Train with the Asymmetric Loss (ASL, ICCV 2021).")
    p.add_argument("data", type=str, metavar="DATA", help="dataset root (layouts: Datasets.md)")
    p.add_argument("--dataset", type=str, default="coco", help=f"one of {', '.join(DATASET_NAMES)}")
    p.add_argument("--train-split", type=str, default=None, help="default: train2014 for coco (see Datasets.md)")
    p.add_argument("--val-split", type=str, default=None, help="default: val2014 for coco (see Datasets.md)")
    p.add_argument("--model-name", type=str, default="tresnet_m", help="tresnet_m|tresnet_l|tresnet_xl|timm/<name>")
    p.add_argument("--model-path", type=str, default="",
                   help="ImageNet-pretrained backbone to start from (head.fc is skipped); '' = from scratch")
    p.add_argument("--bottleneck-head", action="store_true", help="TResNet head Linear->512->classes (Open Images)")
    p.add_argument("--num-classes", type=int, default=None, help="must match the dataset (default: the dataset's)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of OneCycleLR")
    p.add_argument("-b", "--batch-size", type=int, default=128, help="global batch size (split across ranks)")
    p.add_argument("-j", "--workers", type=int, default=8, help="data loading workers per process")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=80, help="length of the OneCycleLR schedule")
    p.add_argument("--stop-epoch", type=int, default=40,
                   help="stop after this epoch (inclusive, counted from 0); the schedule keeps --epochs")
    p.add_argument("--ema-decay", type=float, default=0.9997)
    p.add_argument("--weight-decay", type=float, default=1e-4, help="L2 on conv/linear weights (not biases/norms)")
    p.add_argument("--gamma-neg", type=float, default=4.0)
    p.add_argument("--gamma-pos", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=0.05, help="probability margin of the negatives (0 = off)")
    p.add_argument("--seed", type=int, default=0, help="seeds initialisation, data order and augmentation")
    p.add_argument("--output-dir", type=str, default="models")
    p.add_argument("--resume", type=str, default="", help="PATH of a last.pth, or 'auto' (OUTPUT_DIR/last.pth if any)")
    p.add_argument("--device", type=str, default="auto", help="auto|cpu|cuda|cuda:N")
    p.add_argument("--amp-dtype", type=amp_dtype_arg, default="float16", metavar="{none,float16,bfloat16}",
                   help="autocast dtype on CUDA (CPU always trains in fp32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--print-freq", type=int, default=100, help="print the original's progress line every N steps")
    p.add_argument("--save-every-steps", type=int, default=0,
                   help="also write last.pth every N steps within an epoch (0: at epoch ends only)")
    p.add_argument("--max-steps-per-epoch", type=int, default=None,
                   help="cap the steps of each epoch (quick runs and demos; shortens the schedule accordingly)")
    p.add_argument("--tensorboard", action="store_true", help="also log to OUTPUT_DIR/tensorboard")
    p.add_argument("--strict-data", action="store_true", help="fail on an unreadable image instead of skipping it")
    p.add_argument("--cache-dir", type=str, default=None, help="cache of resized images (faster later epochs)")
    p.add_argument("--unannotated", type=str, default="negative", choices=["negative", "ignore"],
                   help="openimages: unannotated labels count as negatives, or are ignored by the loss")
    p.add_argument("--difficult", type=str, default="positive", choices=["positive", "ignore", "negative"],
                   help="voc: how 'difficult' objects enter training")
    p.add_argument("--dataset-option", type=str, action="append", default=[], metavar="KEY=VALUE",
                   help="extra dataset option (e.g. synthetic num_train=64); repeatable")
    p.add_argument("--verbose", action="store_true")
    return p


def check_args(args) -> None:
    """Rejects impossible values up front, each with one line naming the flag."""
    positive = {"--batch-size": args.batch_size, "--image-size": args.image_size, "--epochs": args.epochs,
                "--print-freq": args.print_freq}
    for flag, value in positive.items():
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if args.stop_epoch < 0:
        raise UsageError(f"--stop-epoch must be >= 0, got {args.stop_epoch}")
    if args.max_steps_per_epoch is not None and args.max_steps_per_epoch < 1:
        raise UsageError(f"--max-steps-per-epoch must be >= 1, got {args.max_steps_per_epoch}")
    if args.save_every_steps < 0:
        raise UsageError(f"--save-every-steps must be >= 0, got {args.save_every_steps}")
    if not args.lr > 0 or not math.isfinite(args.lr):
        raise UsageError(f"--lr must be a positive number, got {args.lr}")
    if not 0 <= args.ema_decay <= 1:
        raise UsageError(f"--ema-decay must be within [0, 1], got {args.ema_decay}")
    check_model_name(args.model_name)
    check_data_dir(args.data, generated=canonical_name(args.dataset) == "synthetic")
    parse_key_values(args.dataset_option)


def dataset_options(args, train: bool) -> dict[str, Any]:
    options: dict[str, Any] = {"seed": args.seed, "strict": args.strict_data, "with_index": True}
    if args.dataset == "openimages" and train:
        options["unannotated"] = args.unannotated
    if args.dataset == "voc" and train:
        options["difficult"] = args.difficult
    options.update(parse_key_values(args.dataset_option))
    return options


def loss_mask_mode(args) -> Optional[str]:
    """'ignore' when training targets can hold -1 (not annotated / difficult), so the loss masks them."""
    if (args.dataset == "openimages" and args.unannotated == "ignore") or \
            (args.dataset == "voc" and args.difficult == "ignore"):
        return "ignore"
    return None


# ------------------------------------------------------------------------------------------- output files

def check_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UsageError(f"output directory is not writable: {path} ({exc.strerror or exc})") from None


def plain_args(args) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items()}


def rng_state() -> dict[str, Any]:
    """Global RNG states (nothing in the recipe draws from them after setup, but user code may)."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                       "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class StopFlag:
    """SIGINT/SIGTERM: finish the current step, save last.pth, exit cleanly. A second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("%s received: stopping after the current step and saving %s",
                       signal.Signals(signum).name, LAST)

    def __enter__(self) -> "StopFlag":
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (e.g. called from a test thread): no signal handling
            self._previous.clear()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def __call__(self) -> bool:
        return self.requested


# -------------------------------------------------------------------------------------------------- resume

def resolve_resume(args, output_dir: Path) -> Optional[str]:
    if not args.resume:
        return None
    if args.resume == "auto":
        path = output_dir / LAST
        if not path.is_file():
            logger.info("--resume auto: no %s yet, starting a new run", path)
            return None
        return str(path)
    if not os.path.isfile(args.resume):
        raise UsageError(f"--resume: checkpoint not found: {args.resume}")
    return args.resume


def check_resume_compatible(saved: dict[str, Any], args, path: str) -> None:
    for key in SCHEDULE_FLAGS:
        if key in saved and saved[key] != getattr(args, key):
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"--resume {path}: it was trained with {flag} {saved[key]!r} but this run has "
                             f"{flag} {getattr(args, key)!r}; flags defining the model or schedule must match "
                             f"(start a new --output-dir to train differently)")


# ------------------------------------------------------------------------------------------------- training

def train(args) -> int:
    check_args(args)
    args.dataset = canonical_name(args.dataset)
    args.train_split = args.train_split or default_split(args.dataset, True)
    args.val_split = args.val_split or default_split(args.dataset, False)
    info = dist_utils.init_distributed(args.device)
    main_proc = info.is_main
    setup_logging(args.verbose, main_proc)
    device = info.device
    if args.batch_size % info.world_size:
        raise UsageError(f"-b {args.batch_size} is not divisible by the {info.world_size} processes")
    local_batch = args.batch_size // info.world_size
    amp_dtype = resolve_amp_dtype(args.amp_dtype, device)

    output_dir = Path(args.output_dir)
    problem = None
    if main_proc:
        try:
            check_output_dir(output_dir)
        except UsageError as exc:
            problem = str(exc)
    problem = dist_utils.broadcast_object(problem)
    if problem:
        raise UsageError(problem)

    resume_path = resolve_resume(args, output_dir)
    resume = load_checkpoint(resume_path) if resume_path else None
    if resume is not None and ("optimizer" not in resume or "args" not in resume):
        raise UsageError(f"--resume {resume_path}: not a last.pth written by train.py (use --model-path for "
                         f"pretrained weights)")

    # ---- data
    try:
        train_ds = create_dataset(args.dataset, args.data, args.train_split, args.image_size, train=True,
                                  cache_dir=args.cache_dir, **dataset_options(args, train=True))
        val_ds = create_dataset(args.dataset, args.data, args.val_split, args.image_size, train=False,
                                cache_dir=args.cache_dir, **dataset_options(args, train=False))
    except TypeError as exc:  # an unknown --dataset-option
        raise UsageError(str(exc)) from None
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise UsageError(f"empty dataset: {len(train_ds)} training and {len(val_ds)} validation images in {args.data}")
    num_classes = train_ds.num_classes
    if args.num_classes is not None and args.num_classes != num_classes:
        raise UsageError(f"--num-classes {args.num_classes} contradicts the dataset, which has {num_classes} classes")
    if val_ds.num_classes != num_classes:
        raise UsageError(f"the {args.train_split} and {args.val_split} splits disagree on the classes "
                         f"({num_classes} vs {val_ds.num_classes})")
    args.num_classes = num_classes
    if resume is not None:
        check_resume_compatible(resume["args"], args, resume_path)

    pin = device.type == "cuda"
    train_sampler = dist_utils.ResumableDistributedSampler(train_ds, num_replicas=info.world_size, rank=info.rank,
                                                           shuffle=True, seed=args.seed)
    train_loader = create_loader(train_ds, local_batch, sampler=train_sampler, num_workers=args.workers,
                                 seed=args.seed, pin_memory=pin, persistent_workers=True)
    val_sampler = (torch.utils.data.DistributedSampler(val_ds, num_replicas=info.world_size, rank=info.rank,
                                                       shuffle=False) if info.distributed else None)
    val_loader = create_loader(val_ds, local_batch, sampler=val_sampler, num_workers=args.workers,
                               seed=args.seed, pin_memory=pin, persistent_workers=True)
    steps_per_epoch = len(train_loader)
    if args.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, args.max_steps_per_epoch)

    # ---- model, EMA, optimizer, schedule
    torch.manual_seed(args.seed)
    # A resumed run takes every weight from last.pth, so the pretrained file is only read for a new run.
    pretrained = args.model_path if args.model_path and resume is None else None
    model = create_model(args.model_name, num_classes, bottleneck_head=args.bottleneck_head, pretrained=pretrained)
    if pretrained:
        logger.info("backbone initialised from %s", pretrained)
    elif resume is None and args.dataset != "synthetic" and main_proc:
        # original: train.py always started from ImageNet weights; the paper's numbers need them.
        logger.warning("training %s from scratch (no --model-path): the paper's numbers start from ImageNet-"
                       "pretrained weights, see MODEL_ZOO.md", args.model_name)
    model.to(device)
    ema = ModelEma(model, args.ema_decay)  # original: the EMA starts from the (pretrained) model
    optimizer = create_optimizer(model, lr=args.lr, weight_decay=args.weight_decay)
    # original: OneCycleLR(max_lr=lr, steps_per_epoch=len(train_loader), epochs=80, pct_start=0.2), stepped
    # every iteration; the run stops after --stop-epoch but the schedule keeps its full length.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, steps_per_epoch=steps_per_epoch,
                                                    epochs=args.epochs, pct_start=0.2)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    criterion = AsymmetricLoss(gamma_neg=args.gamma_neg, gamma_pos=args.gamma_pos, clip=args.clip,
                               disable_torch_grad_focal_loss=True)  # original: summed, fp32

    start_epoch, start_step, highest = 0, 0, 0.0
    if resume is not None:
        if resume.get("steps_per_epoch") != steps_per_epoch:
            raise UsageError(f"--resume {resume_path}: {resume.get('steps_per_epoch')} steps per epoch were saved but "
                             f"this run has {steps_per_epoch} (different data or number of images)")
        load_model_state(model, resume["model"], args.model_name)  # a clear error if it does not fit
        # ...then everything, counters included (load_model_state skips num_batches_tracked): exact resume.
        model.load_state_dict(resume["model"])
        ema.load_state_dict(resume["ema"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if resume["scaler"] or not scaler.is_enabled():  # empty when saved without fp16 (CPU, bfloat16)
            scaler.load_state_dict(resume["scaler"])
        start_epoch, start_step = int(resume["epoch"]), int(resume["step"])
        highest = float(resume.get("highest_mAP", 0.0))
        set_rng_state(resume["rng"])
        if main_proc:
            print(f"resumed from {resume_path} at epoch {start_epoch}, step {start_step} "
                  f"(highest_mAP = {highest:.2f})", flush=True)

    train_model: torch.nn.Module = model
    if info.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)

    if main_proc:
        with open(output_dir / "args.json", "w") as f:
            json.dump(plain_args(args), f, indent=2)
    writer = None
    if args.tensorboard and main_proc:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
        writer = SummaryWriter(str(output_dir / "tensorboard"))

    def save_last(epoch: int, step: int, synced: bool = False) -> None:
        """last.pth: resume position (epoch, step) = the next step to run.

        ``synced``: the ranks' weights were already made identical (right after evaluation), skip the broadcast.
        """
        if not synced:
            dist_utils.broadcast_module_state(model)
            dist_utils.broadcast_module_state(ema.module)
        if not main_proc:
            return
        save_checkpoint({
            "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch, "step": step,
            "steps_per_epoch": steps_per_epoch, "highest_mAP": highest, "rng": rng_state(), "args": plain_args(args),
            "num_classes": num_classes, "idx_to_class": train_ds.idx_to_class(), "model_name": args.model_name,
        }, output_dir / LAST)

    if main_proc:
        logger.info("%s: %d training / %d validation images, %d classes; %s on %s x%d, %d steps per epoch",
                    args.dataset, len(train_ds), len(val_ds), num_classes, args.model_name, device,
                    info.world_size, steps_per_epoch)
    mask_mode = loss_mask_mode(args)
    if main_proc and (start_epoch >= args.epochs or start_epoch > args.stop_epoch):
        print(f"nothing to train: the run is at epoch {start_epoch} (--epochs {args.epochs}, --stop-epoch "
              f"{args.stop_epoch}); raise --stop-epoch to continue", flush=True)
    with StopFlag() as stop_flag:
        for epoch in range(start_epoch, args.epochs):
            if epoch > args.stop_epoch:  # original: `if epoch > Stop_epoch: break`
                break
            first = start_step if epoch == start_epoch else 0
            train_sampler.set_epoch(epoch)
            train_sampler.set_start(first * local_batch)
            train_ds.set_epoch(epoch)
            progress = _Progress(epoch, args, steps_per_epoch, first, enabled=main_proc)

            def on_step(state: dict[str, Any]) -> None:
                progress.update(state)
                done = state["step"] + 1
                if args.save_every_steps and done % args.save_every_steps == 0 and done < steps_per_epoch:
                    save_last(epoch, done)

            try:
                stats = train_one_epoch(train_model, train_loader, criterion, optimizer, scheduler, scaler, ema,
                                        device, epoch, amp_dtype=amp_dtype, start_step=first,
                                        max_steps=steps_per_epoch, world_size=info.world_size,
                                        unannotated=mask_mode, on_step=on_step, stop_requested=stop_flag)
            finally:
                progress.close()
            if stats["interrupted"]:
                save_last(epoch, stats["next_step"])
                if main_proc:
                    print(f"interrupted at epoch {epoch}, step {stats['next_step']}: state saved to "
                          f"{output_dir / LAST}; continue with --resume auto", flush=True)
                break

            # ---- evaluation of the regular and the EMA model (original: validate_multi)
            dist_utils.broadcast_module_state(model)
            dist_utils.broadcast_module_state(ema.module)
            out = evaluate_many({"regular": model, "ema": ema.module}, val_loader, device, amp_dtype=amp_dtype)
            metric = partial_mAP if (out["targets"] < 0).any() else mAP
            map_regular = metric(out["targets"], out["scores"]["regular"])
            map_ema = metric(out["targets"], out["scores"]["ema"])
            # original: validate_multi returns max(mAP regular, mAP EMA)
            current = max(map_regular, map_ema)
            best_is_ema = map_ema > map_regular
            improved = current > highest
            if improved:
                highest = current
                if main_proc:
                    weights = ema.state_dict() if best_is_ema else model.state_dict()
                    save_checkpoint(make_model_checkpoint(
                        weights, num_classes, train_ds.idx_to_class(), model_name=args.model_name,
                        image_size=args.image_size, bottleneck_head=args.bottleneck_head, args=plain_args(args),
                        weights="ema" if best_is_ema else "regular", mAP=current, epoch=epoch),
                        output_dir / HIGHEST)
            save_last(epoch + 1, 0, synced=True)
            if main_proc:
                print(f"mAP score regular {map_regular:.2f}, mAP score EMA {map_ema:.2f}", flush=True)
                print(f"current_mAP = {current:.2f}, highest_mAP = {highest:.2f}", flush=True)
                record = {"epoch": epoch, "train_loss": stats["loss"], "mAP_regular": map_regular, "mAP_ema": map_ema,
                          "mAP": current, "highest_mAP": highest, "lr": stats["lr"],
                          "images_per_sec": stats["images_per_sec"], "steps": stats["steps"],
                          "skipped_images": stats["skipped"] + out["skipped"], "time": time.time()}
                with open(output_dir / "log.txt", "a") as f:
                    f.write(json.dumps(record) + "\n")
                if writer is not None:
                    for key in ("train_loss", "mAP_regular", "mAP_ema", "lr", "images_per_sec"):
                        writer.add_scalar(key, record[key], epoch)
                    writer.flush()
            if stop_flag.requested:
                break
    if writer is not None:
        writer.close()
    return 0


class _Progress:
    """The tqdm bar of one epoch (interactive terminals only) and the original's progress line."""

    def __init__(self, epoch: int, args, steps: int, first: int, enabled: bool) -> None:
        self.epoch, self.args, self.steps, self.enabled = epoch, args, steps, enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=steps, initial=first, desc=f"epoch {epoch}", dynamic_ncols=True, leave=False)

    def update(self, state: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{state['loss']:.1f}", lr=f"{state['lr']:.1e}",
                                 img_s=f"{state['images_per_sec']:.0f}", refresh=False)
        step = state["step"]
        if step % self.args.print_freq == 0:
            # original: 'Epoch [e/E], Step [iii/NNN], LR x.xe-xx, Loss: y.y' every 100 steps
            line = (f"Epoch [{self.epoch}/{self.args.epochs}], Step [{str(step).zfill(3)}/"
                    f"{str(self.steps).zfill(3)}], LR {state['lr']:.1e}, Loss: {state['loss']:.1f}")
            if self.bar is not None:
                self.bar.write(line)
            else:
                print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return train(args)
    finally:
        dist_utils.destroy_distributed()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit code (0 done or cleanly interrupted, 2 bad input, 1 other errors)."""
    return run_main(_main, argv, prog="train.py")


if __name__ == "__main__":
    sys.exit(main())
