"""MS-COCO, with the original's label semantics (pycocotools ``COCO``).

Layout: ``root/annotations/instances_<split>.json`` and images in ``root/<split>/``. Split names are free
(``train2014``/``val2014`` for the paper, ``train2017``/``val2017`` work the same).
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

from .base import LabelTable, MultiLabelDataset, require_dir, require_file

__all__ = ["load_coco"]

logger = logging.getLogger(__name__)


def load_coco(root, split: str, **dataset_kwargs) -> MultiLabelDataset:
    from pycocotools.coco import COCO

    root = Path(root)
    ann_file = require_file(root / "annotations" / f"instances_{split}.json", "COCO annotation file")
    image_dir = require_dir(root / split, "COCO image folder")
    # pycocotools prints its progress to stdout; keep library output in logging.
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        coco = COCO(str(ann_file))
    logger.debug("pycocotools: %s", out.getvalue().strip())

    # original: class index = position in coco.cats (the order of the json's categories list).
    cat_index = {cat_id: i for i, cat_id in enumerate(coco.cats.keys())}
    classes = [coco.cats[cat_id]["name"] for cat_id in coco.cats.keys()]
    # original: only images with at least one annotation, in coco.imgToAnns order (first annotation's order);
    # every annotation counts, crowd ones included; a class is present if any annotation has it.
    image_ids = list(coco.imgToAnns.keys())
    positives = [sorted({cat_index[a["category_id"]] for a in coco.imgToAnns[i]}) for i in image_ids]
    rel_paths = [coco.imgs[i]["file_name"] for i in image_ids]
    dropped = len(coco.imgs) - len(image_ids)
    if dropped:
        logger.info("COCO %s: %d of %d images have no annotation and are left out (as in the original)",
                    split, dropped, len(coco.imgs))
    labels = LabelTable(len(classes), 0.0, {1.0: positives})
    return MultiLabelDataset(image_dir, rel_paths, labels, classes, name="coco", split=split, **dataset_kwargs)
