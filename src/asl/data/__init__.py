"""Datasets and the training data pipeline.

Creating a dataset
------------------
``create_dataset(name, root, split, image_size, train, cache_dir=None, **options)`` with ``name`` in
:data:`DATASET_NAMES` (``coco``, ``voc``, ``nus-wide``, ``openimages``, ``csv``, ``synthetic``, and ``webdataset``:
the shards that ``shards.py`` writes, read from a folder, an http(s) base URL or a ``pipe:`` command; see
:mod:`asl.data.shards_read`). ``split=None`` picks the dataset's usual split (:func:`default_split`). Layouts and
label conventions: Datasets.md.

Options for every dataset:

- ``seed=0``: the augmentation seed (see "Randomness");
- ``strict=False``: ``True`` raises :class:`DatasetError` on the first unreadable image instead of skipping it;
- ``with_index=False``: ``True`` makes items ``(image, target, index)`` (for evaluation in dataset order);
- ``cutout_factor=0.5``;
- ``allow_outside_root=False``: ``True`` accepts image paths that are absolute or contain ``..`` (refused by
  default, so that an annotation file cannot make the loader read files outside the dataset).

Dataset-specific options: ``voc``: ``difficult='positive'|'ignore'|'negative'`` (default positive for
training, ignore for evaluation), ``year='2007'``; ``nus-wide``: ``csv_file``, ``image_root``; ``openimages``:
``unannotated='negative'|'ignore'`` (training default negative; evaluation always keeps -1 unless told),
``classes_file``, ``idx_to_class``, ``csv_file``; ``csv``: ``classes_file``, ``image_root``; ``synthetic``:
``num_train``, ``num_val``, ``synthetic_size`` (generated picture side), ``generate_seed``, ``synthetic_classes``
(up to 36) and ``skew`` (Zipf exponent of the class frequencies; see :mod:`asl.data.synthetic`); ``webdataset``:
``unannotated='negative'|'ignore'`` (what a stored -1 becomes in training; default negative, evaluation keeps
-1), ``shuffle_buffer`` (training, samples per worker) and ``timeout`` (seconds of HTTP silence). An unknown
option raises :class:`DatasetError`.

Every dataset has ``classes`` (list of names), ``num_classes``, ``image_path(i)``, ``idx_to_class()``
(``{i: name}``, the checkpoint field), ``target(i)`` (without reading the image), ``set_epoch(epoch)``,
``num_unreadable()`` and ``num_missing`` (rows dropped at load because the file does not exist: NUS-WIDE).

Items
-----
``dataset[i]`` is

- ``(image, target)``: ``image`` a ``torch.uint8`` tensor ``(3, S, S)`` (``S = image_size``), ``target`` a
  ``torch.float32`` tensor ``(num_classes,)`` with 1 = present, 0 = absent and -1 = not annotated / ignored
  (Open Images unannotated, VOC difficult in evaluation);
- ``(image, target, index)`` with ``with_index=True`` (``index`` the int ``i``);
- ``None`` when the image cannot be read (missing, empty, truncated, not an image, decompression bomb): the
  file is named once in a logged warning (once per run, across workers and epochs) and the item is skipped. With
  ``strict=True`` a :class:`DatasetError` is raised instead.

Convert images on the device with :func:`to_float` (``x.float().div(255)``: bit-identical to torchvision's
``ToTensor``). No mean/std normalisation, as in the original.

Batches
-------
Use ``collate_fn=collate_skip`` (or :func:`create_loader`, which also sets ``seed_worker`` and a seeded
generator). A batch is a :class:`Batch` named tuple ``(images, targets, indices, skipped)``:

- ``images`` uint8 ``(N, 3, S, S)``, ``targets`` float32 ``(N, C)``, where N counts the readable items only;
- ``indices`` int64 ``(N,)`` dataset indices when the dataset has ``with_index=True``, else ``None``;
- ``skipped`` (int) the number of unreadable items dropped from this batch: sum it for the epoch summary.

``N`` can be 0 (every item of the batch unreadable): skip such a batch (``batch.images.shape[0] == 0``).

Typical loops::

    train_set = create_dataset("coco", root, None, 224, train=True, cache_dir=cache, seed=seed)
    loader = create_loader(train_set, 128, shuffle=True, num_workers=8, seed=seed)  # or a DistributedSampler
    for epoch in range(epochs):
        train_set.set_epoch(epoch)            # (and sampler.set_epoch(epoch) when distributed)
        for images, targets, _, skipped in loader:
            x = to_float(images.to(device, non_blocking=True))
            ...

    val_set = create_dataset("coco", root, None, 224, train=False, with_index=True)
    for images, targets, indices, skipped in loader_over_val_set:
        scores[indices] = model(to_float(images.to(device))).sigmoid().cpu()   # dataset order, any sharding

Randomness
----------
The training augmentation of item ``i`` in epoch ``e`` is drawn from a generator seeded by ``(seed, e, i)``
(:func:`asl.data.transforms.item_rng`), never from global state, so it is the same for any number of workers,
any worker order, and after a resume. Call ``dataset.set_epoch(e)`` before iterating the loader of epoch ``e``;
the epoch lives in shared memory, so this also reaches persistent workers. ``seed_worker`` (``worker_init_fn``)
seeds ``random``/``numpy.random`` in each worker from torch's per-worker seed for any other library.

Partial labels
--------------
``simulate_partial_labels(targets, mode, param, seed=0)`` hides annotations of fully labelled targets as CSL's
study does (``fpc``: ``param`` positives and negatives kept per class; ``rps``: each label dropped with probability
``param``); ``simulate_partial_dataset`` does it to a dataset's labels. See :mod:`asl.data.partial`.

Cache
-----
``cache_dir`` keeps the resized uint8 image of every file (keyed by path, size and mtime; atomic writes, safe to
share between workers, ranks and runs). Later epochs skip decode and resize with bit-identical pixels; the
random augmentation is still drawn every epoch. See :mod:`asl.data.cache`.
"""

