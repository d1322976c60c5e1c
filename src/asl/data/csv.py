"""A custom multi-label dataset described by one CSV file (the "ASL on my own data" case).

::

    image,labels,split
    photos/0001.jpg,cat|dog,train
    photos/0002.jpg,car,val
    photos/0003.jpg,,train

- ``image``: a path relative to the CSV's folder (or ``image_root``); absolute paths and ``..`` need
  ``allow_outside_root=1``;
- ``labels``: class names separated by ``|`` or ``;`` (empty = no class present). For partially labelled data
  (CSL, :class:`asl.losses.PartialSelectiveLoss`) a name may carry a prefix: ``?name`` marks that label unknown
  (target -1), ``?*`` marks every class the cell does not name unknown, and ``-name`` marks an annotated
  negative (useful with ``?*``); e.g. ``cat|-dog|?*``: cat present, dog absent, every other class unknown;
- ``split`` (optional column): rows of other splits are left out; without the column every row is used.

``root`` is the CSV file itself, or a folder holding ``<split>.csv`` or ``labels.csv``. The class list is
``classes_file`` (one name per line), else ``classes.txt`` beside the CSV, else the sorted names found in the CSV
(all splits of it). With one CSV per split and no classes file the two class lists may differ: give a
``classes.txt``.
"""

from __future__ import annotations

import csv as _csv
import logging
import re
from pathlib import Path

from .base import DatasetError, LabelTable, MultiLabelDataset, missing_path_error, not_utf8_error

__all__ = ["load_csv", "read_classes_file"]

logger = logging.getLogger(__name__)

_SEPARATORS = re.compile(r"[|;]")


def read_classes_file(path) -> list[str]:
    try:
        names = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise not_utf8_error(path, exc) from None
    names = [n for n in names if n]
    if len(set(names)) != len(names):
        raise DatasetError(f"duplicate class names in {path}")
    return names


def _find_csv(root: Path, split: str | None) -> Path:
    if root.is_file():
        return root
    if not root.is_dir():
        raise missing_path_error("CSV dataset file or folder", root)
    for name in ([f"{split}.csv"] if split else []) + ["labels.csv"]:
        if (root / name).is_file():
            return root / name
    raise missing_path_error("CSV dataset file", root / (f"{split}.csv" if split else "labels.csv"))


_UNKNOWN, _NEGATIVE, _ALL_OTHERS = "?", "-", "?*"


def _split_cell(cell: str) -> tuple[list[str], list[str], list[str], bool]:
    """``(positives, negatives, unknown, others unknown)`` named in one ``labels`` cell."""
    positives, negatives, unknown, others = [], [], [], False
    for name in (n.strip() for n in _SEPARATORS.split(cell or "")):
        if not name:
            continue
        if name == _ALL_OTHERS:
            others = True
        elif name.startswith(_UNKNOWN) and name[1:].strip():
            unknown.append(name[1:].strip())
        elif name.startswith(_NEGATIVE) and name[1:].strip():
            negatives.append(name[1:].strip())
        else:
            positives.append(name)
    return positives, negatives, unknown, others


def _read_rows(csv_path: Path) -> tuple[list, list[str]]:
    """``(image, labels cell parts, split, line number)`` per row, and the lower-cased header."""
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = _csv.DictReader(f)
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
        if "image" not in header or "labels" not in header:
            raise DatasetError(f"{csv_path} needs a header 'image,labels[,split]' (found {reader.fieldnames})")
        reader.fieldnames = header
        rows = []
        for line_no, row in enumerate(reader, 2):
            image = (row.get("image") or "").strip()
            if not image:
                raise DatasetError(f"empty image path at {csv_path}:{line_no}")
            rows.append((image, _split_cell(row.get("labels") or ""), (row.get("split") or "").strip(), line_no))
    return rows, header


def load_csv(root, split: str | None, *, classes_file=None, image_root=None, **dataset_kwargs) -> MultiLabelDataset:
    csv_path = _find_csv(Path(root), split)
    try:
        rows, header = _read_rows(csv_path)
    except UnicodeDecodeError as exc:
        raise not_utf8_error(csv_path, exc) from None
    has_split = "split" in header
    if classes_file is None and (csv_path.parent / "classes.txt").is_file():
        classes_file = csv_path.parent / "classes.txt"
    if classes_file is not None:
        if not Path(classes_file).is_file():
            raise missing_path_error("classes file", classes_file)
        classes = read_classes_file(classes_file)
    else:
        classes = sorted({n for _, cell, _, _ in rows for names in cell[:3] for n in names})
    index = {name: i for i, name in enumerate(classes)}
    rel_paths, parts = [], {1.0: [], 0.0: [], -1.0: []}
    for image, cell, row_split, line_no in rows:
        if has_split and split is not None and row_split != split:
            continue
        rel_paths.append(image)
        for value, ids in zip((1.0, 0.0, -1.0), _row_classes(cell, index, f"{csv_path}:{line_no}", classes_file)):
            parts[value].append(ids)
    if not rel_paths:
        raise DatasetError(f"no rows{f' with split {split!r}' if has_split else ''} in {csv_path}")
    image_dir = Path(image_root) if image_root is not None else csv_path.parent
    labels = LabelTable(len(classes), 0.0, parts)
    return MultiLabelDataset(image_dir, rel_paths, labels, classes, name="csv", split=split or "", **dataset_kwargs)


def _row_classes(cell, index: dict, where: str, classes_file) -> tuple[list[int], list[int], list[int]]:
    """Class indices of one row: positives, annotated negatives, unknown."""
    positives, negatives, unknown, others = cell
    for n in positives + negatives + unknown:
        if n not in index:
            raise DatasetError(f"label {n!r} at {where} is not in the classes file {classes_file}")
    ids = [sorted({index[n] for n in names}) for names in (positives, negatives, unknown)]
    named = set(ids[0]) | set(ids[1])
    clash = (set(ids[0]) & set(ids[1])) | (named & set(ids[2]))
    if clash:
        name = next(n for n, i in index.items() if i == min(clash))
        raise DatasetError(f"labels cell at {where} gives class {name!r} two values (present, absent, unknown)")
    if others:
        ids[2] = [i for i in range(len(index)) if i not in named]
    return ids[0], ids[1], ids[2]
