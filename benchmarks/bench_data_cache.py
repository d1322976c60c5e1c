"""Second-pass cost per training sample: the original pipeline vs. the cached uint8 pipeline.

original: PIL decode -> convert('RGB') -> torchvision Resize((s, s)) -> CutoutPIL (ImageDraw) -> RandAugment ->
          torchvision ToTensor (float32)
cached:   asl.data training dataset with cache_dir (resized uint8 read from the cache) -> CutoutPIL ->
          RandAugment -> uint8 tensor

Both draw the same random decisions (the per-sample generator of (seed, epoch, index)), so they run the same
augmentation operations and the ratio measures what the cache, uint8 tensors and our faster-but-identical Rotate
and Cutout remove. Each repeat is a new epoch (new draws) timed for both, interleaved; the figure is the mean over
repeats. CPU time of this single thread (time.process_time), so other processes on a shared machine do not
count.

    python benchmarks/bench_data_cache.py [--data ../shared/data/tiny_coco] [--sizes 224 448] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torchvision import transforms as T

from asl.data import create_dataset
from asl.data.transforms import CutoutPIL, RandAugment, item_rng

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tiny_coco"


def _package_rotate(img, magnitude, rng):
    # as randaugment 1.0.2 does it: rotate an RGBA copy and composite it on grey
    rot = img.convert("RGBA").rotate(magnitude)
    return Image.composite(rot, Image.new("RGBA", rot.size, (128,) * 4), rot).convert(img.mode)


def _package_cutout(img, size, rng):
    # as randaugment 1.0.2 does it: a copy, then one pixel at a time
    img = img.copy()
    width, height = img.size
    cx, cy, half = rng.randrange(width), rng.randrange(height), int(size) // 2
    pixels = img.load()
    for x in range(max(0, cx - half), min(width, cx + half)):
        for y in range(max(0, cy - half), min(height, cy + half)):
            pixels[x, y] = (125, 122, 113)
    return img


class OriginalPipeline:
    """The original's training transform on a file path, with an explicit per-sample generator."""

    def __init__(self, size: int):
        self.resize = T.Resize((size, size))
        self.cutout = CutoutPIL(0.5)
        self.randaugment = RandAugment({"Rotate": _package_rotate, "Cutout": _package_cutout})
        self.to_tensor = T.ToTensor()

    def __call__(self, path: str, rng) -> torch.Tensor:
        img = Image.open(path).convert("RGB")
        img = self.resize(img)
        box, fill = self.cutout.box(img.size[0], img.size[1], rng)
        ImageDraw.Draw(img).rectangle(box, fill=fill)
        img = self.randaugment(img, rng)
        return self.to_tensor(img)


def time_pass(fn, n: int) -> float:
    start = time.process_time()
    for i in range(n):
        fn(i)
    return (time.process_time() - start) / n


def run(data: Path, size: int, repeats: int, seed: int = 0) -> dict:
    with tempfile.TemporaryDirectory() as cache_dir:
        ds = create_dataset("coco", data, "train2017", size, train=True, cache_dir=cache_dir, seed=seed)
        n = len(ds)
        original = OriginalPipeline(size)
        ds.set_epoch(0)
        for i in range(n):  # first pass fills the cache
            ds[i]
        paths = [ds.image_path(i) for i in range(n)]
        t_orig, t_cache = [], []
        for epoch in range(1, repeats + 1):  # interleaved, so drifts of the machine hit both alike
            t_orig.append(time_pass(lambda i: original(paths[i], item_rng(seed, epoch, i)), n))
            ds.set_epoch(epoch)
            t_cache.append(time_pass(lambda i: ds[i], n))
    orig, cache = statistics.mean(t_orig), statistics.mean(t_cache)
    return {"size": size, "samples": n, "original_ms": orig * 1e3, "cached_ms": cache * 1e3, "ratio": orig / cache}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args(argv)
    if not (args.data / "annotations").is_dir():
        print(f"tiny_coco not found at {args.data}", file=sys.stderr)
        return 1
    torch.set_num_threads(1)
    print(f"{'size':>5} {'samples':>8} {'original ms':>12} {'cached ms':>10} {'ratio':>6}")
    for size in args.sizes:
        r = run(args.data, size, args.repeats)
        print(f"{r['size']:>5} {r['samples']:>8} {r['original_ms']:>12.2f} {r['cached_ms']:>10.2f} {r['ratio']:>5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
