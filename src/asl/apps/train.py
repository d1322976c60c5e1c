"""``train.py``: train a multi-label classifier with the Asymmetric Loss; the defaults are the paper's recipe.

Reads top to bottom: :func:`main` parses the options (:mod:`asl.apps.train_options`) and :func:`train` runs them:
processes, output folder, resume, data, state, :func:`asl.training.loop.fit`. Outputs, resume and the recipe (the
original's numbers are the defaults): README "Reproducing the paper".
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

from asl import distributed as dist_utils
from asl.cli import run_main, setup_logging
from asl.data import create_dataset, create_loader
from asl.data.base import stop_loader_workers
from asl.data.shards_read import ShardDataset, create_shard_loader
from asl.errors import UsageError
from asl.class_prior import PriorEstimate, prior_csv_text
from asl.data.partial import has_unknown_labels, parse_simulation, simulate_partial_dataset
from asl.losses import AsymmetricLoss, PartialSelectiveLoss
from asl.models import create_model
from asl.models.loading import load_model_state
from asl.models.ml_decoder import DEFAULT_EMBEDDING, MLDecoder
from asl.precision import amp_dtype_name, resolve_amp_dtype
from asl.sources import is_remote
from asl.training.loop import FitConfig, FitOutcome, fit
from asl.training.run_folder import RunFolder
from asl.training.state import (TrainState, check_resume_compatible, check_same_data, create_train_state,
                                data_fingerprint)
from asl.training.step import StepConfig

from .options import check_pixel_limit, dataset_options
from .progress import EpochProgress
from .train_options import SET_BY_TRAIN, TrainOptions, build_parser, parse_options

__all__ = ["main", "train", "build_parser", "parse_options", "TrainOptions"]

logger = logging.getLogger("train")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit code: 0 (done or cleanly interrupted), 2 for bad input (one line), 1 for a bug (traceback)."""
    code = run_main(lambda args: train(parse_options(args)), argv, prog="train.py")
    if code:
        stop_loader_workers()  # a failed run's loader workers would block the exit (asl.data.base)
    return code


def train(options: TrainOptions) -> int:
    """Runs ``options`` to the end of ``--stop-epoch`` (or a clean interruption); returns the exit code."""
    check_pixel_limit()
    output_dir = Path(options.output_dir)
    # The run folder's lock is held until the run ends: a second run into the folder is refused rather than mixing
    # its files with ours.
    with _processes(options) as info, RunFolder.prepare(output_dir, info.is_main):
        resume_path = RunFolder.find_resume(options.resume, output_dir)
        resume = RunFolder.load_resume(resume_path) if resume_path else None
        train_ds, val_ds = build_datasets(options)
        prepare_partial_labels(options, train_ds, info.is_main)
        criterion = build_criterion(options, train_ds.num_classes, info.device)
        amp_dtype = resolve_amp_dtype(options.amp_dtype, info.device)
        # What ran, not "auto"; the class count is the dataset's.
        options = dataclasses.replace(options, num_classes=train_ds.num_classes, amp_dtype=amp_dtype_name(amp_dtype))
        fingerprint = data_fingerprint(options.data, options.train_split, train_ds)
        if resume is not None:
            check_resume_compatible(resume["args"], options, resume_path)
            check_same_data(resume.get("data"), fingerprint, resume_path, options.force_resume)
        local_batch = dist_utils.per_rank_batch(options.batch_size, info.world_size)
        train_loader, val_loader = build_loaders(options, train_ds, val_ds, local_batch, info)
        steps_per_epoch = min(len(train_loader), options.max_steps_per_epoch or len(train_loader))
        state = build_state(options, resume, resume_path, steps_per_epoch, amp_dtype, info)
        run_folder = RunFolder(output_dir, info.is_main, {
            "num_classes": train_ds.num_classes, "idx_to_class": train_ds.idx_to_class(),
            "model_name": options.model_name, "image_size": options.image_size,
            "bottleneck_head": options.bottleneck_head, **head_meta(state.model), "args": options.as_dict(),
            "steps_per_epoch": steps_per_epoch, "data": fingerprint})
        run_folder.begin(resumed=resume is not None, args=options.as_dict())
        config = FitConfig(options.epochs, options.stop_epoch, steps_per_epoch, local_batch, options.save_every_steps,
                           StepConfig(info.device, amp_dtype, info.world_size, _loss_mask_mode(options),
                                      steps_per_epoch, options.grad_accum_steps, print_freq=options.print_freq,
                                      rank=info.rank))
        if info.is_main:
            logger.info("%s: %d training / %d validation images, %d classes; %s with %s on %s x%d, %d steps per "
                        "epoch", options.dataset, len(train_ds), len(val_ds), train_ds.num_classes, options.model_name,
                        describe_head(state.model), info.device, info.world_size, steps_per_epoch)
        with EpochProgress(options.epochs, steps_per_epoch, options.print_freq, info.is_main, output_dir,
                           options.tensorboard) as progress:
            outcome = fit(state, train_loader, val_loader, criterion, run_folder, config, on_step=progress.step,
                          on_epoch=with_prior_file(progress.epoch, state, run_folder, train_ds.classes))
        if outcome is FitOutcome.INTERRUPTED and info.is_main:
            print(f"interrupted at epoch {state.epoch}, step {state.step}: state saved to {run_folder.last_path}; "
                  f"continue with --resume auto", flush=True)
    return 0


