"""Distributed helpers: index gathering, the resumable sampler, and 2-process (gloo, CPU) runs.

The 2-process tests start real process groups on 127.0.0.1 with a free port: one through
``torch.multiprocessing`` (evaluate() under DDP equals one process; rank 0 first), one through ``torchrun``
(train.py, a worker killed and restarted).
"""
import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from asl import distributed as D
from asl.data import collate_skip
from asl.errors import UsageError
from asl.evaluation.predictions import evaluate
from process_group import free_port, joined

REPO = Path(__file__).resolve().parents[1]


class IndexedImages(torch.utils.data.Dataset):
    """Deterministic uint8 images with multi-hot targets; item i is (image, target, i)."""

    def __init__(self, n=11, num_classes=4):
        g = torch.Generator().manual_seed(1)
        self.images = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
        self.targets = (torch.rand(n, num_classes, generator=g) > 0.5).float()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.targets[i], i


def _model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))


def test_gather_by_index_sorts_and_drops_duplicates_without_a_process_group():
    idx = torch.tensor([3, 0, 2, 0, 1])
    vals = torch.tensor([[3.0], [0.0], [2.0], [0.0], [1.0]])
    out_idx, out = D.gather_by_index(idx, {"v": vals})
    assert out_idx.tolist() == [0, 1, 2, 3]
    assert out["v"].flatten().tolist() == [0.0, 1.0, 2.0, 3.0]
    assert not D.is_dist()


def test_resumable_sampler_skips_the_done_samples_of_the_epoch_only():
    ds = list(range(10))
    s = D.ResumableDistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=5)
    s.set_epoch(2)
    full = list(s)
    # torch's documented order: a permutation seeded by seed + epoch
    g = torch.Generator().manual_seed(5 + 2)
    assert full == torch.randperm(10, generator=g).tolist()
    s.set_start(4)
    assert list(s) == full[4:] and len(s) == 6
    # two ranks deal out the same permutation, padded with its first items
    r0 = D.ResumableDistributedSampler(list(range(5)), num_replicas=2, rank=0, shuffle=False)
    r1 = D.ResumableDistributedSampler(list(range(5)), num_replicas=2, rank=1, shuffle=False)
    assert list(r0) == [0, 2, 4] and list(r1) == [1, 3, 0]


