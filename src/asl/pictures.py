"""Pictures for inference: finding them in folders, decoding them as validation does, and drawing the detected
classes on them (PIL only: no display, no matplotlib)."""
from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
from PIL import Image, ImageDraw, ImageFont

from .data.transforms import UnreadableImageError, load_rgb, pil_to_uint8, resize_square
from .errors import UsageError
from .file_kind import describe_mode
from .evaluation.report import printable

logger = logging.getLogger(__name__)

__all__ = ["IMAGE_EXTENSIONS", "WRITABLE_EXTENSIONS", "MIN_ANNOTATED_SIDE", "find_images", "load_picture",
           "annotate", "UnreadableImageError"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
#: the ones an annotated copy is written in; others (GIF frames, PPM...) are written as PNG (``x.gif.png``).
WRITABLE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
#: skipped entries named in a warning (the count covers them all)
MAX_NAMED = 5


def find_images(paths: Iterable[Union[str, os.PathLike]]) -> list[Path]:
    """Expands folders (recursively, sorted, picture extensions only) and keeps files as given.

    A file given explicitly is kept whatever its extension (it may still be a picture; reading it will tell).
    A path that does not exist (a symbolic link to nothing included), or a folder given that cannot be listed,
    raises :class:`~asl.errors.UsageError`; subfolders that cannot be listed, and entries with a picture's name
    that are no regular file (a FIFO, device or socket, a broken symbolic link or a loop of them), are skipped and
    named in a warning. Symlinked folders are not entered.
    """
    found: list[Path] = []
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        # os.path, not Path methods: those raise for a name too long instead of saying it is not there.
        if os.path.isdir(path):
            candidates = _pictures_in(path)
        elif os.path.exists(path):
            candidates = [path]
        elif os.path.lexists(path):
            raise UsageError(f"{printable(path)} is a symbolic link to nothing (broken, or a loop)")
        else:
            raise UsageError(f"no such picture or folder: {printable(path)}")
        for p in candidates:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                found.append(p)
    return found


def _pictures_in(folder: Path) -> list[Path]:
    unreadable: list[tuple[str, str]] = []

    def failed(exc: OSError) -> None:
        unreadable.append((exc.filename or str(folder), exc.strerror or str(exc)))

    pictures = []
    for directory, _, files in os.walk(folder, onerror=failed):
        pictures += [Path(directory) / f for f in files if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    if unreadable and Path(unreadable[0][0]) == folder:
        raise UsageError(f"cannot read the folder {printable(folder)}: {unreadable[0][1]}")
    _warn_skipped("unreadable folder(s)", folder, unreadable)
    regular, refused = [], []
    for path in pictures:
        kind = _not_regular(path)
        if kind is None:
            regular.append(path)
        else:
            refused.append((str(path), kind))
    _warn_skipped("entries named like pictures that are not regular files", folder, sorted(refused))
    return sorted(regular)


def _not_regular(path: Path) -> Optional[str]:
    """``None`` for a regular file (through symbolic links), else what the entry is, in words."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a loop of symbolic links"
        if exc.errno == errno.ENOENT and os.path.islink(path):
            return "a broken symbolic link"
        return exc.strerror or str(exc)
    return None if stat.S_ISREG(mode) else describe_mode(mode)


def _warn_skipped(what: str, folder: Path, entries: Sequence[tuple[str, str]]) -> None:
    if entries:
        named = ", ".join(f"{printable(name)} ({reason})" for name, reason in entries[:MAX_NAMED])
        logger.warning("skipped %d %s under %s: %s%s", len(entries), what, printable(folder), named,
                       " ..." if len(entries) > MAX_NAMED else "")


def load_picture(path: Union[str, os.PathLike], image_size: int) -> tuple[Image.Image, torch.Tensor]:
    """Decodes ``path`` (RGB) and returns ``(picture, uint8 CHW tensor of size image_size)``.

    The tensor is exactly what validate.py feeds the model for a dataset image (bilinear squish-resize, no crop).
    original: infer.py resized with PIL's default filter while validate.py used torchvision's bilinear Resize;
    we use the validation transform for both, so a picture gets the scores it would get in validate.py.
    Raises :class:`UnreadableImageError` (an ``OSError``) naming the file.
    """
    picture = load_rgb(path)
    return picture, pil_to_uint8(resize_square(picture, image_size))


def _font(size: int) -> ImageFont.ImageFont:
    try:
        # Pillow >= 10.1 ships a scalable default font; older Pillow only has the fixed bitmap font.
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


MIN_ANNOTATED_SIDE = 320


def annotate(picture: Image.Image, found: Sequence[Mapping[str, Any]]) -> Image.Image:
    """A copy of ``picture`` with one line ``name score`` per detection in a dark box at the top left.

    Pictures smaller than ``MIN_ANNOTATED_SIDE`` are enlarged first (nearest neighbour, so pixels stay
    visible): otherwise the labels of a thumbnail-sized input would not fit on it.
    """
    image = picture.convert("RGB")
    if min(image.size) < MIN_ANNOTATED_SIDE:
        factor = -(-MIN_ANNOTATED_SIDE // min(image.size))
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    # printable: a line break in a class name would make the drawn box overlap its own lines.
    lines = [f"{printable(d['class'])} {float(d['score']):.3f}" for d in found] or ["no class above the threshold"]
    size = max(10, min(image.width, image.height) // 25)
    font = _font(size)
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    margin = max(2, size // 4)
    boxes = [draw.textbbox((0, 0), line, font=font) for line in lines]
    line_height = max(b[3] - b[1] for b in boxes) + margin
    width = max(b[2] - b[0] for b in boxes) + 2 * margin
    height = line_height * len(lines) + margin
    # Semi-transparent background so the text is readable on any picture.
    draw.rectangle((0, 0, width, height), fill=(0, 0, 0, 160))
    for i, line in enumerate(lines):
        draw.text((margin, margin + i * line_height), line, fill=(255, 255, 255, 255), font=font)
    return Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")
