"""Image decoding and the original augmentations, reproduced with explicit random generators.

Pipelines (no mean/std normalisation anywhere, as in the original):

- train: ``Resize((s, s))`` -> :class:`CutoutPIL` (factor 0.5) -> :class:`RandAugment` (the policy of the PyPI
  package ``randaugment==1.0.2``) -> uint8 CHW tensor;
- eval: ``Resize((s, s))`` -> uint8 CHW tensor.

Tensors stay uint8 until they reach the device; :func:`to_float` then gives exactly what torchvision's
``ToTensor`` gives (``x.float() / 255``).

Every random decision is drawn from a ``random.Random`` passed in by the caller (see :func:`item_rng`), never from
the global ``random`` / ``numpy.random`` state, so a sample's augmentation depends only on ``(seed, epoch, index)``
and not on the number of DataLoader workers or the order in which they run.
"""

from __future__ import annotations

import io
import os
import random
import warnings
from typing import BinaryIO, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps, UnidentifiedImageError

from ..file_kind import open_regular

__all__ = [
    "UnreadableImageError",
    "load_rgb",
    "decode_rgb",
    "resize_square",
    "decode_and_resize",
    "pixel_limit",
    "MAX_PIXELS_ENV",
    "pil_to_uint8",
    "array_to_uint8",
    "to_float",
    "item_rng",
    "CutoutPIL",
    "RandAugment",
    "RANDAUGMENT_OPS",
    "RANDAUGMENT_MAGNITUDES",
    "TrainTransform",
    "EvalTransform",
]

_BILINEAR = Image.Resampling.BILINEAR
_BICUBIC = Image.Resampling.BICUBIC
_AFFINE = Image.Transform.AFFINE
#: the environment variable that sets PIL's decompression-bomb limit, in pixels (0: no limit); the scripts'
#: ``--max-pixels`` sets it, so that every process that decodes (loader workers, torchrun ranks) sees it
MAX_PIXELS_ENV = "ASL_MAX_PIXELS"


class UnreadableImageError(OSError):
    """An image file that cannot be decoded (missing, empty, truncated, not an image, decompression bomb)."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"unreadable image {self.path}: {reason}")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;"):
        return _wide_to_rgb(img)
    # L, LA, 1, P (with or without transparency), RGBA, CMYK, YCbCr ...: PIL's own conversion, as the original
    # did with `.convert('RGB')` (alpha is dropped, not composited).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Palette images with Transparency ..." is expected here
        return img.convert("RGB")


def _wide_to_rgb(img: Image.Image) -> Image.Image:
    """A grey picture of more than 8 bits per sample (PIL modes ``I;16*``, ``I``: 32-bit integers, ``F``: 32-bit
    floats) as the 8-bit picture it holds.

    These modes do not say which range their values use, so the picture's largest value picks the smallest usual
    one that holds it: [0, 1] (floats only), 0..255, 0..65535, else 0..2**31 - 1. Integers keep the top 8 bits of
    that range (``>> 8`` for 16 bits), floats are scaled to 0..255 and rounded; values below 0 (and NaN) are 0.
    An 8-bit picture stored wider (``convert('I')``, ``convert('F')``, ``v * 257`` in 16 bits, ``v / 255`` as
    floats) thus decodes to its own tensor. original: ``convert('RGB')`` clips every value at 255, which turns a
    16-bit picture almost white and a [0, 1] float picture black (Datasets.md, docs/differences.md).
    """
    arr = np.asarray(img)
    if arr.dtype.kind == "f":
        values = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=np.finfo(np.float64).max, neginf=0.0)
        peak = float(values.max(initial=0.0))
        top = next((r for r in (1.0, 255.0, 65535.0) if peak <= r), float(2**31 - 1))
        out = np.clip(np.rint(values * (255.0 / top)), 0, 255)
    else:
        values = np.clip(arr.astype(np.int64), 0, None)
        peak = int(values.max(initial=0))
        bits = next((b for b in (8, 16) if peak < 1 << b), 31)  # mode I is signed: 31 bits of magnitude
        out = values >> (bits - 8)
    return Image.fromarray(out.astype(np.uint8)).convert("RGB")


def load_rgb(path) -> Image.Image:
    """Decode an image file fully and return it as an RGB PIL image.

    Raises :class:`UnreadableImageError` for any file PIL cannot decode: missing, empty, truncated (PIL's
    ``LOAD_TRUNCATED_IMAGES`` is left at its default, False), not an image, or a decompression bomb (both
    ``DecompressionBombError`` and ``DecompressionBombWarning`` count: a picture that large is not a training
    sample).
    """
    with _open_picture(path) as file:
        return decode_rgb(file, path)


def load_rgb_and_bytes(path) -> tuple[Image.Image, bytes]:
    """:func:`load_rgb`, and the file's bytes, read once (shards keep the bytes of what decodes)."""
    with _open_picture(path) as file:
        try:
            data = file.read()
        except OSError as exc:
            raise UnreadableImageError(path, exc.strerror or str(exc)) from None
    return decode_rgb(io.BytesIO(data), path), data