def _eval_worker(rank, world, out_dir):
    with joined(rank, world, out_dir) as info:
        assert info.distributed and info.backend == "gloo" and info.rank == rank
        ds = IndexedImages()
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=collate_skip)
        out = evaluate(_model(), loader, info.device)
        total = D.all_reduce_sum(torch.tensor([rank + 1.0]))
        torch.save({"scores": torch.from_numpy(out["scores"]), "targets": torch.from_numpy(out["targets"]),
                    "indices": torch.from_numpy(out["indices"]), "total": total},
                   os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_process_evaluate_equals_single_process(tmp_path):
    # 11 items on 2 ranks: the sampler pads rank 1 with item 0, which must not be counted twice.
    mp.spawn(_eval_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ds = IndexedImages()
    single = evaluate(_model(), torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_skip),
                      torch.device("cpu"))
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["indices"].tolist() == list(range(11))
        assert torch.equal(got["targets"], torch.from_numpy(single["targets"]))
        assert torch.allclose(got["scores"], torch.from_numpy(single["scores"]), atol=1e-6)
        assert got["total"].item() == 3.0
    from asl.metrics import mAP
    a = mAP(single["targets"], single["scores"])
    b = mAP(torch.load(tmp_path / "rank0.pt")["targets"].numpy(), torch.load(tmp_path / "rank0.pt")["scores"].numpy())
    assert a == pytest.approx(b, abs=1e-9)


def _main_first_worker(rank, world, out_dir, fail):
    cache = Path(out_dir) / "cache.txt"
    with joined(rank, world, out_dir) as info:
        try:
            with D.main_process_first(info):
                if fail and rank == 0:
                    raise UsageError("HTTP 404 for the URL")
                # Rank 0 writes the "download"; the others must find it already there.
                found = cache.exists()
                if rank == 0:
                    cache.write_text("weights")
            outcome = f"found={found}"
        except UsageError as exc:
            outcome = f"error={exc}"
        (Path(out_dir) / f"rank{rank}.txt").write_text(outcome)


@pytest.mark.parametrize("fail", [False, True], ids=["rank-0-succeeds", "rank-0-fails"])
def test_main_process_first_runs_rank_0_first_and_passes_its_failure_on(tmp_path, fail):
    # Forked, not spawned: the workers run no tensor code, so they need no fresh interpreter and torch import each.
    mp.start_processes(_main_first_worker, args=(3, str(tmp_path), fail), nprocs=3, join=True,
                       start_method="fork")
    got = [(tmp_path / f"rank{r}.txt").read_text() for r in range(3)]
    if fail:  # the others stop with one line instead of waiting for a file that never comes
        others = "error=rank 0 failed (HTTP 404 for the URL); see its message"
        assert got == ["error=HTTP 404 for the URL", others, others]
    else:
        assert got == ["found=False", "found=True", "found=True"]


def test_per_rank_batch_splits_the_global_batch_evenly():
    from asl.errors import UsageError

    assert D.per_rank_batch(128, 8) == 16 and D.per_rank_batch(32, 1) == 32
    with pytest.raises(UsageError, match="not divisible"):
        D.per_rank_batch(10, 4)
    assert D.per_rank_batch(32, 3, exact=False) == 11  # evaluation: any process count (validate under torchrun)


def test_select_device():
    from asl.errors import UsageError

    assert D.select_device("cpu") == torch.device("cpu")
    assert D.select_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    with pytest.raises(UsageError, match="expected auto"):
        D.select_device("tpu")



# rank 1 dies once, mid-epoch 1, after last.pth was written at that step: a crashed node
_DIES_ONCE = """
marker = sys.argv.pop(1)


def should_die(info):
    if os.environ["RANK"] == "1" and info["epoch"] == 1 and info["step"] == 0 and not os.path.exists(marker):
        open(marker, "w").close()
        return True
    return False
"""


@pytest.mark.faults
@pytest.mark.slow
def test_torchrun_max_restarts_with_resume_auto_survives_a_killed_worker(tmp_path, make_synthetic, run_script,
                                                                         self_killing_train):
    """The cluster recipe of the README: torchrun --max-restarts=N train.py ... --resume auto. The restarted round
    must not read a dead peer's address from the previous round's keys (asl.distributed._restart_safe_store).
    Through both rounds rank 0 alone prints and writes, and it saves the unwrapped model."""
    script = tmp_path / "dies_once.py"
    script.write_text(self_killing_train(_DIES_ONCE))
    out = tmp_path / "out"
    data = make_synthetic(24, 11, 64)
    proc = run_script(["-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts=1",
                       "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", script,
                       tmp_path / "died", data, "--dataset", "synthetic", "--model-name", "timm/test_resnet",
                       "--image-size", "32", "-b", "8", "-j", "0", "--epochs", "3", "--stop-epoch", "2", "--lr", "1e-3",
                       "--output-dir", out, "--device", "cpu", "--save-every-steps", "1", "--resume", "auto"],
                      timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "died").exists()  # the worker did die once
    assert "resumed from" in proc.stdout
    assert proc.stdout.count("current_mAP = ") == 3  # epoch 0 before the death, 1 and 2 after; rank 0 alone
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "last.pth", "log.txt", "model-highest.pth"]
    last = torch.load(out / "last.pth", weights_only=True)
    assert (last["epoch"], last["step"]) == (3, 0)
    assert last["steps_per_epoch"] == 3  # 24 images, global batch 8
    assert not any(k.startswith("module.") for k in last["model"])  # the unwrapped model is saved
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0, 1, 2]
    best = torch.load(out / "model-highest.pth", weights_only=True)
    assert best["weights"] in ("ema", "regular") and best["num_classes"] == len(best["idx_to_class"])
