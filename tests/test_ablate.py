"""ablate.py: variants, the default CPU plan and its skewed data, a tiny sweep end to end, resume and skip."""
from __future__ import annotations

import errno
import json
import os
import re
import shlex

import numpy as np
import pytest
from PIL import Image

from asl.apps.ablate_variants import parse_variant
from asl.apps import ablate
from asl.cli import run_main
from asl.data import create_dataset
from asl.errors import UsageError


def test_variant_spellings_and_errors():
    v = parse_variant("focal:2,2,0")
    assert (v.name, v.gamma_neg, v.gamma_pos, v.clip) == ("focal", 2.0, 2.0, 0.0)
    assert parse_variant("4,1,0.05").name == "asl_4_1_0.05"
    for bad, message in [("x:1,2", "expected NAME:GAMMA_NEG"), ("x:a,b,c", "expected NAME:GAMMA_NEG"),
                         ("x:-1,0,0", "must be >= 0"), ("x:1,0,1.5", "clip within"), ("../x:1,0,0", "names a folder"),
                         ("x:nan,0,0", "expected NAME:GAMMA_NEG")]:
        with pytest.raises(UsageError, match=re.escape(message)):
            parse_variant(bad)


def test_bad_input_is_one_line(tmp_path, capsys):
    empty = tmp_path / "variants.txt"
    empty.write_text("# nothing yet\n\n")
    occupied = tmp_path / "a_file"
    occupied.write_text("")
    cases = [(["--variants-file", str(empty)], "lists no variant"),
             (["--variants-file", str(tmp_path / "absent.txt")], "cannot read the variants file"),
             (["--variants", "a:1,0,0", "a:2,0,0"], "two variants are named 'a'"),
             (["--output-dir", str(occupied)], "cannot create the output folder"),
             (["--", "DATA", "--clip=0.1"], "--clip is set by ablate.py")]
    for argv, message in cases:
        assert run_main(ablate.main, argv) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and message in err.strip().splitlines()[-1], (argv, err)


def test_default_plan_is_the_papers_comparison_on_skewed_data(tmp_path, capsys):
    assert run_main(ablate.main, ["--output-dir", str(tmp_path / "abl"), "--dry-run"]) == 0
    commands = [shlex.split(line)[2:] for line in capsys.readouterr().out.splitlines()]
    losses = []
    for command in commands:
        losses.append(tuple(float(command[command.index(f) + 1]) for f in ("--gamma-neg", "--gamma-pos", "--clip")))
        assert command[command.index("--output-dir") + 1].startswith(str(tmp_path / "abl" / "runs"))
        assert command[command.index("--resume") + 1] == "auto"
    assert {(0, 0, 0), (2, 2, 0), (4, 1, 0.05), (4, 0, 0.05)} <= set(losses)
    sweep = sorted(g for g, p, c in losses if (p, c) == (0, 0.05))
    assert len(sweep) >= 3
    # The data the plan generates: class frequencies skewed as COCO's, about 3 labels per picture.
    options = dict(re.match(r"--dataset-option=(\w+)=(\S+)", t).groups() for t in commands[0]
                   if t.startswith("--dataset-option="))
    small = {**options, "num_train": 400, "num_val": 1}
    dataset = create_dataset("synthetic", tmp_path / "data", "train", 64, train=False,
                             **{k: float(v) if "." in str(v) else int(v) for k, v in small.items()})
    targets = np.stack([dataset.target(i).numpy() for i in range(len(dataset))])
    per_class = targets.sum(0)
    assert targets.shape[1] >= 20
    assert 2.5 <= targets.sum(1).mean() <= 3.5
    assert per_class[:3].mean() > 6 * per_class[-3:].mean()  # a long tail of rare classes


TINY = ["--dataset", "synthetic", "--dataset-option=num_train=8", "--dataset-option=num_val=8",
        "--dataset-option=synthetic_classes=8", "--dataset-option=skew=1", "--model-name", "timm/test_resnet",
        "--model-path", "", "--image-size", "32", "-b", "4", "-j", "0", "--lr", "1e-3", "--ema-decay", "0.9",
        "--print-freq", "100"]


def log_lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.txt").read_text().splitlines()]