@contextlib.contextmanager
def _processes(options: TrainOptions) -> Iterator[dist_utils.DistInfo]:
    """The process group under torchrun (one process alone otherwise), and logging for this rank."""
    info = dist_utils.init_distributed(options.device)
    try:
        setup_logging(options.verbose, info.is_main)
        yield info
    finally:
        dist_utils.destroy_distributed()


def describe_head(model: torch.nn.Module) -> str:
    """The head a run trains, for its start line."""
    head = getattr(model, "head", None)
    if isinstance(head, MLDecoder):
        return f"the ML-Decoder head ({head.num_of_groups} groups, width {head.decoder_embedding})"
    if head is not None and hasattr(getattr(head, "fc", None), "embedding_generator"):
        return "the bottleneck head"
    return "the linear head"


def head_meta(model: torch.nn.Module) -> dict[str, Any]:
    """The checkpoint's record of the head: ``head`` and the ML-Decoder's actual sizes (queries after the cap at
    the class count), or None for the linear classifier. validate.py reads the head from the weights themselves."""
    head = getattr(model, "head", None)
    if not isinstance(head, MLDecoder):
        return {"head": None, "num_of_groups": None, "decoder_embedding": None}
    return {"head": "ml-decoder", "num_of_groups": head.num_of_groups, "decoder_embedding": head.decoder_embedding}


def build_datasets(options: TrainOptions) -> tuple[Any, Any]:
    extra = dataset_options(options.dataset_option, "train.py", SET_BY_TRAIN)
    common = {"seed": options.seed, "strict": options.strict_data, "with_index": True, "cache_dir": options.cache_dir}
    train_options = dict(common)
    if options.dataset in ("openimages", "webdataset"):
        # With --partial-loss-mode the unknown labels stay -1 for CSL's loss (original: Open Images' own too).
        train_options["unannotated"] = "ignore" if options.partial_loss_mode else options.unannotated
    if options.dataset == "voc":
        train_options["difficult"] = options.difficult
    train_ds = create_dataset(options.dataset, options.data, options.train_split, options.image_size, train=True,
                              **train_options, **extra)
    val_ds = create_dataset(options.dataset, options.data, options.val_split, options.image_size, train=False,
                            **common, **extra)
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise UsageError(f"empty dataset: {len(train_ds)} training and {len(val_ds)} validation images in "
                         f"{options.data}")
    if options.num_classes is not None and options.num_classes != train_ds.num_classes:
        raise UsageError(f"--num-classes {options.num_classes} contradicts the dataset, which has "
                         f"{train_ds.num_classes} classes")
    # The names, not only their count: the validation mAP scores column k as the k-th training class, and a csv
    # set with one file per split and no classes.txt can list as many classes under other names.
    if list(val_ds.classes) != list(train_ds.classes):
        first = next((f", first difference {a!r} vs {b!r}" for a, b in zip(train_ds.classes, val_ds.classes)
                      if a != b), "")
        raise UsageError(f"the {options.train_split} and {options.val_split} splits disagree on the classes "
                         f"({train_ds.num_classes} vs {val_ds.num_classes}{first}); give both one class list "
                         f"(csv: classes.txt, see Datasets.md)")
    return train_ds, val_ds


