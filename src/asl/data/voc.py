"""Pascal VOC 2007 from the official per-class image-set files.

Layout: ``VOCdevkit/VOC2007/JPEGImages/<id>.jpg`` and ``VOCdevkit/VOC2007/ImageSets/Main/<class>_<split>.txt``
(lines ``<id> <label>``: 1 present, -1 absent, 0 "difficult" only). ``root`` may be the folder that holds
``VOCdevkit``, ``VOCdevkit`` itself or ``VOC2007`` itself.

Difficult entries (label 0):
- evaluation (``train=False``): target -1, ignored by the partial-label mAP (``difficult='ignore'``);
- training: target 1 (``difficult='positive'``), the ML-GCN protocol behind the numbers ASL compares with;
- either can be overridden with ``difficult='positive' | 'ignore' | 'negative'``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .base import DatasetError, LabelTable, MultiLabelDataset, missing_path_error, not_utf8_error, require_file

__all__ = ["VOC_CLASSES", "DIFFICULT_MODES", "load_voc", "find_voc_root"]

logger = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
DIFFICULT_MODES = ("positive", "ignore", "negative")


def find_voc_root(root, year: str = "2007") -> Path:
    """The ``VOC<year>`` folder, given it, its ``VOCdevkit`` parent, or the folder holding ``VOCdevkit``."""
    root = Path(root)
    for candidate in (root, root / f"VOC{year}", root / "VOCdevkit" / f"VOC{year}"):
        if (candidate / "ImageSets" / "Main").is_dir() and (candidate / "JPEGImages").is_dir():
            return candidate
    raise missing_path_error("VOC folder with JPEGImages/ and ImageSets/Main/",
                             root / "VOCdevkit" / f"VOC{year}")


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise not_utf8_error(path, exc) from None


def _read_label_file(path: Path) -> dict[str, int]:
    labels = {}
    for line_no, line in enumerate(_read_lines(path), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("1", "-1", "0"):
            raise DatasetError(f"malformed line {line_no} in {path}: {line.strip()!r} (expected '<id> 1|-1|0')")
        labels[parts[0]] = int(parts[1])
    return labels


def load_voc(root, split: str, *, train: bool, difficult: str | None = None, year: str = "2007",
             **dataset_kwargs) -> MultiLabelDataset:
    if difficult is None:
        difficult = "positive" if train else "ignore"
    if difficult not in DIFFICULT_MODES:
        raise DatasetError(f"difficult must be one of {DIFFICULT_MODES}, not {difficult!r}")
    base = find_voc_root(root, year)
    main = base / "ImageSets" / "Main"
    # Every class file is required: a missing one would silently turn a class into "absent everywhere".
    per_class = [_read_label_file(require_file(main / f"{c}_{split}.txt", "VOC label file")) for c in VOC_CLASSES]
    split_file = main / f"{split}.txt"
    if split_file.is_file():
        ids = [line.split()[0] for line in _read_lines(split_file) if line.strip()]
    else:
        ids = list(per_class[0].keys())
    positives, ignored = [], []
    unlisted = 0
    for image_id in ids:
        pos, ign = [], []
        for c, table in enumerate(per_class):
            value = table.get(image_id)
            if value is None:
                unlisted += 1  # treated as absent
            elif value == 1 or (value == 0 and difficult == "positive"):
                pos.append(c)
            elif value == 0 and difficult == "ignore":
                ign.append(c)
        positives.append(pos)
        ignored.append(ign)
    if unlisted:
        logger.warning("VOC %s: %d (image, class) pairs are missing from the class files; taken as absent",
                       split, unlisted)
    labels = LabelTable(len(VOC_CLASSES), 0.0, {1.0: positives, -1.0: ignored})
    return MultiLabelDataset(base / "JPEGImages", [f"{i}.jpg" for i in ids], labels, VOC_CLASSES, name="voc",
                             split=split, train=train, **dataset_kwargs)
