"""A generated, deterministic multi-label demo set in the COCO layout (the repository's embedded demo data).

Each picture shows 1 to 3 shapes of different classes (circle, square, triangle, cross, ring, star) on a noisy,
greyish, cluttered background (thin lines and dots of any colour that belong to no class). Each class has its
own hue (jittered): shape alone is too slow a cue for a network trained from scratch for two minutes on a CPU,
which is what ``make demo`` does; colour plus shape is learnt within a few hundred steps. It is written exactly in
the layout the ``coco`` loader reads::

    root/annotations/instances_train.json   root/train/000000000001.jpg ...
    root/annotations/instances_val.json     root/val/...

so ``create_dataset('synthetic', root, 'train', ...)`` is the COCO loader on generated files (generated first if
absent). Every picture has at least one annotation, so none is dropped. Pixels depend only on
``(seed, split, image number, image_size)``: the same call gives the same files (for one Pillow/libjpeg build).

Skewed variant (``num_classes`` other than 6, or ``skew`` > 0), for the loss ablation: up to 36 classes, each a
shape in a colour ("red circle", "blue circle", ...; the first six keep the shape names' colours), and class
frequencies that fall off as ``1 / (rank + 1) ** skew`` (Zipf), with 1 to 5 objects per picture (3.05 on average;
MS-COCO has about 2.9 labels per image). With ``skew=1`` and 30 classes the most frequent class is 30 times as
common as the rarest: the long tail of rare classes that makes positives scarce and negatives plentiful, the
imbalance ASL addresses. The default call (6 classes, no skew) draws exactly as before.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..atomic import atomic_write_bytes
from ..errors import DatasetError

__all__ = ["SHAPE_CLASSES", "MAX_CLASSES", "class_names", "generate_synthetic_coco", "ensure_synthetic_coco",
           "SYNTHETIC_SPLITS"]

logger = logging.getLogger(__name__)

SHAPE_CLASSES = ("circle", "square", "triangle", "cross", "ring", "star")
SYNTHETIC_SPLITS = ("train", "val")
_SPLIT_CODE = {"train": 1, "val": 2}


# One base hue per class (same order as SHAPE_CLASSES): red, blue, yellow, green, magenta, cyan.
_CLASS_COLOURS = ((220, 40, 40), (40, 80, 230), (235, 205, 30), (40, 175, 60), (195, 50, 200), (30, 200, 210))
_COLOUR_NAMES = ("red", "blue", "yellow", "green", "magenta", "cyan")
MAX_CLASSES = len(SHAPE_CLASSES) * len(_CLASS_COLOURS)
# Objects per picture in the skewed variant: 1..5, mean 3.05.
_OBJECT_COUNTS = (1, 2, 3, 4, 5)
_OBJECT_COUNT_P = (0.1, 0.25, 0.3, 0.2, 0.15)


def _class_colour(rng: np.random.Generator, class_index: int) -> tuple[int, int, int]:
    base = np.array(_CLASS_COLOURS[class_index])
    return tuple(int(c) for c in np.clip(base + rng.integers(-25, 26, 3), 0, 255))


def _shape_and_colour(k: int) -> tuple[int, int]:
    """Class k of the skewed variant: shape k mod 6 in colour (k mod 6 + k div 6) mod 6, so that every one of the
    36 (shape, colour) pairs is one class and the first six are the plain set's."""
    shape = k % len(SHAPE_CLASSES)
    return shape, (shape + k // len(SHAPE_CLASSES)) % len(_CLASS_COLOURS)


def class_names(num_classes: int = len(SHAPE_CLASSES)) -> list[str]:
    """The plain shape names up to 6 classes; "colour shape" beyond."""
    if num_classes <= len(SHAPE_CLASSES):
        return list(SHAPE_CLASSES[:num_classes])
    return [f"{_COLOUR_NAMES[c]} {SHAPE_CLASSES[s]}" for s, c in map(_shape_and_colour, range(num_classes))]


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, cx: float, cy: float, r: float, colour) -> None:
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif name == "square":
        h = r * 0.85
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=colour)
    elif name == "triangle":
        draw.polygon([(cx, cy - r), (cx - r * 0.95, cy + r * 0.75), (cx + r * 0.95, cy + r * 0.75)], fill=colour)
    elif name == "cross":
        t = max(r * 0.3, 1.5)
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=colour)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=colour)
    elif name == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(int(round(r * 0.35)), 2))
    elif name == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=colour)
    else:
        raise ValueError(name)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    # A grey level with a slight tint, so that the class hues stand out.
    background = rng.integers(50, 206) + rng.integers(-15, 16, 3)
    noise = rng.normal(0.0, 12.0, (size, size, 3))
    pixels = np.clip(background[None, None, :] + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(img)
    # clutter that belongs to no class
    for _ in range(int(rng.integers(2, 6))):
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, size, 4))
        draw.line([x0, y0, x1, y1], fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=1)
    for _ in range(int(rng.integers(5, 15))):
        x, y = (float(v) for v in rng.uniform(0, size, 2))
        draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img