def test_tiny_sweep_resumes_skips_and_reports(tmp_path, capsys, one_thread):
    out, data = tmp_path / "abl", str(tmp_path / "data")
    recipe = ["--", data, *TINY, "--epochs", "2", "--stop-epoch", "1"]
    # A variant left half-done (one of two epochs, as a killed sweep leaves it) is continued, not restarted.
    from asl.apps import train
    assert run_main(train.main, [data, *TINY, "--epochs", "2", "--stop-epoch", "0", "--gamma-neg", "0",
                                 "--gamma-pos", "0", "--clip", "0", "--output-dir", str(out / "runs" / "ce")]) == 0
    capsys.readouterr()
    assert run_main(ablate.main, ["--output-dir", str(out), "--variants", "ce:0,0,0", "asl:4,0,0.05", *recipe]) == 0
    stdout = capsys.readouterr().out
    assert "resumed from" in stdout and "at epoch 1" in stdout
    for name in ("ce", "asl"):
        assert [r["epoch"] for r in log_lines(out / "runs" / name)] == [0, 1]
        assert (out / "runs" / name / "model-highest.pth").is_file() and not (out / "runs" / name / "last.pth").exists()
    table = (out / "results.md").read_text()
    for name in ("ce", "asl"):
        highest = max(r["mAP"] for r in log_lines(out / "runs" / name))
        row = re.search(rf"^\| {name} \|.*$", table, re.M).group(0)
        assert f"**{highest:.2f}**" in row
    with Image.open(out / "map_vs_gamma_neg.png") as im:
        assert im.format == "PNG"
    assert [r["name"] for r in json.loads((out / "results.json").read_text())] == ["ce", "asl"]

    # Again, with one more variant: the finished ones are skipped, the new one trains.
    assert run_main(ablate.main, ["--output-dir", str(out), "--variants", "ce:0,0,0", "asl:4,0,0.05",
                                  "focal:2,2,0", *recipe]) == 0
    stdout = capsys.readouterr().out
    assert stdout.count("finished earlier, skipped") == 2
    assert len(log_lines(out / "runs" / "ce")) == 2 and len(log_lines(out / "runs" / "focal")) == 2
    assert re.search(r"^\| focal \| 2 \| 2 \| 0 \| \*\*", (out / "results.md").read_text(), re.M)

    # Other train.py arguments for an existing run: refused, not silently mixed.
    changed = ["--output-dir", str(out), "--variants", "ce:0,0,0", "--", data, *TINY, "--epochs", "3"]
    assert run_main(ablate.main, changed) == 2
    assert "was started with other train.py arguments" in capsys.readouterr().err


def _plan_command(out, data, name, flags):
    """The train.py command ablate.py runs for a variant: the recipe, the loss flags, its folder, --resume auto."""
    return [data, *TINY, "--epochs", "3", "--stop-epoch", "2", *flags, "--output-dir", str(out / "runs" / name),
            "--resume", "auto"]


def _finished_variant(out, data):
    """A variant finished earlier (as its ablate.json and log.txt say), so that ablate.py trains nothing and goes
    straight to writing the results."""
    run_dir = out / "runs" / "ce"
    run_dir.mkdir(parents=True)
    command = _plan_command(out, data, "ce", ["--gamma-neg", "0", "--gamma-pos", "0", "--clip", "0"])
    (run_dir / "ablate.json").write_text(json.dumps({"train_args": command, "seconds": 12.0, "finished": True}))
    (run_dir / "log.txt").write_text("".join(json.dumps({"epoch": e, "mAP": 40.0 + e, "time": 1e9 + e}) + "\n"
                                             for e in range(3)))
    return run_dir, ["--output-dir", str(out), "--variants", "ce:0,0,0", "--", data, *TINY, "--epochs", "3",
                     "--stop-epoch", "2"]


def _no_training(argv):
    raise AssertionError(f"train.py should not run: {argv}")


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "disk full"), (errno.EDQUOT, "disk full"),
                                         (errno.EROFS, "read-only")])
