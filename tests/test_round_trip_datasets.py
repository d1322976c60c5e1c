"""Every dataset family through the scripts a user runs on it: train.py (timm's smallest network: the data path is
the same for every model; tiny pictures, two steps), then
validate.py on the saved model-highest.pth gives the mAP train.py printed, on the split train.py validated on, and
infer.py names the dataset's own classes. Real photos for coco (tiny_coco) and voc (voc2007_mini), skipped when
../shared/data lacks them; small sets in the native formats for nus-wide, openimages and csv (tests/conftest.py)."""
from __future__ import annotations

import contextlib
import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from asl.cli import run_main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY_COCO, VOC = SHARED / "tiny_coco", SHARED / "voc2007_mini"
VOC_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


@dataclass
class Case:
    data: Path
    classes: list[str]  # the dataset's class names, found here without the package
    picture: Path  # one picture of the set
    train_split: Optional[str] = None  # None: the scripts' default splits
    val_split: Optional[str] = None


def _coco(request) -> Case:
    if not (TINY_COCO / "annotations").is_dir():
        pytest.skip("../shared/data/tiny_coco is absent")
    doc = json.loads((TINY_COCO / "annotations" / "instances_val2017.json").read_text())
    picture = TINY_COCO / "val2017" / doc["images"][0]["file_name"]
    return Case(TINY_COCO, [c["name"] for c in doc["categories"]], picture, "train2017", "val2017")


def _voc(request) -> Case:
    if not (VOC / "VOCdevkit").is_dir():
        pytest.skip("../shared/data/voc2007_mini is absent")
    # The sample holds the test split only: train.py trains and validates on it, validate.py's default is test.
    return Case(VOC, VOC_CLASSES, VOC / "VOCdevkit" / "VOC2007" / "JPEGImages" / "000342.jpg", train_split="test")


def _nus_wide(request) -> Case:
    root = request.getfixturevalue("nus_root")
    return Case(root, ["animal", "clouds", "sky", "water", "zebra"], root / "images" / "v1.jpg")


def _openimages(request) -> Case:
    root = request.getfixturevalue("oi_root")
    # Two more test images, so that three classes have both an annotated positive and an annotated negative and
    # the partial-label mAP ranks something (in oi_root alone it skips every class).
    write_image = request.getfixturevalue("write_image")
    write_image(root / "test" / "e3.jpg", (250, 250, 20))
    write_image(root / "test" / "e4.jpg", (20, 250, 250))
    with open(root / "data.csv", "a", newline="") as f:
        csv.writer(f).writerows([["e3.jpg", "['/m/01']", "['/m/02', '/m/03']", "test"],
                                 ["e4.jpg", "['/m/03']", "['/m/01', '/m/04']", "test"]])
    # Two MIDs with one display name, as Open Images has (the animal and the car are both "Jaguar").
    request.getfixturevalue("write_csv")(root / "classes.csv", [["LabelName", "DisplayName"], ["/m/01", "Jaguar"],
                                                                 ["/m/02", "Dog"], ["/m/03", "Jaguar"],
                                                                 ["/m/04", "Tree"]])
    return Case(root, ["Jaguar", "Dog", "Jaguar", "Tree"], root / "test" / "e1.jpg")


def _csv(request) -> Case:
    synthetic = request.getfixturevalue("make_synthetic")(8, 8, 32)
    root = request.getfixturevalue("csv_copy")(synthetic, request.getfixturevalue("tmp_path") / "csv", val_labels=True)
    doc = json.loads((synthetic / "annotations" / "instances_val.json").read_text())
    return Case(root, sorted(c["name"] for c in doc["categories"]), root / "val" / doc["images"][0]["file_name"])


FAMILIES = {"coco": _coco, "voc": _voc, "nus-wide": _nus_wide, "openimages": _openimages, "csv": _csv}


def _run(main, argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run_main(main, argv)
    return code, out.getvalue()


def _flag(name: str, value: Optional[str]) -> list[str]:
    return [name, value] if value else []


@pytest.mark.parametrize("family", list(FAMILIES))
def test_train_validate_infer(family, request, tmp_path, capsys):
    from asl.apps import infer, train, validate

    case = FAMILIES[family](request)
    run, val_split = tmp_path / "run", _flag("--val-split", case.val_split)
    code, text = _run(train.main, [str(case.data), "--dataset", family, *_flag("--train-split", case.train_split),
                                   *val_split, "--model-name", "timm/test_resnet", "--image-size", "32", "-b", "4",
                                   "-j", "0", "--epochs", "1",
                                   "--stop-epoch", "0", "--max-steps-per-epoch", "2", "--device", "cpu",
                                   "--output-dir", str(run)])
    assert code == 0, capsys.readouterr().err[-2000:]
    trained = float(text.rsplit("highest_mAP = ", 1)[1].split()[0].rstrip(","))
    checkpoint = run / "model-highest.pth"

    code, text = _run(validate.main, [str(case.data), "--dataset", family, *val_split, "--model-path", str(checkpoint),
                                      "-b", "4", "-j", "0", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert float(text.strip().splitlines()[-1].split(":")[1]) == pytest.approx(trained, abs=0.05)

    # --th 0: every class is above it, so the detections list every class name the checkpoint carries.
    code, text = _run(infer.main, ["--model-path", str(checkpoint), "--pic-path", str(case.picture), "--json",
                                   "--th", "0", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err[-2000:]
    found = json.loads(text.strip().splitlines()[-1])
    assert found["image"].endswith(case.picture.name)
    assert sorted(d["class"] for d in found["detections"]) == sorted(case.classes)
