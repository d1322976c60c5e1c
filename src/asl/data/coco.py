"""MS-COCO, with the original's label semantics (pycocotools ``COCO``).

Layout: ``root/annotations/instances_<split>.json`` and images in ``root/<split>/``. Split names are free
(``train2014``/``val2014`` for the paper, ``train2017``/``val2017`` work the same).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

from .base import DatasetError, LabelTable, MultiLabelDataset, require_dir, require_file

__all__ = ["load_coco"]

logger = logging.getLogger(__name__)


def load_coco(root, split: str, **dataset_kwargs) -> MultiLabelDataset:
    root = Path(root)
    ann_file = root / "annotations" / f"instances_{split}.json"
    if not ann_file.is_file():
        _missing_split(ann_file, split)
    ann_file = require_file(ann_file, "COCO annotation file")
    image_dir = require_dir(root / split, "COCO image folder")
    try:
        classes, rel_paths, positives, dropped = _read_annotations(ann_file)
    except DatasetError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        # json.JSONDecodeError is a ValueError; the others are pycocotools meeting a field it expects.
        detail = f"missing or malformed field {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise DatasetError(f"{ann_file} is not a usable COCO annotation file ({detail})") from None
    if dropped:
        logger.info("COCO %s: %d of %d images have no annotation and are left out (as in the original)",
                    split, dropped, dropped + len(rel_paths))
    labels = LabelTable(len(classes), 0.0, {1.0: positives})
    return MultiLabelDataset(image_dir, rel_paths, labels, classes, name="coco", split=split, **dataset_kwargs)


def _missing_split(ann_file: Path, split: str) -> None:
    """A split whose annotation file is absent while others are there: the likely mistake is the split's name
    (train2014 asked, train2017 downloaded), so the message lists the splits found and the flags that choose."""
    found = sorted(p.name[len("instances_"):-len(".json")] for p in ann_file.parent.glob("instances_*.json"))
    if found:
        raise DatasetError(f"no {ann_file.name} in {ann_file.parent} for the split {split!r}; the splits found there "
                           f"are {', '.join(found)}: choose one with --train-split or --val-split (train.py), "
                           f"--val-split (validate.py)")


def _read_annotations(ann_file: Path) -> tuple[list[str], list[str], list[list[int]], int]:
    """(class names, image file names, positive class indices per image, images without annotation)."""
    from pycocotools.coco import COCO

    # Read here rather than by COCO(file), which asserts the top level is an object: a traceback, not a message.
    with open(ann_file, "rb") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(data), "a number")
        raise DatasetError(f"{ann_file} is not a usable COCO annotation file (its JSON is {kind}, not an object)")
    coco = COCO()
    coco.dataset = data
    # pycocotools prints its progress to stdout; keep library output in logging.
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        coco.createIndex()
    logger.debug("pycocotools: %s", out.getvalue().strip())
    if not coco.cats:
        raise DatasetError(f"{ann_file} has no categories")
    # original: class index = position in coco.cats (the order of the json's categories list).
    cat_index = {cat_id: i for i, cat_id in enumerate(coco.cats.keys())}
    classes = [str(coco.cats[cat_id]["name"]) for cat_id in coco.cats.keys()]
    # original: only images with at least one annotation, in coco.imgToAnns order (first annotation's order);
    # every annotation counts, crowd ones included; a class is present if any annotation has it.
    image_ids = list(coco.imgToAnns.keys())
    positives = []
    for image_id in image_ids:
        found = set()
        for ann in coco.imgToAnns[image_id]:
            if ann["category_id"] not in cat_index:
                raise DatasetError(f"{ann_file}: annotation {ann.get('id')} has category_id {ann['category_id']!r}, "
                                   f"which is not in 'categories'")
            found.add(cat_index[ann["category_id"]])
        positives.append(sorted(found))
    rel_paths = []
    for image_id in image_ids:
        if image_id not in coco.imgs:
            raise DatasetError(f"{ann_file}: annotations refer to image id {image_id!r}, which is not in 'images'")
        name = coco.imgs[image_id].get("file_name")
        if not isinstance(name, str) or not name:
            raise DatasetError(f"{ann_file}: image {image_id!r} has no file_name")
        rel_paths.append(name)
    return classes, rel_paths, positives, len(coco.imgs) - len(image_ids)
