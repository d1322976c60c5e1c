"""The training step never waits for the device on every step: the host reads that the package's own code asks
for (``.item()``, ``float()``, ``int()``, ``bool()`` of a tensor, ``tolist()``, ``numpy()``), counted from the first
optimizer step on, stay below one per four optimizer steps."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import asl
from asl.data import Batch
from asl.losses import AsymmetricLoss
from asl.training.state import create_train_state
from asl.training.step import StepConfig, train_one_epoch

CPU = torch.device("cpu")
PACKAGE = str(Path(asl.__file__).parent)
READS = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy")


class TinyNet(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _batches(n, bs=4, size=32, classes=5, unannotated=False):
    g = torch.Generator().manual_seed(0)
    out = []
    for b in range(n):
        images = torch.randint(0, 256, (bs, 3, size, size), generator=g, dtype=torch.uint8)
        targets = (torch.rand(bs, classes, generator=g) > 0.5).float()
        if unannotated:
            targets[:, 0] = -1
        out.append(Batch(images, targets, torch.arange(b * bs, (b + 1) * bs), 0))
    return out


@pytest.fixture
def host_reads(monkeypatch):
    """A list that gets the (file, line) of every host read made from src/asl once ``started[0]`` is True."""
    reads, started = [], [False]
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1)
            if started[0] and caller.f_code.co_filename.startswith(PACKAGE):
                reads.append((_name, caller.f_code.co_filename, caller.f_lineno))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return reads, started


@pytest.mark.parametrize("steps", [8, 16])
@pytest.mark.parametrize("variant", ["plain", "unannotated, 2 micro-batches"])
def test_host_reads_are_fewer_than_one_per_four_steps(host_reads, steps, variant):
    reads, started = host_reads
    torch.manual_seed(0)
    model = TinyNet()
    state = create_train_state(model, lr=1e-3, weight_decay=1e-4, ema_decay=0.99, epochs=1, steps_per_epoch=steps,
                               amp_dtype=None, device=CPU)
    state.optimizer.register_step_post_hook(lambda *args: started.__setitem__(0, True))
    unannotated = variant != "plain"
    config = StepConfig(CPU, unannotated="ignore" if unannotated else None, grad_accum_steps=2 if unannotated else 1)
    shown = []
    stats = train_one_epoch(state, _batches(steps, unannotated=unannotated), AsymmetricLoss(4, 0, 0.05), config,
                            on_step=shown.append, stop_requested=lambda: False)
    assert stats["steps"] == steps and stats["images"] == 4 * steps
    assert len(reads) < steps / 4, reads
    # the progress callback still gets the loss at the original's print steps (0, then every 100) and the last
    assert [s["step"] for s in shown if s["loss"] is not None] == [0, steps - 1]


def _ddp_worker(rank, world, out_dir):
    import json

    from process_group import joined

    from asl.training.state import TrainState
    from asl.training.step import NonFiniteLossError, create_optimizer

    with joined(rank, world, out_dir):
        results = {}
        for case in ("plain", "nan", "stop"):
            torch.manual_seed(0)
            model = TinyNet()
            state = TrainState(model, None, create_optimizer(model, lr=1e-3), None, None)
            state.train_model = nn.parallel.DistributedDataParallel(model)
            batches = _batches(12, bs=2)
            if case == "nan" and rank == 1:  # one rank alone goes bad, at step 2
                bad = batches[2]
                batches[2] = Batch(torch.full(bad.images.shape, float("nan")), bad.targets, bad.indices, 0)
            seen = []
            try:
                stats = train_one_epoch(state, batches, AsymmetricLoss(4, 0, 0.05),
                                        StepConfig(CPU, world_size=world, rank=rank),
                                        on_step=lambda s: seen.append(s["step"]),
                                        stop_requested=lambda: case == "stop" and rank == 1 and len(seen) >= 3)
                results[case] = {"steps": stats["steps"], "interrupted": stats["interrupted"],
                                 "images": stats["images"]}
            except NonFiniteLossError as exc:
                results[case] = {"bad_step": exc.step, "steps_done": len(seen)}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))


def test_under_ddp_ranks_agree_at_read_backs_without_a_collective_per_step(tmp_path):
    """Two gloo ranks: a NaN on one rank, or a stop request on one rank, is agreed by both at the same read-back
    (every 8 steps under torchrun), so neither waits forever; the first bad step is named on both."""
    import json

    import torch.multiprocessing as mp

    from asl.training.step import STOP_AGREEMENT_STEPS as EVERY

    mp.spawn(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert results[0] == results[1]
    assert results[0]["plain"] == {"steps": 12, "interrupted": False, "images": 48}  # both ranks' images
    # found at the read-back of step 8, before its optimizer step: steps 0-7 ran
    assert results[0]["nan"] == {"bad_step": 2, "steps_done": EVERY}
    assert results[0]["stop"] == {"steps": EVERY + 1, "interrupted": True, "images": 4 * (EVERY + 1)}