def prepare_partial_labels(options: TrainOptions, train_ds, is_main: bool) -> None:
    """``--simulate-partial`` hides annotations of the training set (one line says how many it kept);
    ``--unannotated ignore`` is refused on a training set without unknown labels, where it would do nothing."""
    labelled = hasattr(train_ds, "labels")  # a label table read up front (not a stream of shards)
    if options.simulate_partial:
        if not labelled:
            raise UsageError(f"--simulate-partial needs a dataset whose labels are read up front, not "
                             f"{options.dataset}")
        mode, param = parse_simulation(options.simulate_partial)
        kept, annotated = simulate_partial_dataset(train_ds, mode, param, seed=options.seed)
        if is_main:
            print(f"partial labels simulated ({mode} {param:g}): kept {100 * kept / max(annotated, 1):.1f}% of "
                  f"{annotated:,} annotations", flush=True)
    if options.unannotated == "ignore" and labelled and not has_unknown_labels(train_ds):
        raise UsageError(f"--unannotated ignore: the {options.dataset} training set marks no label unknown (-1), so "
                         f"there is nothing to ignore (csv sets mark them with ?name, see Datasets.md)")


def build_criterion(options: TrainOptions, num_classes: int, device: torch.device) -> torch.nn.Module:
    """ASL, or with ``--partial-loss-mode`` CSL's loss; a class prior of another length is refused in one line."""
    if options.partial_loss_mode is None:
        return AsymmetricLoss(gamma_neg=options.gamma_neg, gamma_pos=options.gamma_pos, clip=options.clip,
                              disable_torch_grad_focal_loss=True)  # original: summed, fp32
    criterion = PartialSelectiveLoss(gamma_pos=options.gamma_pos, gamma_neg=options.gamma_neg,
                                     gamma_unann=options.gamma_unann, alpha_pos=options.alpha_pos,
                                     alpha_neg=options.alpha_neg, alpha_unann=options.alpha_unann, clip=options.clip,
                                     partial_loss_mode=options.partial_loss_mode,
                                     likelihood_topk=options.likelihood_topk,
                                     prior_threshold=options.prior_threshold, prior=options.prior_path)
    criterion.check_num_classes(num_classes)
    return criterion.to(device)  # the prior's buffer: moved once, not copied every step


#: the class prior a run with --partial-loss-mode writes each epoch (original: ComputePrior.save_prior)
PRIOR_FILE = "prior.csv"


def with_prior_file(on_epoch, state: TrainState, run_folder: RunFolder, classes):
    """``on_epoch``, preceded by the writing of ``prior.csv`` when the run estimates the class prior. Every process
    runs it: the estimate is summed over all of them."""
    if state.prior is None:
        return on_epoch

    def write_prior_then(record):
        mean = state.prior.mean()
        if mean is not None:
            run_folder.write_text(PRIOR_FILE, prior_csv_text(classes, mean.tolist()))
        on_epoch(record)

    return write_prior_then