@pytest.mark.parametrize("target", ["results", "plot"])
def test_full_or_read_only_disk_while_writing_results_is_one_line(tmp_path, capsys, monkeypatch, code, words,
                                                                     target):
    out = tmp_path / "abl"
    run_dir, argv = _finished_variant(out, str(tmp_path / "data"))
    kept = {p.name: p.read_bytes() for p in run_dir.iterdir()}

    def no_room(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    from asl.apps import ablate_variants
    monkeypatch.setattr(ablate.train_app, "main", _no_training)
    if target == "results":
        monkeypatch.setattr(ablate, "atomic_write_text", no_room)
    else:
        monkeypatch.setattr(ablate_variants, "save_png", no_room)
    assert run_main(ablate.main, argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert words in err and str(out) in err, err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == kept  # the trained run is intact


def test_full_disk_while_recording_a_variant_is_one_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "abl"

    def no_room(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    from asl.apps import ablate_variants
    monkeypatch.setattr(ablate.train_app, "main", _no_training)
    monkeypatch.setattr(ablate_variants, "atomic_write_text", no_room)
    argv = ["--output-dir", str(out), "--variants", "ce:0,0,0", "--", str(tmp_path / "data"), *TINY]
    assert run_main(ablate.main, argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "disk full" in err, err
    assert str(out / "runs" / "ce") in err


def test_other_os_errors_while_writing_results_keep_their_traceback(tmp_path, capsys, monkeypatch):
    out = tmp_path / "abl"
    _, argv = _finished_variant(out, str(tmp_path / "data"))

    def broken(*args, **kwargs):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(ablate.train_app, "main", _no_training)
    monkeypatch.setattr(ablate, "atomic_write_text", broken)
    assert run_main(ablate.main, argv) == 1
    assert "Traceback" in capsys.readouterr().err


class _Clock:
    """ablate.py's view of time: a wall clock and a monotonic one that a fake training advances."""

    def __init__(self, now: float):
        self.now, self.monotonic = now, 0.0

    def time(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        return self.monotonic


def test_time_column_counts_the_session_killed_before(tmp_path, capsys, monkeypatch):
    """A variant whose earlier sessions took 30 s, then a session started at T0 was killed outright (SIGKILL: it
    never recorded its end) after keeping epoch 1 at T0 + 25 s. This session trains epoch 2 in 40 s. The variant's
    time is 30 + 25 + 40 = 95 s; the epoch before T0 belongs to the 30 s already counted."""
    out, data = tmp_path / "abl", str(tmp_path / "data")
    run_dir = out / "runs" / "ce"
    run_dir.mkdir(parents=True)
    command = _plan_command(out, data, "ce", ["--gamma-neg", "0", "--gamma-pos", "0", "--clip", "0"])
    t0 = 1_700_000_000.0
    (run_dir / "ablate.json").write_text(json.dumps({"train_args": command, "seconds": 30.0, "finished": False,
                                                     "started": t0}))
    records = [{"epoch": 0, "mAP": 30.0, "time": t0 - 100.0}, {"epoch": 1, "mAP": 35.0, "time": t0 + 25.0}]
    (run_dir / "log.txt").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"epoch": 2, "mA')
    clock = _Clock(t0 + 600.0)
    seen = {}

    def train_epoch_2(argv):
        seen["argv"] = list(argv)
        seen["started on disk"] = json.loads((run_dir / "ablate.json").read_text())["started"]
        with open(run_dir / "log.txt", "a") as f:
            f.write("\n" + json.dumps({"epoch": 2, "mAP": 38.0, "time": clock.now + 40.0}) + "\n")
        clock.monotonic += 40.0
        clock.now += 40.0
        return 0

    monkeypatch.setattr(ablate, "time", clock)
    monkeypatch.setattr(ablate.train_app, "main", train_epoch_2)
    argv = ["--output-dir", str(out), "--variants", "ce:0,0,0", "--", data, *TINY, "--epochs", "3",
            "--stop-epoch", "2"]
    assert run_main(ablate.main, argv) == 0
    assert seen["argv"] == command
    assert seen["started on disk"] == t0 + 600.0  # this session's start is on disk while it trains
    [row] = json.loads((out / "results.json").read_text())
    assert row["seconds"] == pytest.approx(95.0) and row["best_mAP"] == 38.0
    assert re.search(r"^\| ce \|.*\| 1 min 35 s \|$", (out / "results.md").read_text(), re.M)
    status = json.loads((run_dir / "ablate.json").read_text())
    assert status["finished"] is True and status["started"] is None and status["seconds"] == pytest.approx(95.0)


def test_time_column_of_a_killed_session_includes_its_last_mid_epoch_save(tmp_path):
    """With --save-every-steps a killed session keeps progress within an epoch in last.pth: counted up to its save."""
    from asl.apps.ablate_variants import RunStatus

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    t0 = 1_700_000_000.0
    (run_dir / "log.txt").write_text(json.dumps({"epoch": 0, "mAP": 1.0, "time": t0 + 20.0}) + "\n")
    (run_dir / "last.pth").write_bytes(b"")
    os.utime(run_dir / "last.pth", (t0 + 33.0, t0 + 33.0))
    assert RunStatus(["x"], seconds=5.0, started=t0).total_seconds(run_dir) == pytest.approx(38.0)
    # A session that recorded its end: its seconds alone, whatever the folder holds.
    assert RunStatus(["x"], seconds=5.0).total_seconds(run_dir) == 5.0
    # A killed session that kept nothing adds nothing.
    assert RunStatus(["x"], seconds=5.0, started=t0 + 50.0).total_seconds(run_dir) == 5.0
