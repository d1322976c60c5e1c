"""Images per second of the training pipeline, from WebDataset shards vs. from the image folder, side by side.

The pipeline is train.py's: decode -> Resize((s, s)) -> CutoutPIL -> RandAugment -> uint8 batches, in DataLoader
workers (``-j``), batch 8. Five sources, each timed in every repeat, in a rotating order, with persistent workers
and one untimed warm-up epoch:

- folder, warm page cache: ``create_dataset('coco', ...)`` reading the JPEG files;
- shards, warm: ``shards.py``'s tar files of the same split, from a local folder;
- folder, cold / shards, cold: the same, with every file's pages dropped from the page cache before each epoch
  (``posix_fadvise(DONTNEED)``; it drops clean pages of files on a disk, so the reads go to the device again);
- shards over loopback HTTP: the shard folder served by ``python -m http.server`` on 127.0.0.1 (warm cache).

The figure is the median over the repeats of the images of one epoch divided by its wall time. Last, the CPU
time per image of one worker's work (no DataLoader workers, ``time.process_time``, warm cache), by either route:
what one worker can supply, whatever else runs on the machine.

The pictures are ``--copies`` copies of the split's (separate files), so an epoch is long enough to time.

    python benchmarks/bench_shards.py [--data ../shared/data/tiny_coco] [--split train2017] [--size 448] [-j 2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from asl.data import create_dataset, create_loader
from asl.data.shards_read import create_shard_loader
from asl.data.shards_write import write_shards

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tiny_coco"


def drop_from_page_cache(paths) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # only clean pages can be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def serve(folder: Path) -> tuple[str, subprocess.Popen]:
    """``python -m http.server`` on 127.0.0.1, in its own process (as a real server would be, and so that the
    DataLoader workers are not forked from a process with a server thread in it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                               str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return url, server
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the HTTP server did not start")


def epoch_rate(loader, dataset, epoch: int, files=None) -> float:
    if files is not None:
        drop_from_page_cache(files)
    dataset.set_epoch(epoch)
    start = time.perf_counter()
    images = sum(batch.images.shape[0] for batch in loader)
    return images / (time.perf_counter() - start)


def cpu_ms_per_image(loader, dataset, epoch: int) -> float:
    dataset.set_epoch(epoch)
    start = time.process_time()
    images = sum(batch.images.shape[0] for batch in loader)
    return 1000 * (time.process_time() - start) / images


def replicate_coco(data: Path, split: str, copies: int, out: Path) -> Path:
    """A COCO layout holding ``copies`` copies of every picture of ``data``'s split (separate files, so that the
    cold runs read each one from the disk), for epochs long enough to time."""
    ann = json.loads((data / "annotations" / f"instances_{split}.json").read_text())
    images, annotations = [], []
    (out / split).mkdir(parents=True)
    (out / "annotations").mkdir()
    offset = max(im["id"] for im in ann["images"]) + 1
    for k in range(copies):
        for im in ann["images"]:
            name = f"{k}_{im['file_name']}"
            shutil.copyfile(data / split / im["file_name"], out / split / name)
            images.append(dict(im, id=im["id"] + k * offset, file_name=name))
        annotations += [dict(a, id=a["id"] + k * offset * 100, image_id=a["image_id"] + k * offset)
                        for a in ann["annotations"]]
    (out / "annotations" / f"instances_{split}.json").write_text(
        json.dumps(dict(ann, images=images, annotations=annotations)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a COCO-layout folder")
    p.add_argument("--split", type=str, default="train2017")
    p.add_argument("--size", type=int, default=448)
    p.add_argument("-j", "--workers", type=int, default=2)
    p.add_argument("-b", "--batch-size", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=14)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--copies", type=int, default=4, help="copies of every picture, for longer epochs")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        args.data = replicate_coco(args.data, args.split, args.copies, Path(tmp) / "data")
        folder = create_dataset("coco", args.data, args.split, args.size, train=True)
        shard_dir = Path(tmp) / "shards"
        write_shards(create_dataset("coco", args.data, args.split, 1, train=False), args.data, shard_dir,
                     args.split, shard_size=args.shard_size)
        url, server = serve(shard_dir)
        image_files = [folder.image_path(i) for i in range(len(folder))]
        total = sum(os.path.getsize(f) for f in image_files)
        shard_files = sorted(str(f) for f in shard_dir.glob("*.tar"))
        sources = {}
        for name, data in (("shards", shard_dir), ("http", url)):
            ds = create_dataset("webdataset", data, args.split, args.size, train=True)
            sources[name] = (ds, create_shard_loader(ds, args.batch_size, num_workers=args.workers,
                                                     persistent_workers=True))
        sources["folder"] = (folder, create_loader(folder, args.batch_size, shuffle=True, num_workers=args.workers,
                                                   persistent_workers=True))
        runs = {"folder, warm": ("folder", None), "shards, warm": ("shards", None),
                "folder, cold": ("folder", image_files), "shards, cold": ("shards", shard_files),
                "shards, loopback HTTP": ("http", None)}
        for ds, loader in sources.values():
            epoch_rate(loader, ds, 0)
        rates: dict[str, list[float]] = {name: [] for name in runs}
        names = list(runs)
        for repeat in range(args.repeats):
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                key, files = runs[name]
                ds, loader = sources[key]
                rates[name].append(epoch_rate(loader, ds, 1 + repeat, files))
        server.terminate()
        server.wait()
        del sources
        torch.set_num_threads(1)
        single = create_dataset("webdataset", shard_dir, args.split, args.size, train=True)
        in_process = {"folder": (folder, create_loader(folder, args.batch_size, shuffle=True)),
                      "shards": (single, create_shard_loader(single, args.batch_size))}
        cpu = {name: statistics.median(cpu_ms_per_image(loader, ds, 1 + r) for r in range(args.repeats))
               for name, (ds, loader) in in_process.items()}
    print(f"{len(folder)} images ({total / 2**20:.1f} MiB of JPEG), {args.size} px, -j {args.workers}, "
          f"batch {args.batch_size}, {len(shard_files)} shards, median of {args.repeats} epochs")
    print("| source | images/s | vs folder, warm |")
    print("| --- | --- | --- |")
    base = statistics.median(rates["folder, warm"])
    for name, values in rates.items():
        value = statistics.median(values)
        print(f"| {name} | {value:.1f} | {value / base:.2f}x |")
    for name, ms in cpu.items():
        print(f"one worker, {name}: {ms:.1f} ms of CPU per image = {1000 / ms:.0f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