def _open_picture(path) -> BinaryIO:
    try:
        return open_regular(path)
    except FileNotFoundError:
        raise UnreadableImageError(path, "file not found") from None
    except OSError as exc:
        raise UnreadableImageError(path, exc.strerror or str(exc)) from None


def decode_rgb(file: BinaryIO, name) -> Image.Image:
    """:func:`load_rgb` of an open binary file (a shard's member, bytes in memory); ``name`` is what an
    :class:`UnreadableImageError` names."""
    _apply_pixel_limit()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as img:
                img.load()
                return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnreadableImageError(name, f"{type(exc).__name__}: {exc} Allow larger pictures with --max-pixels N "
                                         f"(0: no limit) or the environment variable {MAX_PIXELS_ENV}=N") from exc
    except UnidentifiedImageError as exc:
        # PIL's own words name the open file object ("<_io.BufferedReader name=3>"), not the file.
        raise UnreadableImageError(name, "the file is empty (0 bytes)" if _is_empty(file) else
                                   "not a picture: no image format PIL reads begins this way") from exc
    # PIL's decoders report corrupt data with many exception types (OSError, SyntaxError, ValueError, EOFError,
    # struct.error, IndexError, ...): all mean "unreadable".
    except Exception as exc:  # noqa: BLE001
        raise UnreadableImageError(name, f"{type(exc).__name__}: {exc}") from exc


def _is_empty(file: BinaryIO) -> bool:
    try:
        file.seek(0)
        return file.read(1) == b""
    except (OSError, ValueError):  # not seekable, or closed: say nothing about its size
        return False


def pixel_limit(value: Optional[str]) -> Optional[int]:
    """The decompression-bomb limit that ``value`` (the text of ``--max-pixels`` or of ``ASL_MAX_PIXELS``) sets:
    a whole number of pixels, 0 for no limit; ``None`` for no value. Raises ``ValueError`` for anything else."""
    if value is None or not value.strip():
        return None
    try:
        limit = int(value.strip().replace("_", ""))
    except ValueError:
        limit = -1
    if limit < 0:
        raise ValueError(f"expected a whole number of pixels (0: no limit), got {value!r}")
    return limit


def _apply_pixel_limit() -> None:
    # PIL's guard is one process-wide number (Image.MAX_IMAGE_PIXELS); the environment carries the user's choice
    # into every process that decodes, whatever the way it was started (fork, spawn, torchrun).
    try:
        limit = pixel_limit(os.environ.get(MAX_PIXELS_ENV))
    except ValueError:
        return  # the scripts refuse it at start; library users keep PIL's default
    if limit is not None:
        Image.MAX_IMAGE_PIXELS = limit or None


def resize_square(img: Image.Image, size: int) -> Image.Image:
    """``torchvision.transforms.Resize((size, size))`` on a PIL image: a squish, PIL bilinear (antialiased)."""
    # original: transforms.Resize((s, s)) -> PIL img.resize((s, s), BILINEAR); no crop, aspect ratio not kept.
    if img.size == (size, size):
        return img
    return img.resize((size, size), _BILINEAR)


def decode_and_resize(path, size: int) -> np.ndarray:
    """Decode ``path`` to RGB and resize to ``(size, size)``: a C-contiguous uint8 HWC array."""
    return np.array(resize_square(load_rgb(path), size), dtype=np.uint8)


def array_to_uint8(arr: np.ndarray) -> torch.Tensor:
    """HWC uint8 array -> CHW uint8 tensor (shares memory with ``arr``; make sure nobody writes to it)."""
    return torch.from_numpy(arr).permute(2, 0, 1)


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> CHW uint8 tensor, the same values as ``torchvision.transforms.PILToTensor``."""
    return array_to_uint8(np.array(img, dtype=np.uint8))


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images (any shape, any device) -> float32 in [0, 1], bit-identical to ``ToTensor``'s ``/ 255``."""
    # not div_: .float() returns the input itself when it is already float32
    return x.float().div(255)


def item_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The random generator of one sample in one epoch: a pure function of ``(seed, epoch, index)``."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch), int(index)]).generate_state(4)
    return random.Random(int.from_bytes(state.tobytes(), "little"))