def build_loaders(options: TrainOptions, train_ds, val_ds, local_batch: int,
                  info: dist_utils.DistInfo) -> tuple[Any, Any]:
    pin = info.device.type == "cuda"
    if isinstance(train_ds, ShardDataset):
        # Shards split themselves between ranks and workers (no sampler): see asl.data.shards_read.
        return tuple(create_shard_loader(ds, local_batch, rank=info.rank, world_size=info.world_size,
                                         num_workers=options.workers, seed=options.seed, pin_memory=pin,
                                         persistent_workers=True) for ds in (train_ds, val_ds))
    train_sampler = dist_utils.ResumableDistributedSampler(train_ds, num_replicas=info.world_size, rank=info.rank,
                                                           shuffle=True, seed=options.seed)
    val_sampler = (torch.utils.data.DistributedSampler(val_ds, num_replicas=info.world_size, rank=info.rank,
                                                       shuffle=False) if info.distributed else None)
    return (create_loader(train_ds, local_batch, sampler=train_sampler, num_workers=options.workers, seed=options.seed,
                          pin_memory=pin, persistent_workers=True),
            create_loader(val_ds, local_batch, sampler=val_sampler, num_workers=options.workers, seed=options.seed,
                          pin_memory=pin, persistent_workers=True))


def build_state(options: TrainOptions, resume: Optional[dict], resume_path: Optional[str], steps_per_epoch: int,
                amp_dtype: Optional[torch.dtype], info: dist_utils.DistInfo) -> TrainState:
    torch.manual_seed(options.seed)
    # A resumed run takes every weight from last.pth, so the pretrained file is only read for a new run.
    pretrained = options.model_path if options.model_path and resume is None else None
    # Under torchrun, rank 0 downloads a remote source into the cache while the others wait, then they read it.
    with dist_utils.main_process_first(info, enabled=is_remote(pretrained)):
        model = create_model(options.model_name, options.num_classes, bottleneck_head=options.bottleneck_head,
                             head=options.head,
                             num_of_groups=options.num_of_groups if options.head else -1,
                             decoder_embedding=options.decoder_embedding if options.head else DEFAULT_EMBEDDING,
                             pretrained=pretrained, image_size=options.image_size)
    if pretrained:
        logger.info("backbone initialised from %s", pretrained)
    elif resume is None and options.dataset != "synthetic" and info.is_main:
        logger.warning("training %s from scratch (no --model-path): the paper's numbers (and the original's "
                       "default) start from ImageNet-pretrained weights, see MODEL_ZOO.md", options.model_name)
    # Training keeps channels_last unless --no-channels-last: TResNet's training step is faster in NHWC on both devices.
    layout = torch.preserve_format if options.channels_last is False else torch.channels_last
    model = model.to(info.device, memory_format=layout)
    state = create_train_state(model, lr=options.lr, weight_decay=options.weight_decay,
                               ema_decay=options.ema_decay, epochs=options.epochs, steps_per_epoch=steps_per_epoch,
                               amp_dtype=amp_dtype, device=info.device)
    if options.partial_loss_mode is not None:
        # original: ComputePrior, the mean training output since the run started; kept in last.pth to resume
        state.prior = PriorEstimate(options.num_classes, info.device, holds_total=info.is_main,
                                    reduce=dist_utils.all_reduce_sum if info.distributed else None)
    if resume is not None:
        if resume.get("steps_per_epoch") != steps_per_epoch:
            raise UsageError(f"--resume {resume_path}: {resume.get('steps_per_epoch')} steps per epoch were saved "
                             f"but this run has {steps_per_epoch} (different data or number of images)")
        load_model_state(model, resume["model"], options.model_name)  # a clear error if it does not fit
        state.load_state_dict(resume)
        if info.is_main:
            print(f"resumed from {resume_path} at epoch {state.epoch}, step {state.step} "
                  f"(highest_mAP = {state.highest:.2f})", flush=True)
    if info.distributed:
        state.train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if options.compile:
        state.train_model = torch.compile(state.forward_model)
    return state


def _loss_mask_mode(options: TrainOptions) -> Optional[str]:
    """What the ASL loss does with targets of -1 (not annotated, VOC difficult, hidden by --simulate-partial or a csv
    set's ?name): 'ignore' masks them, 'negative' counts them as 0. With --partial-loss-mode they reach CSL's loss
    as they are (None)."""
    if options.partial_loss_mode is not None:
        return None
    if options.unannotated == "ignore" or (options.dataset == "voc" and options.difficult == "ignore"):
        return "ignore"
    return "negative"


if __name__ == "__main__":
    sys.exit(main())