from __future__ import annotations

import math

from pathlib import Path

from .base import Batch, DatasetError, LabelTable, MultiLabelDataset, collate_skip, create_loader, seed_worker
from .miil_csv import parse_list_literal
from .partial import PARTIAL_SIMULATIONS, has_unknown_labels, simulate_partial_dataset, simulate_partial_labels
from .transforms import EvalTransform, TrainTransform, UnreadableImageError, item_rng, to_float

__all__ = [
    "DATASET_NAMES",
    "create_dataset",
    "default_split",
    "canonical_name",
    "DatasetError",
    "UnreadableImageError",
    "MultiLabelDataset",
    "LabelTable",
    "Batch",
    "collate_skip",
    "create_loader",
    "seed_worker",
    "to_float",
    "item_rng",
    "TrainTransform",
    "EvalTransform",
    "parse_list_literal",
    "generate_synthetic_coco",
    "PARTIAL_SIMULATIONS",
    "simulate_partial_labels",
    "simulate_partial_dataset",
    "has_unknown_labels",
]

DATASET_NAMES = ("coco", "voc", "nus-wide", "openimages", "csv", "synthetic", "webdataset")

_ALIASES = {
    "mscoco": "coco", "ms-coco": "coco", "coco2014": "coco",
    "pascal-voc": "voc", "voc2007": "voc", "pascal_voc": "voc",
    "nus_wide": "nus-wide", "nuswide": "nus-wide",
    "open-images": "openimages", "open_images": "openimages", "oi": "openimages",
    "wds": "webdataset", "shards": "webdataset",
}

_DEFAULT_SPLITS = {
    "coco": ("train2014", "val2014"),
    "voc": ("trainval", "test"),
    "nus-wide": ("train", "val"),
    "openimages": ("train", "test"),
    "csv": ("train", "val"),
    "synthetic": ("train", "val"),
    "webdataset": ("train", "val"),
}

_COMMON_OPTIONS = ("seed", "strict", "with_index", "cutout_factor", "allow_outside_root")
_DATASET_OPTIONS = {
    "coco": (),
    "voc": ("difficult", "year"),
    "nus-wide": ("csv_file", "image_root"),
    "openimages": ("unannotated", "classes_file", "idx_to_class", "csv_file"),
    "csv": ("classes_file", "image_root"),
    "synthetic": ("num_train", "num_val", "synthetic_size", "generate_seed", "synthetic_classes", "skew"),
    "webdataset": ("unannotated", "shuffle_buffer", "timeout"),
}


def canonical_name(name: str) -> str:
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASET_NAMES:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASET_NAMES)}")
    return key