def _render(rng: np.random.Generator, size: int, frequencies=None):
    """One picture and its ``(category id, bbox)`` list. ``frequencies``: the skewed variant's class
    probabilities; ``None`` draws the plain set (1 to 3 of the 6 classes, uniformly)."""
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    if frequencies is None:
        count = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
        classes = rng.choice(len(SHAPE_CLASSES), size=count, replace=False)
        radius = (0.11, 0.19)
    else:
        count = min(int(rng.choice(_OBJECT_COUNTS, p=_OBJECT_COUNT_P)), len(frequencies))
        classes = rng.choice(len(frequencies), size=count, replace=False, p=frequencies)
        radius = (0.09, 0.15)  # up to 5 shapes share the picture
    placed = []
    annotations = []
    for c in classes:
        shape, colour = _shape_and_colour(int(c))
        r = float(rng.uniform(*radius) * size)
        for _ in range(50):  # keep shapes apart so each stays recognisable
            cx, cy = (float(v) for v in rng.uniform(r + 1, size - r - 1, 2))
            if all(math.hypot(cx - px, cy - py) > r + pr + 2 for px, py, pr in placed):
                break
        placed.append((cx, cy, r))
        _draw_shape(draw, SHAPE_CLASSES[shape], cx, cy, r, _class_colour(rng, colour))
        x0, y0 = max(cx - r, 0.0), max(cy - r, 0.0)
        w, h = min(cx + r, size) - x0, min(cy + r, size) - y0
        annotations.append((int(c) + 1, [round(x0, 2), round(y0, 2), round(w, 2), round(h, 2)]))
    return img, annotations


def class_frequencies(num_classes: int, skew: float) -> np.ndarray:
    """Zipf class probabilities ``(k + 1) ** -skew``, normalised (uniform for ``skew=0``)."""
    weights = np.arange(1, num_classes + 1, dtype=np.float64) ** -float(skew)
    return weights / weights.sum()


def generate_synthetic_coco(root, num_train: int = 512, num_val: int = 128, image_size: int = 64,
                            seed: int = 0, num_classes: int = len(SHAPE_CLASSES), skew: float = 0.0) -> Path:
    """Write the synthetic set under ``root`` (COCO layout, see the module docstring) and return ``root``.

    Files are written atomically and the annotation json last, so a reader never sees a half-written split and
    concurrent generators (several ranks) write identical bytes.
    """
    root = Path(root)
    if not 1 <= int(num_classes) <= MAX_CLASSES or float(skew) < 0 or not math.isfinite(float(skew)):
        raise DatasetError(f"synthetic data: num_classes must be within 1..{MAX_CLASSES} and skew >= 0, got "
                           f"{num_classes} and {skew}")
    plain = int(num_classes) == len(SHAPE_CLASSES) and float(skew) == 0.0
    frequencies = None if plain else class_frequencies(int(num_classes), float(skew))
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"}
                  for i, n in enumerate(class_names(int(num_classes)))]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", num_train), ("val", num_val)):
        image_dir = root / split
        image_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(count):
            image_id = i + 1
            rng = np.random.default_rng([int(seed), _SPLIT_CODE[split], image_id])
            img, shapes = _render(rng, int(image_size), frequencies)
            file_name = f"{image_id:012d}.jpg"
            buffer = _encode_jpeg(img)
            atomic_write_bytes(image_dir / file_name, buffer)
            images.append({"id": image_id, "file_name": file_name, "width": int(image_size),
                           "height": int(image_size)})
            for category_id, bbox in shapes:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                    "bbox": bbox, "area": round(bbox[2] * bbox[3], 2), "iscrowd": 0,
                                    "segmentation": []})
        document = {
            "info": {"description": "asl synthetic shapes (generated)", "seed": int(seed),
                     "image_size": int(image_size), "num_images": count, "num_classes": int(num_classes),
                     "skew": float(skew)},
            "licenses": [],
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        atomic_write_bytes(root / "annotations" / f"instances_{split}.json",
                      json.dumps(document, indent=None, separators=(",", ":")).encode())
    logger.info("generated synthetic COCO set in %s (%d train, %d val, %dpx)", root, num_train, num_val, image_size)
    return root


def _encode_jpeg(img: Image.Image) -> bytes:
    import io

    out = io.BytesIO()
    img.save(out, format="JPEG", quality=92)
    return out.getvalue()


def ensure_synthetic_coco(root, checked: tuple[str, ...] = (), **kwargs) -> Path:
    """Generate the set unless both annotation files are already there. ``checked``: the generation options the
    caller asked for explicitly; a set already generated with other values for them is refused (it would
    silently be a different experiment)."""
    root = Path(root)
    files = [root / "annotations" / f"instances_{s}.json" for s in SYNTHETIC_SPLITS]
    if not all(f.is_file() for f in files):
        return generate_synthetic_coco(root, **kwargs)
    defaults = {"num_classes": len(SHAPE_CLASSES), "skew": 0.0}
    for split, path in zip(SYNTHETIC_SPLITS, files):
        try:
            info = json.loads(path.read_text()).get("info", {})
        except (OSError, ValueError, AttributeError):
            return root  # not ours to judge: the COCO loader names what is wrong with it
        stored = {**defaults, **info, "num_train" if split == "train" else "num_val": info.get("num_images")}
        for key in checked:
            if key in stored and key in kwargs and stored[key] != kwargs[key]:
                raise DatasetError(f"{root} holds a synthetic set generated with {key}={stored[key]}, not "
                                   f"{kwargs[key]}; use another folder (or delete this one)")
    return root
