"""The evaluation report (asl.evaluation.report, validate.py --report): the page, its pictures, a class without
positives."""
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from asl.apps.validate import per_class_rows
from asl.metrics import ThresholdMetrics
from asl.evaluation.report import write_report

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def table_rows(page: str) -> list[list[str]]:
    rows = [line for line in page.splitlines() if re.match(r"\| \d+ \|", line)]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))] for line in rows]


@pytest.mark.parametrize("num_classes", [3, 14])
def test_report_page_pictures_and_a_class_without_positives(tmp_path, num_classes):
    rng = np.random.default_rng(num_classes)
    n = 60
    targets = (rng.random((n, num_classes)) < 0.3).astype(np.float32)
    targets[:, 1] = 0  # no positive
    scores = np.clip(0.5 * targets + 0.6 * rng.random((n, num_classes)), 0, 1).astype(np.float32)
    classes = [f"class|{k}" if k == 0 else f"c{k}" for k in range(num_classes)]  # a '|' must not break the table
    meter = ThresholdMetrics(num_classes, 0.5)
    meter.update(scores, targets)
    rows = per_class_rows(classes, targets, scores, False, meter)
    page = write_report(tmp_path / "report", rows, targets, scores, ["- summary line"])
    assert page == tmp_path / "report" / "README.md"
    text = page.read_text()
    assert "- summary line" in text
    for picture in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        with Image.open(tmp_path / "report" / picture) as im:
            assert im.format == "PNG" and im.size[0] > 300
    assert len(re.findall(r"!\[", text)) == 3

    table = table_rows(text)
    assert len(table) == num_classes
    # Sorted by AP (sklearn's), the class without positives last with n/a.
    want = {k: 100 * sklearn_metrics.average_precision_score(targets[:, k], scores[:, k])
            for k in range(num_classes) if k != 1}
    order = sorted(want, key=lambda k: -want[k])
    names = [r[1] for r in table]
    assert names[:-1] == [classes[k].replace("|", r"\|") for k in order]
    assert names[-1] == "c1" and table[-1][2] == "n/a" and table[-1][3] == "0"
    for row, k in zip(table, order):
        assert float(row[2]) == pytest.approx(want[k], abs=0.006)
        assert int(row[3]) == int(targets[:, k].sum())
        predicted = scores[:, k] > 0.5
        tp = int((predicted & (targets[:, k] == 1)).sum())
        assert float(row[5]) == pytest.approx(100 * tp / max(predicted.sum(), 1), abs=0.06)  # precision
        assert float(row[6]) == pytest.approx(100 * tp / targets[:, k].sum(), abs=0.06)  # recall
    assert "n/a: no positive" in text


def test_per_class_thresholds_are_listed(tmp_path):
    targets = np.array([[1, 0], [0, 1], [1, 0]], dtype=np.float32)
    scores = np.array([[0.9, 0.2], [0.3, 0.7], [0.6, 0.1]], dtype=np.float32)
    meter = ThresholdMetrics(2, np.array([0.45, 1.0]))
    meter.update(scores, targets)
    rows = per_class_rows(["a", "b"], targets, scores, False, meter)
    text = write_report(tmp_path, rows, targets, scores, []).read_text()
    table = {r[1]: r for r in table_rows(text)}
    assert table["a"][4] == "0.45" and table["b"][4] == "never"
    assert table["a"][7] == "100.0" and table["b"][7] == "0.0"


def test_score_histograms_are_counted_by_blocks_without_a_full_copy():
    from asl.evaluation import report

    rng = np.random.default_rng(0)
    scores = rng.random((1000, 7)).astype(np.float32)
    targets = rng.integers(-1, 2, (1000, 7))
    bins = np.linspace(0, 1, 11)
    positive, negative = report._label_histograms(targets, scores, bins, block_elements=50)  # 7 rows a block
    assert positive.tolist() == np.histogram(scores[targets == 1], bins)[0].tolist()
    assert negative.tolist() == np.histogram(scores[targets == 0], bins)[0].tolist()  # -1: not annotated, left out
