"""train.py with partial labels, end to end once: a first run (negative mode, simulated rps 0.5) writes the class
prior, a second (selective) reads it, and a prior of the wrong length is refused in one line."""
import contextlib
import csv
import io
import re

import pytest

from asl.apps import train
from asl.cli import run_main

TINY = ["--model-name", "timm/test_resnet", "--image-size", "32", "-b", "4", "-j", "0", "--epochs", "1",
        "--stop-epoch", "0", "--max-steps-per-epoch", "1", "--device", "cpu"]


def _train(argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run_main(train.main, argv, prog="train.py")
    return code, out.getvalue()


def test_a_first_run_writes_the_prior_a_second_reads_it_a_wrong_one_is_refused(make_synthetic, tmp_path, capsys):
    data = str(make_synthetic(8, 4, 32))
    first, second = tmp_path / "first", tmp_path / "second"
    code, text = _train([data, "--dataset", "synthetic", *TINY, "--output-dir", str(first),
                         "--partial-loss-mode", "negative", "--simulate-partial", "rps:0.5"])
    assert code == 0, capsys.readouterr().err[-2000:]
    line = re.search(r"partial labels simulated \(rps 0\.5\): kept (\d+\.\d)% of (\d+) annotations", text)
    assert line and 0 < float(line.group(1)) < 100, text
    with open(first / "prior.csv", newline="") as f:
        rows = list(csv.reader(f))
    classes = [r[0] for r in rows[1:]]
    assert rows[0] == ["Classes", "avg_pred"] and len(classes) >= 2 and int(line.group(2)) == 8 * len(classes)
    assert all(0 < float(r[1]) < 1 for r in rows[1:])

    code, text = _train([data, "--dataset", "synthetic", *TINY, "--output-dir", str(second),
                         "--partial_loss_mode", "selective", "--prior_path", str(first / "prior.csv"),
                         "--simulate_partial_type", "fpc", "--simulate_partial_param", "2"])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert "partial labels simulated (fpc 2)" in text
    assert (second / "prior.csv").is_file()

    wrong = tmp_path / "wrong.csv"
    wrong.write_text("Classes,avg_pred\n" + "".join(f"c{i},0.1\n" for i in range(len(classes) + 3)))
    capsys.readouterr()
    code, _ = _train([data, "--dataset", "synthetic", *TINY, "--output-dir", str(tmp_path / "third"),
                      "--partial-loss-mode", "selective", "--prior-path", str(wrong)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert f"holds a prior for {len(classes) + 3} classes, but the model has {len(classes)}" in err[0]


@pytest.mark.parametrize("argv, message", [
    (["--partial-loss-mode", "ignore", "--unannotated", "ignore"], "--partial-loss-mode replaces --unannotated"),
    (["--unannotated", "ignore"], "--unannotated ignore: the synthetic training set marks no label unknown"),
    (["--simulate-partial", "rps:2"], "within [0, 1]"),
    (["--simulate-partial-param", "3"], "--simulate-partial-param needs --simulate-partial-type"),
])
def test_refused_combinations_are_one_line(make_synthetic, tmp_path, capsys, argv, message):
    data = str(make_synthetic(8, 4, 32))
    code, _ = _train([data, "--dataset", "synthetic", *TINY, "--output-dir", str(tmp_path / "run"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_csl_defaults_apply_to_the_flags_left_unset():
    options = train.parse_options(["DATA", "--dataset", "synthetic", "--partial-loss-mode", "selective"])
    assert (options.gamma_neg, options.gamma_pos, options.clip, options.unannotated) == (1.0, 0.0, 0.0, None)
    options = train.parse_options(["DATA", "--dataset", "synthetic", "--partial-loss-mode", "selective",
                                   "--gamma-neg", "3", "--clip", "0.05"])
    assert (options.gamma_neg, options.clip) == (3.0, 0.05)
    options = train.parse_options(["DATA", "--dataset", "synthetic"])
    assert (options.gamma_neg, options.gamma_pos, options.clip, options.unannotated) == (4.0, 0.0, 0.05, "negative")