def default_split(name: str, train: bool) -> str:
    """The usual split name: coco train2014/val2014, voc trainval/test, nus-wide train/val, openimages
    train/test, csv train/val, synthetic train/val."""
    return _DEFAULT_SPLITS[canonical_name(name)][0 if train else 1]


def create_dataset(name: str, root, split: str | None, image_size: int, train: bool, cache_dir=None,
                   **options) -> MultiLabelDataset:
    """Build dataset ``name`` from ``root``; see the module docstring for options, items and batches.

    Raises :class:`DatasetError` (one line naming the expected path, pointing to Datasets.md) when a folder or
    annotation file is missing, for an unknown name and for an unknown option.
    """
    key = canonical_name(name)
    unknown = sorted(set(options) - set(_COMMON_OPTIONS) - set(_DATASET_OPTIONS[key]))
    if unknown:
        raise DatasetError(f"unknown option(s) for dataset {key!r}: {', '.join(unknown)}; "
                        f"accepted: {', '.join(_COMMON_OPTIONS + _DATASET_OPTIONS[key])}")
    if split is None:
        split = default_split(key, train)
    common = {k: options.pop(k) for k in _COMMON_OPTIONS if k in options}
    common.update(image_size=int(image_size), cache_dir=cache_dir)
    if key == "coco":
        from .coco import load_coco
        return load_coco(root, split, train=train, **common)
    if key == "voc":
        from .voc import load_voc
        return load_voc(root, split, train=train, **options, **common)
    if key == "nus-wide":
        from .nus_wide import load_nus_wide
        return load_nus_wide(root, split, train=train, **options, **common)
    if key == "openimages":
        from .open_images import load_open_images
        return load_open_images(root, split, train=train, **options, **common)
    if key == "csv":
        from .csv import load_csv
        return load_csv(root, split, train=train, **options, **common)
    if key == "webdataset":
        from .shards_read import open_shard_dataset
        # The shards hold encoded pictures read in sequence: no resize cache, and no file paths to check.
        for unused in ("cache_dir", "allow_outside_root"):
            common.pop(unused, None)
        return open_shard_dataset(str(root), split, train=train, **options, **common)
    from .coco import load_coco
    from .synthetic import SYNTHETIC_SPLITS, ensure_synthetic_coco
    if split not in SYNTHETIC_SPLITS:
        raise DatasetError(f"synthetic splits are {SYNTHETIC_SPLITS}, not {split!r}")
    gen = {"num_train": 512, "num_val": 128, "image_size": 64, "seed": 0}
    given = _synthetic_options(options)
    gen.update(given)
    ensure_synthetic_coco(Path(root), checked=tuple(given), **gen)
    dataset = load_coco(root, split, train=train, **common)
    dataset.name = "synthetic"
    return dataset


#: synthetic options: (the generator's argument, whole number or not, the lowest value it draws pictures with)
_SYNTHETIC_OPTIONS = {"num_train": ("num_train", True, 0), "num_val": ("num_val", True, 0),
                      "synthetic_size": ("image_size", True, 3), "generate_seed": ("seed", True, 0),
                      "synthetic_classes": ("num_classes", True, 1), "skew": ("skew", False, 0.0)}


def _synthetic_options(options: dict) -> dict:
    """The generator's arguments given among ``options``, each checked (a one-line error, not the generator's
    traceback, for ``num_train=abc`` or ``synthetic_size=1``)."""
    given = {}
    for key, value in options.items():
        if key not in _SYNTHETIC_OPTIONS:
            continue
        name, whole, lowest = _SYNTHETIC_OPTIONS[key]
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not number or value < lowest or (whole and value != int(value)):
            kind = "a whole number" if whole else "a number"
            raise DatasetError(f"synthetic option {key}={value!r}: expected {kind} of at least {lowest}")
        given[name] = int(value) if whole else float(value)
    return given


def generate_synthetic_coco(root, num_train: int = 512, num_val: int = 128, image_size: int = 64, seed: int = 0,
                            num_classes: int = 6, skew: float = 0.0):
    """Write the generated demo set in the COCO layout under ``root`` (see :mod:`asl.data.synthetic`)."""
    from .synthetic import generate_synthetic_coco as _generate
    return _generate(root, num_train=num_train, num_val=num_val, image_size=image_size, seed=seed,
                     num_classes=num_classes, skew=skew)
