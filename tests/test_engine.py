"""engine: optimizer groups, the training step's contract, and evaluate() order/scores."""
import errno
import math
import pathlib

import pytest
import torch
import torch.nn as nn

from asl.data import Batch
from asl.training.ema import ModelEma
from asl.evaluation.predictions import evaluate, evaluate_many
from asl.training.step import (NonFiniteLossError, StepConfig, create_optimizer, param_groups_weight_decay,
                              train_one_epoch)
from asl.training.state import TrainState
from asl.losses import AsymmetricLoss

CPU = torch.device("cpu")


class TinyNet(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


def _batches(n_batches=3, bs=4, num_classes=3, seed=0, with_index=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n_batches):
        images = torch.randint(0, 256, (bs, 3, 8, 8), generator=g, dtype=torch.uint8)
        targets = (torch.rand(bs, num_classes, generator=g) > 0.5).float()
        idx = torch.arange(b * bs, (b + 1) * bs) if with_index else None
        out.append(Batch(images, targets, idx, 0))
    return out


def test_weight_decay_groups_follow_the_original_rule():
    model = TinyNet()
    no_decay, decay = param_groups_weight_decay(model, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["conv.weight", "fc.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == ["bn.bias", "bn.weight", "conv.bias", "fc.bias"]
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0


def test_adam_weight_decay_is_l2_added_to_the_gradient_on_weights_only():
    torch.manual_seed(0)
    model = TinyNet()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = create_optimizer(model, lr=0.1, weight_decay=0.5)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    for n, p in model.named_parameters():
        g = grads[n] + (0.5 * w0[n] if n in ("conv.weight", "fc.weight") else 0)
        # first Adam step written out: m_hat = g, v_hat = g^2, update = lr * m_hat / (sqrt(v_hat) + eps)
        expected = w0[n] - 0.1 * g / (g.abs() + 1e-8)
        assert torch.allclose(p.detach(), expected, atol=1e-6), n


def _setup(seed=0):
    torch.manual_seed(seed)
    model = TinyNet()
    opt = create_optimizer(model, lr=1e-2, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, steps_per_epoch=3, epochs=2, pct_start=0.2)
    ema = ModelEma(model, 0.9)
    crit = AsymmetricLoss(gamma_neg=4, gamma_pos=0, clip=0.05)
    return model, opt, sched, ema, crit


def _epoch(model, batches, crit, opt, sched, ema, epoch=0, start_step=0, max_steps=None, world_size=1,
           unannotated=None, print_freq=100, **kwargs):
    state = TrainState(model, ema, opt, sched, None, epoch=epoch, step=start_step)
    config = StepConfig(CPU, None, world_size, unannotated, max_steps, print_freq=print_freq)
    stats = train_one_epoch(state, batches, crit, config, **kwargs)
    stats["next_step"] = state.step
    return stats


def test_one_epoch_steps_scheduler_and_ema_every_step_and_reports_the_summed_loss():
    model, opt, sched, ema, crit = _setup()
    batches = _batches()
    seen = []
    stats = _epoch(model, batches, crit, opt, sched, ema, on_step=seen.append, print_freq=1)
    assert stats["steps"] == 3 and stats["next_step"] == 3 and stats["images"] == 12
    assert sched.last_epoch == 3  # one scheduler step per optimizer step
    assert [s["step"] for s in seen] == [0, 1, 2]
    # the reported loss of the first step is the summed ASL of the initial model's fp32 output
    model2, *_ = _setup()
    x = batches[0].images.float() / 255
    first = crit(model2(x).float(), batches[0].targets).item()
    assert seen[0]["loss"] == pytest.approx(first, rel=1e-6)
    assert stats["loss"] == pytest.approx(sum(s["loss"] for s in seen) / 3)
    assert seen[-1]["lr"] == pytest.approx(sched.get_last_lr()[0])
    # EMA moved, by the original rule, towards the model
    assert not torch.equal(ema.state_dict()["fc.weight"], model2.state_dict()["fc.weight"])


def test_the_loss_is_read_back_at_the_print_interval_and_the_epochs_last_step_only():
    """Reading the loss less often changes nothing but when it is shown: the same losses at the read-back steps,
    the same epoch mean, the same weights."""
    runs = {}
    for print_freq in (1, 3):
        model, opt, sched, ema, crit = _setup()
        seen = []
        stats = _epoch(model, _batches(7), crit, opt, None, ema, on_step=seen.append, print_freq=print_freq)
        runs[print_freq] = seen, stats, model.state_dict()
    every, sparse = runs[1][0], runs[3][0]
    assert [s["loss"] is not None for s in sparse] == [True, False, False, True, False, False, True]
    for a, b in zip(every, sparse):
        assert b["loss"] is None or b["loss"] == pytest.approx(a["loss"], rel=1e-12)
        assert a["images"] == b["images"] == 4 * (a["step"] + 1)
    assert runs[3][1]["loss"] == pytest.approx(sum(s["loss"] for s in every) / 7, rel=1e-12)
    assert runs[1][1]["steps"] == runs[3][1]["steps"] == 7 and runs[3][1]["images"] == 28
    for key, value in runs[1][2].items():
        assert torch.equal(value, runs[3][2][key]), key


def test_resume_in_the_middle_of_an_epoch_equals_running_through():
    full = _setup()
    _epoch(full[0], _batches(), full[4], full[1], full[2], full[3])
    part = _setup()
    b = _batches()
    first = _epoch(part[0], b[:1], part[4], part[1], part[2], part[3], max_steps=3)
    assert first["next_step"] == 1
    rest = _epoch(part[0], b[1:], part[4], part[1], part[2], part[3], start_step=1, max_steps=3)
    assert rest["next_step"] == 3
    for (k, v), v2 in zip(full[0].state_dict().items(), part[0].state_dict().values()):
        assert torch.equal(v, v2), k


def test_max_steps_and_stop_request_end_the_epoch_after_the_current_step():
    model, opt, sched, ema, crit = _setup()
    assert _epoch(model, _batches(), crit, opt, sched, ema, max_steps=2)["steps"] == 2
    model, opt, sched, ema, crit = _setup()
    calls = []
    stats = _epoch(model, _batches(), crit, opt, sched, ema,
                   stop_requested=lambda: (calls.append(1), len(calls) >= 2)[1])
    assert stats["interrupted"] and stats["steps"] == 2 and sched.last_epoch == 2


def test_world_size_scales_the_gradient_to_the_global_sum(monkeypatch):
    # Under DDP gradients are averaged over ranks; the loss is multiplied by world_size so the gradient is the
    # one of the loss summed over the global batch. Checked on one process (all-reduce faked as identity).
    import asl.distributed

    monkeypatch.setattr(asl.distributed, "all_reduce_sum", lambda t: t.clone())
    grads = []
    for ws in (1, 2):
        model, opt, sched, ema, crit = _setup()
        monkeypatch.setattr(opt, "step", lambda *a, **k: None)  # keep the gradient to inspect it
        _epoch(model, _batches(1), crit, opt, None, None, world_size=ws)
        grads.append(model.fc.weight.grad.clone())
    assert torch.allclose(grads[1], 2 * grads[0])


def test_unannotated_targets_are_masked_out_of_the_loss():
    model, opt, sched, ema, crit = _setup()
    b = _batches(1)[0]
    targets = b.targets.clone()
    targets[:, 0] = -1
    seen = []
    _epoch(model, [Batch(b.images, targets, b.indices, 0)], crit, opt, None, None, unannotated="ignore",
           on_step=seen.append)
    model2, *_ = _setup()
    logits = model2(b.images.float() / 255)
    expected = crit(logits[:, 1:], b.targets[:, 1:]).item()  # column 0 does not count at all
    assert seen[0]["loss"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.faults
def test_a_non_finite_loss_stops_at_the_next_read_back_naming_the_first_bad_step():
    model, opt, sched, ema, crit = _setup()
    batches = _batches(7)
    bad = batches[2]
    batches[2] = Batch(torch.full(bad.images.shape, float("nan")), bad.targets, bad.indices, 0)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at epoch 1, step 2 ") as err:
        _epoch(model, batches, crit, opt, None, ema, epoch=1, print_freq=4)
    assert err.value.step == 2
    # steps 0-3 ran; step 4 read back, and stopped before its optimizer step
    assert opt.state[model.fc.weight]["step"] == 4


@pytest.mark.faults
def test_a_caller_saving_every_n_steps_saves_only_states_whose_losses_were_read_and_finite():
    """fit saves after every N-th step (--save-every-steps); check_every N puts a read-back on each of those steps,
    so a NaN at step 2 is found at step 3's read-back, before the save that would follow step 3."""
    model, opt, sched, ema, crit = _setup()
    batches = _batches(6)
    bad = batches[2]
    batches[2] = Batch(torch.full(bad.images.shape, float("nan")), bad.targets, bad.indices, 0)
    state = TrainState(model, ema, opt, None, None)
    read, saved = [], []

    def on_step(info):
        if info["loss"] is not None:
            read.append(info["step"])
        if state.step % 2 == 0:  # where fit would save
            saved.append(state.step)

    with pytest.raises(NonFiniteLossError) as err:
        train_one_epoch(state, batches, crit, StepConfig(CPU, check_every=2), on_step=on_step)
    assert err.value.step == 2 and read == [0, 1] and saved == [2]


@pytest.mark.faults
def test_non_finite_loss_stops_before_the_optimizer_step():
    model, opt, sched, ema, crit = _setup()
    with torch.no_grad():
        model.fc.bias.fill_(float("nan"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="non-finite loss"):
        _epoch(model, _batches(), crit, opt, sched, ema, epoch=4)
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith("fc") or k.startswith("conv"):  # parameters untouched (no step taken)
            assert torch.equal(v, after[k]) or (v.isnan().all() and after[k].isnan().all()), k
    assert sched.last_epoch == 0


def test_evaluate_returns_sigmoid_scores_in_dataset_order_and_restores_train_mode():
    torch.manual_seed(0)
    model = TinyNet().train()
    batches = _batches(3)
    # shuffle the batch order and the rows: evaluate sorts by dataset index
    shuffled = []
    for b in reversed(batches):
        perm = torch.tensor([2, 0, 3, 1])
        shuffled.append(Batch(b.images[perm], b.targets[perm], b.indices[perm], 1))
    out = evaluate(model, shuffled, CPU)
    assert model.training
    assert out["num_images"] == 12 and out["skipped"] == 3
    assert out["indices"].tolist() == list(range(12))
    model.eval()
    with torch.no_grad():
        x = torch.cat([b.images for b in batches]).float() / 255
        expected = torch.sigmoid(model(x)).numpy()
    assert out["scores"].shape == (12, 3)
    assert abs(out["scores"] - expected).max() < 1e-6
    assert (out["targets"] == torch.cat([b.targets for b in batches]).numpy()).all()


def test_evaluate_many_runs_each_model_and_handles_missing_indices():
    torch.manual_seed(0)
    a, b = TinyNet(), TinyNet()
    out = evaluate_many({"a": a, "b": b}, _batches(2, with_index=False), CPU)
    assert set(out["scores"]) == {"a", "b"}
    assert out["indices"].tolist() == list(range(8))
    assert not math.isclose(float(out["scores"]["a"].sum()), float(out["scores"]["b"].sum()))


@pytest.mark.parametrize("total", list(range(1, 12)))
def test_the_recipe_schedule_runs_for_every_length(total):
    """OneCycleLR alone fails on exactly 5 steps (a zero-length warm-up phase); the recipe's schedule does not."""
    from asl.training.state import create_train_state

    state = create_train_state(TinyNet(), lr=1e-3, weight_decay=1e-4, ema_decay=0.9, epochs=1,
                               steps_per_epoch=total, amp_dtype=None, device=CPU)
    lrs = []
    for _ in range(total):
        state.optimizer.step()
        state.scheduler.step()
        lrs.append(state.optimizer.param_groups[0]["lr"])
    assert all(0 <= lr <= 1e-3 for lr in lrs)


@pytest.mark.faults
def test_checkpointer_never_replaces_a_good_last_pth_with_non_finite_weights(tmp_path):
    from asl.training.run_folder import RunFolder
    from asl.errors import TrainingDivergedError

    model, opt, sched, ema, _ = _setup()
    state = TrainState(model, ema, opt, sched, None)
    run_folder = RunFolder(tmp_path, True, {"num_classes": 4, "idx_to_class": dict(enumerate("abcd"))})
    with pytest.raises(TrainingDivergedError, match="no checkpoint was written yet"):
        with torch.no_grad():
            model.fc.weight[0, 0] = float("inf")
        run_folder.save_last(state)
    assert not run_folder.last_path.exists()
    with torch.no_grad():
        model.fc.weight[0, 0] = 0.0
    run_folder.save_last(state)
    good = run_folder.last_path.read_bytes()
    with torch.no_grad():
        model.fc.bias.fill_(float("nan"))
    with pytest.raises(TrainingDivergedError, match="holds the last good state"):
        run_folder.save_last(state)
    with pytest.raises(TrainingDivergedError, match="3 weights are NaN"):
        run_folder.save_best(model.state_dict(), "regular", 50.0, 0)
    assert run_folder.last_path.read_bytes() == good and not (tmp_path / "model-highest.pth").exists()


@pytest.mark.faults
def test_stale_temporary_files_of_a_killed_save_are_removed_at_the_next_start(tmp_path):
    from asl.training.run_folder import RunFolder

    stale = tmp_path / ".last.pth.12345.abcd1234.tmp"
    stale.write_bytes(b"half a checkpoint")
    unrelated = tmp_path / "notes.tmp"
    unrelated.write_text("keep")
    with RunFolder.prepare(tmp_path, is_main=True):
        assert not stale.exists() and unrelated.exists()


@pytest.mark.faults
def test_a_failed_save_on_a_read_only_folder_reports_the_real_error(tmp_path, monkeypatch):
    from asl.atomic import atomic_write

    def fail(f):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(pathlib.Path, "unlink", lambda self, missing_ok=False: (_ for _ in ()).throw(
        PermissionError(13, "cannot remove")))
    with pytest.raises(OSError, match="Read-only file system"):
        atomic_write(tmp_path / "x.bin", fail)


def _fake_disk_usage(free):
    from collections import namedtuple

    return lambda path: namedtuple("usage", "total used free")(10**12, 10**12 - free, free)


@pytest.mark.faults
def test_the_space_check_refuses_a_full_disk_with_numbers_that_differ(tmp_path, monkeypatch):
    import re
    import shutil

    from asl.errors import UsageError
    from asl.training.run_folder import RunFolder

    model, opt, sched, ema, _ = _setup()
    state = TrainState(model, ema, opt, sched, None)
    # The attack's case: a few bytes short of the need, which whole MiB rounded to the same number twice.
    for free in (1000, 16 * 2**20):
        monkeypatch.setattr(shutil, "disk_usage", _fake_disk_usage(free))
        with pytest.raises(UsageError, match=f"no space left for checkpoints in {re.escape(str(tmp_path))}") as err:
            RunFolder(tmp_path, True, {}).check_space(state)
        needed, shown_free = map(float, re.search(r"about ([\d.]+) MiB needed .*, ([\d.]+) MiB free",
                                                  str(err.value)).groups())
        assert needed > shown_free and shown_free <= free / 2**20


@pytest.mark.faults
def test_the_space_check_counts_the_files_a_run_replaces(tmp_path, monkeypatch):
    import shutil

    from asl.errors import UsageError
    from asl.training.run_folder import HIGHEST, RunFolder

    # A model whose tensors outweigh everything else in its files (1 MiB of weights), after one step so that
    # Adam's moments exist, as in every saved last.pth.
    model = nn.Linear(512, 512)
    opt = create_optimizer(model, lr=1e-3, weight_decay=0.0)
    model(torch.ones(1, 512)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=10)
    state = TrainState(model, ModelEma(model, 0.9), opt, sched, None)
    folder = RunFolder(tmp_path, True, {"num_classes": 512, "idx_to_class": {i: str(i) for i in range(512)}})
    folder.save_last(state)
    folder.save_best(model.state_dict(), "regular", 1.0, 0)
    last, best = folder.last_path.stat().st_size, (tmp_path / HIGHEST).stat().st_size
    assert last > 4 * 2**20 > 4 * best / 1.1  # model, EMA and two moments: four times the weights
    # With both files there, a save needs room for one new last.pth beside the old one (plus the margin for the
    # small files); without them, for last.pth twice over and model-highest.pth.
    monkeypatch.setattr(shutil, "disk_usage", _fake_disk_usage(last + 16 * 2**20))
    folder.check_space(state)
    fresh = RunFolder(tmp_path / "fresh", True, {})
    (tmp_path / "fresh").mkdir()
    with pytest.raises(UsageError, match="no space left for checkpoints"):
        fresh.check_space(state)
    monkeypatch.setattr(shutil, "disk_usage", _fake_disk_usage(2 * last + best + 16 * 2**20))
    fresh.check_space(state)


class _DiskFillsUp:
    """A file on a disk with ``room`` bytes left: a write past that fails as the kernel's does (ENOSPC)."""

    def __init__(self, f, room):
        self._f, self._room = f, room
        self.name = f.name

    def write(self, data):
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


_FULL_DISK_FAULTS = {
    # torch.save's own reaction to a file system that fills up part-way through the checkpoint
    "disk fills up": None,
    "ENOSPC from a write": OSError(errno.ENOSPC, "No space left on device"),
    "torch's short write": RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 453798272 vs "
                                        "453798160"),
    "torch's failed write": RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed"),
    "over quota": OSError(errno.EDQUOT, "Disk quota exceeded"),
}


@pytest.mark.faults
@pytest.mark.parametrize("fault", list(_FULL_DISK_FAULTS))
def test_a_full_disk_during_a_save_says_so_names_the_folder_and_keeps_the_last_checkpoint(tmp_path, monkeypatch,
                                                                                          fault):
    import asl.atomic
    from asl.errors import CheckpointError
    from asl.training.run_folder import RunFolder

    model, opt, sched, ema, _ = _setup()
    state = TrainState(model, ema, opt, sched, None)
    folder = RunFolder(tmp_path, True, {"num_classes": 3, "idx_to_class": dict(enumerate("abc"))})
    folder.save_last(state)
    good = folder.last_path.read_bytes()
    state.step = 1  # a later position, so that the file would change
    if _FULL_DISK_FAULTS[fault] is None:
        monkeypatch.setattr(asl.atomic, "open", lambda path, mode: _DiskFillsUp(open(path, mode), 4096),
                            raising=False)
    else:
        def failing_save(obj, f, *args, **kwargs):
            f.write(b"part of a checkpoint")
            raise _FULL_DISK_FAULTS[fault]

        monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointError) as err:
        folder.save_last(state)
    message = str(err.value)
    assert "\n" not in message and "unexpected pos" not in message and "Traceback" not in message
    assert message.startswith("disk quota exceeded: " if fault == "over quota" else "disk full: ")
    assert f"could not save last.pth in {tmp_path} (" in message
    assert f"{folder.last_path} holds the last good state" in message and "--resume auto" in message
    assert folder.last_path.read_bytes() == good
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.faults
def test_a_failed_save_for_another_reason_is_not_called_a_full_disk(tmp_path, monkeypatch):
    from asl.checkpoint import save_checkpoint
    from asl.errors import CheckpointError

    def failing_save(obj, f, *args, **kwargs):
        try:
            raise OSError(errno.EIO, "Input/output error")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 10 vs 5")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint({"x": torch.ones(1)}, tmp_path / "x.pth")
    assert "disk full" not in str(err.value) and str(err.value).startswith("could not save checkpoint to ")


@pytest.mark.faults
def test_the_first_save_of_a_run_failing_never_claims_an_earlier_runs_checkpoint(tmp_path, monkeypatch):
    from asl.errors import CheckpointError
    from asl.training.run_folder import RunFolder

    model, opt, sched, ema, _ = _setup()
    state = TrainState(model, ema, opt, sched, None)
    (tmp_path / "last.pth").write_bytes(b"an earlier run's file")

    def full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    folder = RunFolder(tmp_path, True, {"num_classes": 3, "idx_to_class": dict(enumerate("abc"))})
    with pytest.raises(CheckpointError, match="no checkpoint was written yet$"):
        folder.save_last(state)


@pytest.mark.faults
def test_a_full_disk_when_logging_leaves_the_log_whole_and_says_so(tmp_path, monkeypatch):
    import json
    import os

    import asl.training.run_folder as run_folder_module
    from asl.errors import UsageError
    from asl.training.run_folder import RunFolder

    folder = RunFolder(tmp_path, True, {})
    folder.log_epoch({"epoch": 0, "mAP": 50.0})
    real_write = os.write

    def half_then_full(fd, data):
        if len(data) > 4:  # the kernel writes what fits, then refuses the rest
            return real_write(fd, bytes(data[:len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "write", half_then_full)
        with pytest.raises(UsageError) as err:
            folder.log_epoch({"epoch": 1, "mAP": 60.0})
    assert str(err.value) == f"disk full: could not write log.txt in {tmp_path}"
    assert [json.loads(line) for line in (tmp_path / "log.txt").read_text().splitlines()] == \
        [{"epoch": 0, "mAP": 50.0}]

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(run_folder_module, "atomic_write_text", full)
    with pytest.raises(UsageError, match=f"^disk full: could not write args.json in {tmp_path}$"):
        folder.write_args({"lr": 1e-4})
