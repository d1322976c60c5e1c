"""validate.py on partially labelled data (a CSV set with unknown labels): the class-weighted partial mAP (CSL) on
its own line before the last, which stays ``mAP score: X``."""
import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from asl.apps import validate
from asl.cli import run_main
from asl.models import create_model


def test_validate_prints_the_weighted_partial_map_before_the_last_line(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["image,labels", "p0.png,cat|-dog|?*", "p1.png,dog|?car", "p2.png,car|?cat", "p3.png,?dog",
            "p4.png,cat|dog", "p5.png,"]
    for row in rows[1:]:
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / row.split(",")[0])
    (tmp_path / "classes.txt").write_text("cat\ndog\ncar\n")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    torch.manual_seed(0)
    model = create_model("timm/test_resnet", 3)
    checkpoint = tmp_path / "m.pth"
    torch.save({"model": model.state_dict(), "num_classes": 3, "idx_to_class": {0: "cat", 1: "dog", 2: "car"},
                "model_name": "timm/test_resnet", "image_size": 32}, checkpoint)
    report = tmp_path / "report.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run_main(validate.main, [str(tmp_path), "--dataset", "csv", "--val-split", "val", "--model-path",
                                        str(checkpoint), "-j", "0", "--device", "cpu",
                                        "--output-json", str(report)], prog="validate.py")
    assert code == 0
    lines = out.getvalue().strip().splitlines()
    last, before = lines[-1], lines[-2]
    assert last.startswith("mAP score: ")
    assert before.startswith("partial mAP: ") and "class-weighted partial mAP (CSL): " in before
    partial, weighted = (float(part.rsplit(": ", 1)[1]) for part in before.split(", "))
    per_class = [r for r in json.loads(report.read_text())["per_class"] if r["ap"] is not None]
    assert partial == pytest.approx(float(last.split(": ")[1]), abs=0.005)
    # CSL's figure from the per-class APs and positive counts of the same run
    expected = sum(r["ap"] * r["positives"] for r in per_class) / sum(r["positives"] for r in per_class)
    assert weighted == pytest.approx(expected, abs=0.005)
