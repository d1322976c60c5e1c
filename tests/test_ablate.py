"""ablate.py: variants, the default CPU plan and its skewed data, a tiny sweep end to end, resume and skip."""
from __future__ import annotations

import json
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
        "--dataset-option=synthetic_classes=8", "--dataset-option=skew=1", "--model-name", "tresnet_m",
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
