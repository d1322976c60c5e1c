"""Shards under a real process group (2 processes, gloo, CPU): evaluation gathers exactly the single-process scores,
training epochs have the same number of batches on both ranks however unequal their shards, and train.py under
torchrun finishes its epoch and records the images of both ranks."""
import json
import os
from pathlib import Path

import pytest
from process_group import free_port, joined

import torch
import torch.multiprocessing as mp
import torch.nn as nn

from asl import distributed as D
from asl.data import create_dataset, generate_synthetic_coco
from asl.data.shards_read import create_shard_loader
from asl.data.shards_write import write_shards
from asl.evaluation.predictions import evaluate

REPO = Path(__file__).resolve().parents[1]


def _model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6))


def _worker(rank, world, shards, out_dir):
    with joined(rank, world, out_dir) as info:
        ds = create_dataset("webdataset", shards, "train", 16, train=False, with_index=True)
        out = evaluate(_model(), create_shard_loader(ds, 4, rank=rank, world_size=world), info.device)
        train = create_dataset("webdataset", shards, "train", 16, train=True, with_index=True)
        loader = create_shard_loader(train, 3, rank=rank, world_size=world)
        train.set_epoch(0)
        batches = 0
        for _ in loader:
            D.all_reduce_sum(torch.ones(1))  # as a DDP step would: a rank with fewer batches would hang here
            batches += 1
        torch.save({"scores": torch.from_numpy(out["scores"]), "indices": torch.from_numpy(out["indices"]),
                    "batches": batches, "planned": len(loader)}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_processes_evaluate_exactly_and_train_in_lockstep(tmp_path):
    root = generate_synthetic_coco(tmp_path / "syn", num_train=23, num_val=1, image_size=16)
    shards = tmp_path / "shards"
    # shards of 10, 10 and 3 samples: rank 0 reads 13 (5 batches of 3), rank 1 reads 10 (4 batches, 1 read again)
    write_shards(create_dataset("synthetic", root, "train", 16, train=False), root, shards, "train", shard_size=10)
    mp.spawn(_worker, args=(2, str(shards), str(tmp_path)), nprocs=2, join=True)
    single = evaluate(_model(), create_shard_loader(
        create_dataset("webdataset", shards, "train", 16, train=False, with_index=True), 4), torch.device("cpu"))
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for g in got:
        assert g["indices"].tolist() == list(range(23))
        assert torch.equal(g["scores"], torch.from_numpy(single["scores"]))
    assert got[0]["batches"] == got[1]["batches"] == got[0]["planned"] == got[1]["planned"]


@pytest.mark.slow
def test_torchrun_trains_from_unequal_shards_without_a_hang(tmp_path, run_script):
    root = generate_synthetic_coco(tmp_path / "syn", num_train=19, num_val=6, image_size=16)
    shards = tmp_path / "shards"
    for split in ("train", "val"):
        write_shards(create_dataset("synthetic", root, split, 32, train=False), root, shards, split, shard_size=8)
    out = tmp_path / "run"
    proc = run_script(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                       f"--master_port={free_port()}", REPO / "train.py", shards, "--dataset", "webdataset",
                       "--train-split", "train", "--val-split", "val", "--model-name", "timm/test_resnet",
                       "--image-size", "32", "-b", "8", "-j", "0", "--epochs", "1", "--stop-epoch", "0", "--lr",
                       "1e-3", "--output-dir", out, "--device", "cpu"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "log.txt").read_text())
    # shards of 8, 8, 3: rank 0 reads 8 + 3 (batches of 4, 4, 3), rank 1 reads 8 (4, 4) and one batch of 4 again
    assert (record["steps"], record["images"]) == (3, 23)