def _fill_box(arr: np.ndarray, x0: int, y0: int, x1: int, y1: int, colour) -> None:
    """``arr[y0:y1, x0:x1] = colour`` for a C-contiguous HWC uint8 array, as one tiled-row copy, much faster than
    numpy's broadcast of a 3-vector over the box."""
    if x1 <= x0 or y1 <= y0:
        return
    height, width, channels = arr.shape
    row = np.tile(np.asarray(colour, dtype=np.uint8), x1 - x0)
    arr.reshape(height, width * channels)[y0:y1, x0 * channels:x1 * channels] = row


class CutoutPIL:
    """The original's CutoutPIL: one rectangle of ``cutout_factor`` times the image side, random centre, random
    colour, clipped to the image. Always applied (there is no probability in the original)."""

    def __init__(self, cutout_factor: float = 0.5):
        self.cutout_factor = cutout_factor

    def box(self, width: int, height: int, rng: random.Random):
        """The rectangle (x1, y1, x2, y2), inclusive as in ``ImageDraw.rectangle``, and the RGB fill."""
        # original: it names PIL's (width, height) "h, w" and then draws the first one along y. Resize((s, s))
        # comes first so the image is square and the swap is invisible; we keep it so even non-square inputs
        # match.
        a, b = width, height
        cut_a = int(self.cutout_factor * a + 0.5)
        cut_b = int(self.cutout_factor * b + 0.5)
        centre_a = rng.randrange(a)
        centre_b = rng.randrange(b)
        y1 = min(max(centre_a - cut_a // 2, 0), a)
        y2 = min(max(centre_a + cut_a // 2, 0), a)
        x1 = min(max(centre_b - cut_b // 2, 0), b)
        x2 = min(max(centre_b + cut_b // 2, 0), b)
        fill = (rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255))
        return (x1, y1, x2, y2), fill

    def apply_array(self, arr: np.ndarray, rng: random.Random) -> np.ndarray:
        """In place on a writable HWC uint8 array (the same pixels as drawing with ImageDraw)."""
        height, width = arr.shape[:2]
        (x1, y1, x2, y2), fill = self.box(width, height, rng)
        # ImageDraw.rectangle includes both end points and clips to the image; numpy slicing clips too.
        _fill_box(arr, x1, y1, min(x2 + 1, width), min(y2 + 1, height), fill)
        return arr

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        arr = np.array(img, dtype=np.uint8)
        return Image.fromarray(self.apply_array(arr, rng))


# ---- RandAugment: the policy of the PyPI package randaugment==1.0.2 (written anew; that package needs NumPy<1.24).
# Facts of that policy: 15 operations, each with 10 magnitudes from np.linspace(lo, hi, 10) of which only indices
# 1..9 are used; one call draws two (operation, magnitude) pairs uniformly and independently, and applies each
# with probability 0.5, first then second. Geometric fills are (128, 128, 128).

RANDAUGMENT_OPS = (
    "Invert", "Cutout", "Sharpness", "AutoContrast", "Posterize", "ShearX", "TranslateX", "TranslateY", "ShearY",
    "Rotate", "Equalize", "Contrast", "Color", "Solarize", "Brightness",
)

RANDAUGMENT_MAGNITUDES = {
    "ShearX": np.linspace(0, 0.3, 10),
    "ShearY": np.linspace(0, 0.3, 10),
    "TranslateX": np.linspace(0, 150 / 331, 10),
    "TranslateY": np.linspace(0, 150 / 331, 10),
    "Rotate": np.linspace(0, 30, 10),
    "Color": np.linspace(0.0, 0.9, 10),
    "Posterize": np.round(np.linspace(8, 4, 10), 0).astype(np.int64),
    "Solarize": np.linspace(256, 0, 10),
    "Contrast": np.linspace(0.0, 0.9, 10),
    "Sharpness": np.linspace(0.0, 0.9, 10),
    "Brightness": np.linspace(0.0, 0.9, 10),
    "AutoContrast": np.zeros(10),
    "Equalize": np.zeros(10),
    "Invert": np.zeros(10),
    "Cutout": np.round(np.linspace(0, 20, 10), 0).astype(np.int64),
}

_FILL = (128, 128, 128)
_CUTOUT_FILL = (125, 122, 113)


def _sign(rng: random.Random) -> int:
    return rng.choice((-1, 1))


def _shear_x(img, m, rng):
    return img.transform(img.size, _AFFINE, (1, m * _sign(rng), 0, 0, 1, 0), _BICUBIC, fillcolor=_FILL)


def _shear_y(img, m, rng):
    return img.transform(img.size, _AFFINE, (1, 0, 0, m * _sign(rng), 1, 0), _BICUBIC, fillcolor=_FILL)


def _translate_x(img, m, rng):
    # original: default resampling (nearest) for translations, bicubic only for shears.
    return img.transform(img.size, _AFFINE, (1, 0, m * img.size[0] * _sign(rng), 0, 1, 0), fillcolor=_FILL)


def _translate_y(img, m, rng):
    return img.transform(img.size, _AFFINE, (1, 0, 0, 0, 1, m * img.size[1] * _sign(rng)), fillcolor=_FILL)


def _rotate(img, m, rng):
    # original: always counter-clockwise (the package draws no sign for Rotate). It rotates an RGBA copy and
    # composites it on grey; with nearest resampling that is exactly a rotate with a grey fill (tested).
    return img.rotate(m, fillcolor=_FILL)


def _color(img, m, rng):
    return ImageEnhance.Color(img).enhance(1 + m * _sign(rng))


def _contrast(img, m, rng):
    return ImageEnhance.Contrast(img).enhance(1 + m * _sign(rng))


def _sharpness(img, m, rng):
    return ImageEnhance.Sharpness(img).enhance(1 + m * _sign(rng))


def _brightness(img, m, rng):
    return ImageEnhance.Brightness(img).enhance(1 + m * _sign(rng))


def _posterize(img, bits, rng):
    return ImageOps.posterize(img, int(bits))


def _solarize(img, threshold, rng):
    return ImageOps.solarize(img, threshold)


def _autocontrast(img, m, rng):
    return ImageOps.autocontrast(img)


def _equalize(img, m, rng):
    return ImageOps.equalize(img)


def _invert(img, m, rng):
    return ImageOps.invert(img)


def _cutout(img, size, rng):
    # original (package Cutout): centre drawn over (width, height), half-open box of +-size//2, clipped, fill
    # (125, 122, 113).
    width, height = img.size
    cx = rng.randrange(width)
    cy = rng.randrange(height)
    half = int(size) // 2
    x0, x1 = max(0, cx - half), min(width, cx + half)
    y0, y1 = max(0, cy - half), min(height, cy + half)
    arr = np.array(img, dtype=np.uint8)
    _fill_box(arr, x0, y0, x1, y1, _CUTOUT_FILL)
    return Image.fromarray(arr)


# Module-level functions only (no lambdas), so datasets pickle for spawn/forkserver DataLoader workers.
_OP_FUNCS: dict[str, Callable] = {
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateX": _translate_x,
    "TranslateY": _translate_y,
    "Rotate": _rotate,
    "Color": _color,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "Contrast": _contrast,
    "Sharpness": _sharpness,
    "Brightness": _brightness,
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
    "Invert": _invert,
    "Cutout": _cutout,
}


class RandAugment:
    """RandAugment as in ``randaugment==1.0.2`` (the one the original train.py imports), on RGB PIL images."""

    ops: Sequence[str] = RANDAUGMENT_OPS
    magnitude_indices = range(1, 10)
    prob = 0.5

    def __init__(self, op_funcs: dict[str, Callable] | None = None):
        # op_funcs: replacement implementations by name, (img, magnitude, rng) -> img (benchmarks use it).
        self.op_funcs = dict(_OP_FUNCS, **(op_funcs or {}))

    def sample(self, rng: random.Random):
        """The two (operation, magnitude index) pairs of one call."""
        # original: one policy drawn uniformly from all 135 x 135 ordered pairs of (op, magnitude index 1..9).
        per_op = len(self.magnitude_indices)
        n = len(self.ops) * per_op
        pick = rng.randrange(n * n)
        return [(self.ops[k // per_op], self.magnitude_indices[k % per_op]) for k in (pick // n, pick % n)]

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        for name, index in self.sample(rng):
            if rng.random() < self.prob:
                img = self.op_funcs[name](img, RANDAUGMENT_MAGNITUDES[name][index], rng)
        return img


class TrainTransform:
    """Training augmentation after the resize: CutoutPIL(0.5) -> RandAugment -> uint8 CHW tensor.

    Takes the resized image as a writable uint8 HWC array (from the decoder or the cache) and the sample's
    generator.
    """

    def __init__(self, cutout_factor: float = 0.5):
        self.cutout = CutoutPIL(cutout_factor)
        self.randaugment = RandAugment()

    def __call__(self, arr: np.ndarray, rng: random.Random) -> torch.Tensor:
        arr = self.cutout.apply_array(arr, rng)
        img = Image.fromarray(arr)
        out = self.randaugment(img, rng)
        if out is img:  # neither operation fired (a quarter of the calls): no round trip through PIL
            return array_to_uint8(arr)
        return pil_to_uint8(out)


class EvalTransform:
    """Evaluation: the resized uint8 HWC array as a CHW tensor (the resize is done by the decoder/cache)."""

    def __call__(self, arr: np.ndarray, rng=None) -> torch.Tensor:
        return array_to_uint8(arr)
