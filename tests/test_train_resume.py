"""Exact resume: a run stopped by --stop-epoch, or killed with SIGKILL mid-epoch, then resumed, ends with
bit-identical weights to an uninterrupted run (CPU, same seed), with -j 0 and with DataLoader workers.

A tiny timm model (timm/test_resnet) and a tiny generated set keep these runs to seconds; the property tested is
the training program's (data order, augmentation, optimizer/scheduler/EMA state, step skipping), not the model's.
"""
import json
import signal
from pathlib import Path

import pytest
import torch

from asl.apps import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]




@pytest.fixture(scope="module")
def synthetic(make_synthetic):
    return make_synthetic(32, 12, 48)


def _flags(data, out, *extra):
    return [str(data), "--dataset", "synthetic", "--model-name", "timm/test_resnet", "--image-size", "32",
            "-b", "8", "--epochs", "3", "--lr", "1e-3", "--ema-decay", "0.9", "--device", "cpu",
            "--output-dir", str(out), "--seed", "7", *extra]


def _assert_identical(a: Path, b: Path) -> None:
    la = torch.load(a / "last.pth", weights_only=True)
    lb = torch.load(b / "last.pth", weights_only=True)
    assert (la["epoch"], la["step"]) == (lb["epoch"], lb["step"])
    for part in ("model", "ema"):
        assert la[part].keys() == lb[part].keys()
        for k in la[part]:
            assert torch.equal(la[part][k], lb[part][k]), f"{part}.{k} differs"
    sa, sb = la["optimizer"]["state"], lb["optimizer"]["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), f"optimizer state {i}.{k} differs"
    assert la["scheduler"]["last_epoch"] == lb["scheduler"]["last_epoch"]
    assert la["highest_mAP"] == lb["highest_mAP"]


def test_stop_epoch_then_resume_is_bit_identical(tmp_path, synthetic):
    full, again, split = tmp_path / "full", tmp_path / "again", tmp_path / "split"
    assert train.main(_flags(synthetic, full, "-j", "0", "--stop-epoch", "1")) == 0
    # Two uninterrupted runs agree first, so that "resumed == uninterrupted" cannot hold by luck.
    assert train.main(_flags(synthetic, again, "-j", "0", "--stop-epoch", "1")) == 0
    _assert_identical(full, again)
    assert train.main(_flags(synthetic, split, "-j", "0", "--stop-epoch", "0")) == 0
    first = torch.load(split / "last.pth", weights_only=True)
    assert (first["epoch"], first["step"]) == (1, 0)
    # the command line's --stop-epoch applies on resume
    assert train.main(_flags(synthetic, split, "-j", "0", "--stop-epoch", "1", "--resume", "auto")) == 0
    _assert_identical(full, split)
    assert len((split / "log.txt").read_text().splitlines()) == 2
    assert torch.load(split / "model-highest.pth", weights_only=True)["mAP"] == \
        torch.load(full / "model-highest.pth", weights_only=True)["mAP"]


def test_resume_refuses_a_different_schedule(tmp_path, synthetic, capsys):
    out = tmp_path / "out"
    assert train.main(_flags(synthetic, out, "-j", "0", "--stop-epoch", "0", "--max-steps-per-epoch", "1")) == 0
    capsys.readouterr()
    flags = _flags(synthetic, out, "-j", "0", "--resume", "auto", "--max-steps-per-epoch", "1")
    flags[flags.index("--lr") + 1] = "2e-3"
    assert train.main(flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lr" in err[0] and "0.001" in err[0] and "0.002" in err[0]


# Run train.py in a subprocess that SIGKILLs itself right after the 3rd step of epoch 1: after the periodic
# mid-epoch last.pth (written every 2 steps) and before the next, so the step after it is lost and redone.
_DIES_AT_EPOCH_1_STEP_2 = """
def should_die(info):
    return info["epoch"] == 1 and info["step"] == 2
"""


@pytest.fixture(scope="module")
def uninterrupted(synthetic, tmp_path_factory):
    """The reference both fault tests resume to: two epochs with two DataLoader workers, uninterrupted, run once
    in-process (the process boundary matters to the runs that are killed, not to this one)."""
    torch.set_num_threads(1)
    full = tmp_path_factory.mktemp("full")
    assert train.main(_flags(synthetic, full, "-j", "2", "--stop-epoch", "1")) == 0
    return full


@pytest.mark.faults
def test_sigkill_mid_epoch_then_resume_is_bit_identical_with_workers(tmp_path, synthetic, run_script, capsys,
                                                                     self_killing_train, uninterrupted):
    full, killed = uninterrupted, tmp_path / "killed"
    common = ["-j", "2", "--stop-epoch", "1", "--save-every-steps", "2"]
    run = run_script(["-c", self_killing_train(_DIES_AT_EPOCH_1_STEP_2), *_flags(synthetic, killed, *common)])
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    saved = torch.load(killed / "last.pth", weights_only=True)
    assert (saved["epoch"], saved["step"]) == (1, 2)  # the periodic mid-epoch save survived
    assert not [p for p in killed.iterdir() if p.name.endswith(".tmp")]
    # The resumed run in-process: the process boundary matters to the run that dies, not to this one.
    capsys.readouterr()
    assert train.main(_flags(synthetic, killed, *common, "--resume", str(killed / "last.pth"))) == 0
    stdout = capsys.readouterr().out
    assert "resumed from" in stdout and "epoch 1, step 2" in stdout
    _assert_identical(full, killed)


@pytest.mark.faults
def test_sigterm_to_the_process_group_with_workers_saves_and_resumes_bit_identically(tmp_path, synthetic,
                                                                                     uninterrupted):
    """What SLURM's scancel does: SIGTERM to every process of the group, DataLoader workers included."""
    import os
    import subprocess
    import sys

    full, stopped = uninterrupted, tmp_path / "stopped"
    common = ["-j", "2", "--stop-epoch", "1", "-p", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve().parents[1] / "train.py"),
                             *_flags(synthetic, stopped, *common)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    for line in proc.stdout:
        if line.startswith("Epoch [0/3], Step [001/"):
            os.killpg(proc.pid, signal.SIGTERM)  # the whole group: the main process and its workers
            break
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-2000:]
    # where it stops depends on how fast this process read the line; any position must resume exactly
    assert "interrupted at epoch" in out and "killed by signal" not in err
    saved = torch.load(stopped / "last.pth", weights_only=True)
    assert (saved["epoch"], saved["step"]) >= (0, 2)
    assert train.main(_flags(synthetic, stopped, *common, "--resume", "auto")) == 0  # in-process, as above
    _assert_identical(full, stopped)
    # log.txt's train_loss of the interrupted epoch covers its steps before the signal too
    losses = [[json.loads(line)["train_loss"] for line in (d / "log.txt").read_text().splitlines()]
              for d in (full, stopped)]
    assert losses[0] == losses[1]


@pytest.mark.faults
def test_a_last_pth_without_its_ema_or_rng_is_refused_by_name(tmp_path, synthetic, capsys):
    out = tmp_path / "o"
    assert train.main(_flags(synthetic, out, "-j", "0", "--stop-epoch", "0")) == 0
    saved = torch.load(out / "last.pth", weights_only=True)
    del saved["ema"], saved["rng"]
    torch.save(saved, out / "last.pth")
    capsys.readouterr()
    assert train.main(_flags(synthetic, out, "-j", "0", "--resume", "auto")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "lacks ema, rng" in err and "last.pth" in err


def test_resume_onto_other_data_with_the_same_counts_is_refused_unless_forced(tmp_path, make_synthetic, capsys):
    first, second = make_synthetic(32, 12, 48, seed=0), make_synthetic(32, 12, 48, seed=1)
    out = tmp_path / "o"
    assert train.main(_flags(first, out, "-j", "0", "--stop-epoch", "0")) == 0
    capsys.readouterr()
    assert train.main(_flags(second, out, "-j", "0", "--stop-epoch", "1", "--resume", "auto")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "training data differs" in err and "root" in err and "--force-resume" in err
    assert train.main(_flags(second, out, "-j", "0", "--stop-epoch", "1", "--resume", "auto", "--force-resume")) == 0
