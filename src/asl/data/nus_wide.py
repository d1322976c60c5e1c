"""NUS-WIDE with the MIIL split CSV (from the ASL model zoo).

The CSV has three columns, with or without a header row: the image path relative to the image root, a
list-literal of concept names (``"['clouds', 'sky']"``), and the split (``train`` / ``val``). Classes are the
sorted concept names found in the whole CSV (81 for the real file), so train and val share one class order.
Many NUS-WIDE images are gone from the web: rows whose image file is missing are skipped and counted.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .base import DatasetError, LabelTable, MultiLabelDataset, missing_path_error, require_dir
from .miil_csv import iter_miil_csv, parse_list_literal

__all__ = ["load_nus_wide", "NUS_WIDE_CSV_NAMES"]

logger = logging.getLogger(__name__)

NUS_WIDE_CSV_NAMES = ("nus_wid_data.csv", "nus_wide_data.csv", "data.csv")


def _find_csv(root: Path, csv_file) -> Path:
    if csv_file is not None:
        path = Path(csv_file)
        if not path.is_absolute() and not path.exists():
            path = root / path
        if not path.is_file():
            raise missing_path_error("NUS-WIDE CSV", path)
        return path
    for name in NUS_WIDE_CSV_NAMES:
        if (root / name).is_file():
            return root / name
    raise missing_path_error("NUS-WIDE CSV", root / NUS_WIDE_CSV_NAMES[0])


def read_nus_wide_csv(path: Path) -> list[tuple[str, list[str], str]]:
    rows = []
    for where, (image, labels, split, *_) in iter_miil_csv(path, ("image", "labels", "split")):
        rows.append((image, parse_list_literal(labels, where), split))
    return rows


def load_nus_wide(root, split: str, *, csv_file=None, image_root=None, **dataset_kwargs) -> MultiLabelDataset:
    root = require_dir(root, "NUS-WIDE folder")
    csv_path = _find_csv(root, csv_file)
    image_root = require_dir(image_root if image_root is not None else root, "NUS-WIDE image folder")
    rows = read_nus_wide_csv(csv_path)
    classes = sorted({name for _, names, _ in rows for name in names})
    index = {name: i for i, name in enumerate(classes)}
    rel_paths, positives = [], []
    missing = 0
    first_missing = None
    in_split = 0
    for image, names, row_split in rows:
        if row_split != split:
            continue
        in_split += 1
        if not os.path.isfile(os.path.join(image_root, image)):
            missing += 1
            first_missing = first_missing or os.path.join(image_root, image)
            continue
        rel_paths.append(image)
        positives.append(sorted({index[n] for n in names}))
    if in_split == 0:
        splits = sorted({s for _, _, s in rows})
        raise DatasetError(f"no rows with split {split!r} in {csv_path} (splits there: {splits})")
    if missing:
        logger.warning("NUS-WIDE %s: %d of %d images are missing and skipped (first: %s)",
                       split, missing, in_split, first_missing)
    labels = LabelTable(len(classes), 0.0, {1.0: positives})
    dataset = MultiLabelDataset(image_root, rel_paths, labels, classes, name="nus-wide", split=split,
                                **dataset_kwargs)
    dataset.num_missing = missing
    return dataset
