"""Gradient accumulation (train.py --grad-accum-steps N): one optimizer step per loader batch, the batch run in N
micro-batches whose gradients add up to the whole batch's; under DDP only the last micro-batch all-reduces."""
import contextlib
import copy

import pytest
import torch
import torch.nn as nn

from asl.data import Batch
from asl.losses import AsymmetricLoss
from asl.training.state import TrainState
from asl.training.step import StepConfig, _accumulate_gradients, create_optimizer, train_one_epoch

CPU = torch.device("cpu")


class NoNormNet(nn.Module):
    """No BatchNorm: nothing depends on which images share a micro-batch, so accumulation must be exact."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        x = x.to(self.fc.weight.dtype)  # float64 in the exactness test
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _batches(n=3, bs=8, num_classes=5):
    g = torch.Generator().manual_seed(0)
    return [Batch(torch.randint(0, 256, (bs, 3, 10, 10), generator=g, dtype=torch.uint8),
                  (torch.rand(bs, num_classes, generator=g) > 0.6).float(), None, 0) for _ in range(n)]


def _train(model, accum: int) -> tuple[nn.Module, dict, list]:
    model = copy.deepcopy(model)
    optimizer = create_optimizer(model, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-2, total_steps=3, pct_start=0.2)
    state = TrainState(model=model, ema=None, optimizer=optimizer, scheduler=scheduler, scaler=None)
    losses = []
    stats = train_one_epoch(state, _batches(), AsymmetricLoss(4, 0, 0.05),
                            StepConfig(CPU, grad_accum_steps=accum, print_freq=1),
                            on_step=lambda s: losses.append(s["loss"]))
    return model, stats, losses


@pytest.mark.parametrize("accum", [2, 3, 8])
def test_accumulated_steps_equal_the_whole_batch_without_batchnorm(accum):
    torch.manual_seed(0)
    model = NoNormNet().double()
    whole, whole_stats, whole_losses = _train(model, 1)
    parts, parts_stats, parts_losses = _train(model, accum)
    assert parts_stats["steps"] == whole_stats["steps"] == 3  # one optimizer, schedule and log step per batch
    # The step computes the loss on model(x).float() (the original's), so sums split differently round at float32.
    assert parts_losses == pytest.approx(whole_losses, rel=1e-6)  # the summed loss is the whole batch's
    for (name, a), b in zip(whole.named_parameters(), parts.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-8, msg=name)


def test_under_ddp_only_the_last_micro_batch_all_reduces():
    synced = []

    class FakeDDP(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = NoNormNet()
            self.skipping = False

        @contextlib.contextmanager
        def no_sync(self):
            self.skipping = True
            try:
                yield
            finally:
                self.skipping = False

        def forward(self, x):
            synced.append(not self.skipping)
            return self.module(x)

    model = FakeDDP()
    state = TrainState(model=model, ema=None, optimizer=create_optimizer(model), scheduler=None, scaler=None)
    batch = _batches(1)[0]
    _accumulate_gradients(state, batch.images, batch.targets, AsymmetricLoss(), StepConfig(CPU, world_size=2,
                                                                                           grad_accum_steps=4))
    assert synced == [False, False, False, True]


@pytest.mark.slow
def test_train_py_takes_the_flag_and_records_it(tmp_path, make_synthetic, capsys):
    from asl.apps import train
    from asl.cli import run_main

    data = make_synthetic(8, 8, 32)
    code = run_main(train.main, [str(data), "--dataset", "synthetic", "--model-name", "timm/test_resnet",
                                 "--image-size", "32", "-b", "4", "-j", "0",
                                 "--epochs", "1", "--stop-epoch", "0", "--device", "cpu", "--grad-accum-steps", "2",
                                 "--output-dir", str(tmp_path / "run")])
    assert code == 0, capsys.readouterr().err[-2000:]
    last = torch.load(tmp_path / "run" / "last.pth", weights_only=True)
    assert last["args"]["grad_accum_steps"] == 2 and last["step"] == 0 and last["epoch"] == 1
