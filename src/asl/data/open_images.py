"""Open Images V6 as released by MIIL (the ASL / PartialLabelingCSL download).

Layout: ``root/train/`` and ``root/test/`` (images resized to a short side of 256 by MIIL) and ``root/data.csv``
with the columns: image, a list-literal of positive MIDs, a list-literal of human-verified negative MIDs, split
(``train`` / ``test``). An image is read from ``root/<split>/<image>`` (``.jpg`` is appended to a name without
an extension).

Targets are 1 (positive), 0 (verified negative) and -1 (not annotated). Evaluation keeps -1 (use the
partial-label mAP). Training turns -1 into 0 by default (``unannotated='negative'``, the baseline) or keeps it
(``unannotated='ignore'``) so that the loss masks those entries (``mask = target >= 0``).

The class order must match the checkpoint's (9605 classes for MIIL's model). It comes from, in this order:
``idx_to_class`` (a checkpoint's ``{index: MID or name}``), ``classes_file`` (a MID,name CSV table with or
without header, one MID per line, or a ``.pth`` checkpoint holding ``idx_to_class``), a table found in ``root``
(``classes.csv``, ``class-descriptions.csv``, ``oidv6-class-descriptions.csv``), or else the sorted MIDs of
``data.csv`` (which will not line up with a released checkpoint: a warning says so).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from pathlib import Path

from ..errors import CheckpointError
from .base import DatasetError, LabelTable, MultiLabelDataset, missing_path_error, not_utf8_error, require_dir
from .miil_csv import iter_miil_csv, parse_list_literal

__all__ = ["load_open_images", "read_class_table", "resolve_unannotated", "UNANNOTATED_MODES"]

logger = logging.getLogger(__name__)

UNANNOTATED_MODES = ("negative", "ignore")
CLASS_TABLE_NAMES = ("classes.csv", "class-descriptions.csv", "oidv6-class-descriptions.csv")


def _is_mid(text: str) -> bool:
    return text.startswith("/m/") or text.startswith("/g/")


def read_class_table(path) -> list[tuple[str, str]]:
    """(MID, name) pairs from a ``MID,name`` CSV (header optional) or a one-MID-per-line text file."""
    path = Path(path)
    if path.suffix in (".pth", ".pt", ".ckpt"):
        from ..checkpoint import load_checkpoint  # the safe loader, with its messages for refused files

        try:
            checkpoint = load_checkpoint(path)
        except CheckpointError as exc:
            raise DatasetError(f"classes_file: {exc}") from None
        if "idx_to_class" not in checkpoint:
            raise DatasetError(f"no idx_to_class in checkpoint {path}")
        return [(v, v) for _, v in sorted((int(k), str(v)) for k, v in checkpoint["idx_to_class"].items())]
    try:
        return _read_class_csv(path)
    except UnicodeDecodeError as exc:
        raise not_utf8_error(path, exc) from None


def _read_class_csv(path: Path) -> list[tuple[str, str]]:
    pairs = []
    with open(path, newline="", encoding="utf-8") as f:
        for line_no, row in enumerate(csv.reader(f), 1):
            row = [cell.strip() for cell in row]
            if not row or not row[0]:
                continue
            if line_no == 1 and not _is_mid(row[0]) and row[0].lower() in ("labelname", "mid", "label", "class"):
                continue  # header
            pairs.append((row[0], row[1] if len(row) > 1 and row[1] else row[0]))
    return pairs


def _class_order(root: Path, rows, idx_to_class, classes_file) -> tuple[list[str], list[str]]:
    """(MIDs in class order, display names)."""
    table = None
    if classes_file is not None:
        path = Path(classes_file)
        if not path.is_file():
            raise missing_path_error("Open Images class table", path)
        table = read_class_table(path)
    else:
        for name in CLASS_TABLE_NAMES:
            if (root / name).is_file():
                table = read_class_table(root / name)
                break
    if idx_to_class is not None:
        if not isinstance(idx_to_class, Mapping):  # e.g. text from --dataset-option, which cannot carry a mapping
            raise DatasetError(f"idx_to_class must be a mapping {{index: class}}, not {type(idx_to_class).__name__}; "
                               f"from the command line give classes_file=FILE instead")
        order = [v for _, v in sorted((int(k), v) for k, v in idx_to_class.items())]
        name_to_mids: dict[str, list[str]] = {}
        if table is not None:
            for mid, name in table:
                name_to_mids.setdefault(name, []).append(mid)
        mids = []
        for value in order:
            if _is_mid(value):
                mids.append(value)
            elif value in name_to_mids:
                # Open Images gives some MIDs one display name ("Jaguar": the animal and the car). Mapping each
                # name to its first MID would score those classes against one MID's labels; instead the k-th time
                # a name comes in idx_to_class is its k-th MID in the table, the order train.py saved them in.
                candidates = name_to_mids[value]
                mids.append(candidates.pop(0) if len(candidates) > 1 else candidates[0])
            else:
                raise DatasetError(f"class {value!r} of idx_to_class is not a MID and not in the class table "
                                   f"(pass classes_file=<MID,name table>)")
        names_of = dict(table) if table is not None else {}
        return mids, [names_of.get(m, v) for m, v in zip(mids, order)]
    if table is not None:
        return [m for m, _ in table], [n for _, n in table]
    logger.warning("Open Images: no class table found in %s; using the sorted MIDs of data.csv, which will not "
                   "line up with a released checkpoint's classes (see Datasets.md)", root)
    mids = sorted({m for _, pos, neg, _ in rows for m in pos + neg})
    return mids, mids


def resolve_unannotated(unannotated: str | None, train: bool) -> str:
    """How targets of -1 enter: as given, else negatives in training and ignored in evaluation."""
    if unannotated is None:
        unannotated = "negative" if train else "ignore"
    if unannotated not in UNANNOTATED_MODES:
        raise DatasetError(f"unannotated must be one of {UNANNOTATED_MODES}, not {unannotated!r}")
    return unannotated


def load_open_images(root, split: str, *, train: bool, unannotated: str | None = None, classes_file=None,
                     idx_to_class=None, csv_file=None, **dataset_kwargs) -> MultiLabelDataset:
    unannotated = resolve_unannotated(unannotated, train)
    root = require_dir(root, "Open Images folder")
    csv_path = Path(csv_file) if csv_file is not None else root / "data.csv"
    if not csv_path.is_file():
        raise missing_path_error("Open Images data.csv", csv_path)
    image_dir = require_dir(root / split, "Open Images image folder")
    rows = []
    columns = ("image", "positives", "negatives", "split")
    for where, (image, pos, neg, row_split, *_) in iter_miil_csv(csv_path, columns):
        rows.append((image, parse_list_literal(pos, where), parse_list_literal(neg, where), row_split))
    mids, names = _class_order(root, rows, idx_to_class, classes_file)
    index = {m: i for i, m in enumerate(mids)}
    rel_paths, positives, negatives = [], [], []
    unknown = 0
    for image, pos, neg, row_split in rows:
        if row_split != split:
            continue
        if not Path(image).suffix:
            image += ".jpg"
        p = sorted({index[m] for m in pos if m in index})
        n = sorted({index[m] for m in neg if m in index} - set(p))
        unknown += sum(m not in index for m in pos) + sum(m not in index for m in neg)
        rel_paths.append(image)
        positives.append(p)
        negatives.append(n)
    if not rel_paths:
        raise DatasetError(f"no rows with split {split!r} in {csv_path}")
    if unknown:
        logger.warning("Open Images %s: %d labels name MIDs outside the %d classes and are ignored",
                       split, unknown, len(mids))
    fill = 0.0 if unannotated == "negative" else -1.0
    labels = LabelTable(len(mids), fill, {0.0: negatives, 1.0: positives})
    dataset = MultiLabelDataset(image_dir, rel_paths, labels, names, name="openimages", split=split, train=train,
                                **dataset_kwargs)
    dataset.mids = mids
    return dataset
