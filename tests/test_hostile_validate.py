"""validate.py against hostile input: class names with markup and control characters, repeated class names,
output places that cannot be written, an output that fails at the end, dataset options that validate.py sets.

The data is a generated COCO layout of three pictures whose categories carry the names under test; the model is
a 4-class TResNet-M at 32 pixels (what is checked here does not depend on its scores).
"""
from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from asl.apps import validate
from asl.cli import run_main
from asl.models import create_model

SIZE = 32
NAMES = ["<script>alert(1)</script>", "cr\rlf\nnul\x00end", "<img src=x onerror=alert(1)> | `code` \\ & *b*",
         "tab\tesc\x1b[31m"]
# What a reader must see for each name: the same characters, the control ones as visible escapes.
SHOWN = ["<script>alert(1)</script>", "cr\\rlf\\nnul\\0end", "<img src=x onerror=alert(1)> | `code` \\ & *b*",
         "tab\\tesc\\x1b[31m"]
# (picture, classes present): class k has POSITIVES[k] positives.
LABELS = [("a.jpg", [0, 1]), ("b.jpg", [1]), ("c.jpg", [1, 3])]
POSITIVES = [1, 3, 0, 1]


def coco_layout(root: Path, names) -> Path:
    (root / "annotations").mkdir(parents=True)
    (root / "val").mkdir()
    images, annotations = [], []
    for image_id, (file_name, classes) in enumerate(LABELS, start=1):
        Image.new("RGB", (40, 40), (60 * image_id, 90, 30)).save(root / "val" / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": 40, "height": 40})
        for k in classes:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": k + 1,
                                "bbox": [0, 0, 10, 10], "area": 100, "iscrowd": 0})
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(names)]
    (root / "annotations" / "instances_val.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "four.pth"
    torch.save({"model": create_model("tresnet_m", 4).state_dict(), "num_classes": 4}, path)
    return path


def args(root: Path, checkpoint: Path, *extra) -> list[str]:
    return [str(root), "--model-path", str(checkpoint), "--val-split", "val", "--image-size", str(SIZE), "-j", "0",
            "--device", "cpu", *extra]


def markdown_cells(row: str) -> list[str]:
    """A table row's cells as a CommonMark renderer shows them: split at unescaped '|', then a backslash before
    ASCII punctuation dropped and the HTML entities decoded."""
    cells = re.split(r"(?<!\\)\|", row.strip()[1:-1])
    return [html.unescape(re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", cell.strip())) for cell in cells]


def test_hostile_class_names_stay_text_on_one_line(tmp_path, checkpoint, capsys):
    root = coco_layout(tmp_path / "coco", NAMES)
    report, metrics = tmp_path / "report", tmp_path / "metrics.json"
    code = run_main(validate.main, args(root, checkpoint, "--per-class", "--report", str(report),
                                        "--output-json", str(metrics)), prog="validate.py")
    out = capsys.readouterr().out
    assert code == 0

    # --per-class: one line per class, under the name a terminal shows.
    table = [line for line in out.splitlines() if re.match(r"\s+\d+\s\s", line)]
    assert len(table) == 4
    for k, line in enumerate(table):
        assert re.match(rf"\s+{k}\s\s{re.escape(SHOWN[k])}\s", line), line

    # The page: every class a row of 8 cells, its name text (no tag, no code span, no broken row).
    page = (report / "README.md").read_text()
    assert page.count("\n") == len(page.splitlines()) and not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", page)
    assert "<" not in page and "`" not in page.replace("\\`", "")
    rows = [line for line in page.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == 4
    cells = [markdown_cells(row) for row in rows]
    assert all(len(c) == 8 for c in cells), cells
    assert sorted(c[1] for c in cells) == sorted(SHOWN)
    assert {c[1]: int(c[3]) for c in cells} == dict(zip(SHOWN, POSITIVES))

    # The JSON keeps the names exactly.
    assert [r["class"] for r in json.loads(metrics.read_text())["per_class"]] == NAMES


def test_markup_in_the_paths_of_the_summary_stays_text(tmp_path, checkpoint, capsys):
    root = coco_layout(tmp_path / "co`co<b>", ["a", "b", "c", "d"])
    report = tmp_path / "report"
    assert run_main(validate.main, args(root, checkpoint, "--report", str(report)), prog="validate.py") == 0
    capsys.readouterr()
    page = (report / "README.md").read_text()
    [data_line] = [line for line in page.splitlines() if line.startswith("- data:")]
    assert "<b>" not in data_line and html.unescape(data_line.replace("\\", "")).count(str(root)) == 1


def test_repeated_class_names_are_refused_before_the_evaluation(tmp_path, checkpoint, capsys):
    root = coco_layout(tmp_path / "coco", ["cat", "dog", "bird", "cat"])
    outputs = {"--save-thresholds": tmp_path / "th.json", "--report": tmp_path / "report",
               "--output-json": tmp_path / "metrics.json"}
    code = run_main(validate.main, args(root, checkpoint, *[str(x) for kv in outputs.items() for x in kv]),
                    prog="validate.py")
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    assert "starting validation" not in captured.out  # nothing was evaluated
    assert captured.err.strip().splitlines()[-1] == (
        f"validate.py: error: --save-thresholds {outputs['--save-thresholds']}: the class name 'cat' repeats "
        f"(classes 0 and 3), so a {{class name: threshold}} file cannot hold every class")
    assert not any(p.exists() for p in outputs.values())

    # The page and the JSON list classes by position: repeated names are fine there.
    code = run_main(validate.main, args(root, checkpoint, "--report", str(outputs["--report"]), "--output-json",
                                        str(outputs["--output-json"])), prog="validate.py")
    assert code == 0
    capsys.readouterr()
    assert [r["class"] for r in json.loads(outputs["--output-json"].read_text())["per_class"]] == \
        ["cat", "dog", "bird", "cat"]
    assert (outputs["--report"] / "README.md").is_file()


@pytest.mark.parametrize("flag", ["--output-json", "--save-thresholds", "--report"])
def test_output_places_are_checked_before_the_evaluation(tmp_path, checkpoint, flag, capsys):
    root = coco_layout(tmp_path / "coco", ["a", "b", "c", "d"])
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    long_name = "x" * 300 + ".json"  # Linux file systems take 255 bytes at most
    for target, message in ((blocker / "sub" / "out.json", f"{blocker} is a file, not a folder"),
                            (tmp_path / long_name, "is longer than the 255 bytes")):
        code = run_main(validate.main, args(root, checkpoint, flag, str(target)), prog="validate.py")
        captured = capsys.readouterr()
        assert code == 2 and "Traceback" not in captured.err, captured.err
        assert "starting validation" not in captured.out
        assert "validate.py: error: " in captured.err and message in captured.err.strip().splitlines()[-1], \
            captured.err


def test_an_output_that_fails_at_the_end_loses_neither_the_others_nor_the_map(tmp_path, checkpoint, monkeypatch,
                                                                               capsys):
    root = coco_layout(tmp_path / "coco", ["a", "b", "c", "d"])

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(validate, "write_report", disk_full)
    report, metrics = tmp_path / "report", tmp_path / "metrics.json"
    code = run_main(validate.main, args(root, checkpoint, "--report", str(report), "--output-json", str(metrics)),
                    prog="validate.py")
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    assert captured.out.strip().splitlines()[-1].startswith("mAP score: ")
    assert json.loads(metrics.read_text())["num_images"] == 3
    assert captured.err.strip().splitlines()[-1] == (
        f"validate.py: error: the evaluation ran, but --report {report} could not be written: No space left on device")


@pytest.mark.parametrize("option, words", [
    # validate.py passes these itself: given again, create_dataset would get two values for one argument, or the
    # option would silently replace validate.py's own value.
    ("image_size=16", "--dataset-option image_size: validate.py sets it itself; give --image-size instead"),
    ("strict=1", "--dataset-option strict: validate.py sets it itself; give --strict-data instead"),
    ("train=1", "--dataset-option train: validate.py sets it itself"),
])
def test_an_option_validate_sets_itself_is_one_line(tmp_path, checkpoint, option, words, capsys):
    root = coco_layout(tmp_path / "data", ["a", "b", "c", "d"])
    code = run_main(validate.main, args(root, checkpoint, "--dataset-option", option), prog="validate.py")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.strip().splitlines() == [f"validate.py: error: {words}"]


def test_a_threshold_and_a_thresholds_file_together_are_refused(tmp_path, checkpoint, capsys):
    """Either sets the threshold metrics' thresholds; with both, one would be silently ignored."""
    root = coco_layout(tmp_path / "data", ["a", "b", "c", "d"])
    per_class = tmp_path / "th.json"
    per_class.write_text(json.dumps({name: 0.5 for name in "abcd"}))
    code = run_main(validate.main, args(root, checkpoint, "--thre", "0.3", "--thresholds", str(per_class)),
                    prog="validate.py")
    assert code == 2 and capsys.readouterr().err.strip().splitlines() == [
        "validate.py: error: --thre and --thresholds: give one or the other (--thresholds sets one per class)"]
