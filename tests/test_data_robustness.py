"""Unreadable images are skipped (named once), strict mode raises; collate_skip; with_index; per-epoch seeding
independent of DataLoader workers."""

import logging
import os
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from asl.data import Batch, DatasetError, collate_skip, create_dataset, create_loader, seed_worker


def png_header(width, height):
    """A PNG signature and IHDR claiming width x height, and no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + chunk + end


BAD = ["truncated.jpg", "empty.jpg", "text.jpg", "bomb.png", "bomb_warning.png", "missing.jpg"]


@pytest.fixture
def messy(tmp_path):
    good = []
    for k in range(3):
        Image.new("RGB", (48, 40), (40 * k, 100, 200)).save(tmp_path / f"good{k}.jpg", quality=95)
        good.append(f"good{k}.jpg")
    full = Image.effect_noise((64, 64), 40).convert("RGB")
    full.save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not a picture\n")
    (tmp_path / "bomb.png").write_bytes(png_header(100_000, 100_000))        # over 2x MAX_IMAGE_PIXELS: error
    (tmp_path / "bomb_warning.png").write_bytes(png_header(10_000, 10_000))  # over MAX_IMAGE_PIXELS: warning
    order = [good[0], BAD[0], BAD[1], good[1], BAD[2], BAD[3], BAD[4], BAD[5], good[2]]
    (tmp_path / "labels.csv").write_text("image,labels\n" + "".join(f"{n},a\n" for n in order))
    return tmp_path


def test_unreadable_images_skipped_and_named_once(messy, caplog):
    caplog.set_level(logging.WARNING, logger="asl.data")
    ds = create_dataset("csv", messy, None, 24, train=True, cache_dir=messy / "cache")
    items = [ds[i] for i in range(len(ds))]
    assert [item is None for item in items] == [False, True, True, False, True, True, True, True, False]
    for name in BAD:
        assert sum(name in r.getMessage() for r in caplog.records) == 1, name
    assert "DecompressionBombError" in caplog.text and "DecompressionBombWarning" in caplog.text
    assert ds.num_unreadable() == 6
    assert sorted(Path(p).name for p in ds.unreadable_paths()) == sorted(BAD)
    caplog.clear()
    ds.set_epoch(1)
    assert [ds[i] is None for i in range(len(ds))] == [item is None for item in items]
    assert not caplog.records, "named once per run, not once per epoch"

    loader = create_loader(ds, batch_size=4)
    batches = list(loader)
    assert all(isinstance(b, Batch) for b in batches)
    assert sum(b.skipped for b in batches) == 6
    assert sum(b.images.shape[0] for b in batches) == 3
    assert batches[0].images.dtype == torch.uint8 and batches[0].images.shape[1:] == (3, 24, 24)
    assert batches[0].indices is None


def test_strict_raises_naming_file(messy):
    ds = create_dataset("csv", messy, None, 24, train=False, strict=True)
    assert ds[0] is not None
    with pytest.raises(DatasetError, match="truncated.jpg"):
        ds[1]


def test_collate_skip_with_indices_and_all_skipped():
    a = (torch.zeros(3, 4, 4, dtype=torch.uint8), torch.tensor([1.0, 0.0]), 7)
    b = (torch.ones(3, 4, 4, dtype=torch.uint8), torch.tensor([0.0, -1.0]), 2)
    batch = collate_skip([a, None, b])
    assert batch.skipped == 1
    assert batch.images.shape == (2, 3, 4, 4) and batch.images.dtype == torch.uint8
    assert torch.equal(batch.targets, torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
    assert batch.indices.tolist() == [7, 2] and batch.indices.dtype == torch.int64
    empty = collate_skip([None, None])
    assert empty.skipped == 2 and empty.images.shape[0] == 0 and empty.targets.shape[0] == 0


@pytest.fixture
def small_set(tmp_path):
    rows = []
    for k in range(6):
        Image.effect_noise((40, 36), 30 + k).convert("RGB").save(tmp_path / f"n{k}.png")
        rows.append(f"n{k}.png,{'a' if k % 2 else 'b'}\n")
    (tmp_path / "labels.csv").write_text("image,labels\n" + "".join(rows))
    return tmp_path


def test_augmentation_depends_on_seed_epoch_index_only(small_set):
    ds = create_dataset("csv", small_set, None, 32, train=True, seed=5)
    forward = [ds[i][0] for i in range(len(ds))]
    backward = [ds[i][0] for i in reversed(range(len(ds)))][::-1]
    assert all(torch.equal(x, y) for x, y in zip(forward, backward))
    ds.set_epoch(1)
    epoch1 = [ds[i][0] for i in range(len(ds))]
    assert sum(torch.equal(x, y) for x, y in zip(forward, epoch1)) < len(ds)
    other_seed = create_dataset("csv", small_set, None, 32, train=True, seed=6)
    other_seed.set_epoch(1)
    assert sum(torch.equal(x, other_seed[i][0]) for i, x in enumerate(epoch1)) < len(ds)
    ds.set_epoch(0)
    assert all(torch.equal(forward[i], ds[i][0]) for i in range(len(ds)))


def test_workers_and_persistent_workers_see_the_epoch(small_set):
    ds = create_dataset("csv", small_set, None, 32, train=True, seed=1, with_index=True)
    expected = {}
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        expected[epoch] = torch.stack([ds[i][0] for i in range(len(ds))])
    loader = create_loader(ds, batch_size=2, shuffle=True, num_workers=2, seed=0, persistent_workers=True)
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        seen = 0
        for batch in loader:
            assert torch.equal(batch.images, expected[epoch][batch.indices])
            seen += batch.images.shape[0]
        assert seen == len(ds)


def test_seed_worker_is_deterministic():
    import random

    import numpy as np

    torch.manual_seed(123)
    seed_worker(0)
    a = (random.random(), np.random.rand())
    torch.manual_seed(123)
    seed_worker(0)
    assert (random.random(), np.random.rand()) == a


def test_dataset_pickles_for_spawn_workers(small_set, tmp_path):
    import pickle

    ds = create_dataset("csv", small_set, None, 32, train=True, seed=2, cache_dir=tmp_path / "c")
    ds.set_epoch(3)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.epoch == 3 and len(clone) == len(ds)
    assert torch.equal(clone[4][0], ds[4][0])


@pytest.mark.faults
def test_a_fifo_is_refused_by_name_instead_of_blocking(tmp_path):
    import threading

    from asl.data.transforms import UnreadableImageError, load_rgb

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    outcome = []

    def read():
        try:
            load_rgb(fifo)
        except UnreadableImageError as exc:
            outcome.append(str(exc))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=20)
    assert not reader.is_alive(), "reading a FIFO blocked"
    assert outcome and "pipe.jpg" in outcome[0] and "not a regular file" in outcome[0]
