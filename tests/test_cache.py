"""The resize cache: pixel-exact with torchvision's Resize of the decoded RGB image, invisible to the dataset's
output, invalidated by a changed file, robust to a damaged entry, shared by workers."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from asl.data import create_dataset, create_loader
from asl.data.cache import ResizeCache

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY_COCO = SHARED / "tiny_coco"
needs_coco = pytest.mark.skipif(not (TINY_COCO / "annotations").is_dir(), reason="shared/data/tiny_coco absent")


def torchvision_uint8(path, size):
    return T.Compose([T.Resize((size, size)), T.PILToTensor()])(Image.open(path).convert("RGB"))


def entries(cache_dir):
    return sorted(p for p in Path(cache_dir).rglob("*") if p.is_file())


@needs_coco
@pytest.mark.parametrize("size", [224, 64])
def test_cache_is_pixel_exact(tmp_path, size):
    cache = ResizeCache(tmp_path, size)
    files = sorted((TINY_COCO / "val2017").glob("*.jpg"))[:4]
    for path in files:
        want = torchvision_uint8(path, size)
        miss = cache.load(path)
        hit = cache.load(path)
        assert cache.entry_path(path).is_file()
        for arr in (miss, hit):
            assert arr.dtype == np.uint8 and arr.shape == (size, size, 3) and arr.flags.writeable
            assert torch.equal(torch.from_numpy(arr.copy()).permute(2, 0, 1), want)
    assert not [p for p in entries(tmp_path) if p.name.startswith(".tmp")]


@needs_coco
def test_dataset_output_identical_with_and_without_cache(tmp_path):
    plain = create_dataset("coco", TINY_COCO, "train2017", 48, train=True, seed=3)
    cached = create_dataset("coco", TINY_COCO, "train2017", 48, train=True, seed=3, cache_dir=tmp_path)
    evals = [create_dataset("coco", TINY_COCO, "train2017", 48, train=False, cache_dir=c) for c in (None, tmp_path)]
    for epoch in (0, 1, 2):  # epoch 0 fills the cache, later epochs read it
        plain.set_epoch(epoch)
        cached.set_epoch(epoch)
        for i in range(0, len(plain), 4):
            assert torch.equal(plain[i][0], cached[i][0]), (epoch, i)
            assert torch.equal(evals[0][i][0], evals[1][i][0])
    assert len(entries(tmp_path)) == len(range(0, len(plain), 4))


def test_changed_file_is_not_served_stale(tmp_path):
    path = tmp_path / "pic.png"
    Image.new("RGB", (30, 20), (255, 0, 0)).save(path)
    cache = ResizeCache(tmp_path / "cache", 8)
    assert tuple(cache.load(path)[0, 0]) == (255, 0, 0)
    Image.new("RGB", (30, 20), (0, 0, 255)).save(path)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    assert tuple(cache.load(path)[0, 0]) == (0, 0, 255)
    assert len(entries(tmp_path / "cache")) == 2


def test_damaged_entry_is_rewritten(tmp_path):
    path = tmp_path / "pic.png"
    Image.effect_noise((33, 27), 50).convert("RGB").save(path)
    cache = ResizeCache(tmp_path / "cache", 16)
    good = cache.load(path).copy()
    entry = cache.entry_path(path)
    entry.write_bytes(entry.read_bytes()[:100])  # e.g. a disk that filled up mid-write by another tool
    np.testing.assert_array_equal(cache.load(path), good)
    assert entry.stat().st_size == 16 * 16 * 3


def test_workers_fill_one_cache(tmp_path):
    for k in range(8):
        Image.effect_noise((40, 40), 20 + k).convert("RGB").save(tmp_path / f"n{k}.png")
    (tmp_path / "labels.csv").write_text("image,labels\n" + "".join(f"n{k}.png,a\n" for k in range(8)))
    ds = create_dataset("csv", tmp_path, None, 24, train=False, cache_dir=tmp_path / "cache", with_index=True)
    batches = list(create_loader(ds, batch_size=2, num_workers=2))
    files = entries(tmp_path / "cache")
    assert len(files) == 8 and all(f.stat().st_size == 24 * 24 * 3 for f in files)
    for batch in batches:
        for image, i in zip(batch.images, batch.indices.tolist()):
            assert torch.equal(image, torchvision_uint8(ds.image_path(i), 24))
