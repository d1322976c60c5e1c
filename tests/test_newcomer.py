"""What a new user trips on in the first hour: -j on a small machine, the package's name, the demo's score plot."""
import os
import re
from pathlib import Path

import pytest
import torch

from asl.apps import infer, train, validate
from asl.losses import AsymmetricLoss

REPO = Path(__file__).resolve().parents[1]


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def test_workers_default_to_min_8_and_the_cores():
    cores = _cores()
    assert train.build_parser().parse_args(["d"]).workers == min(8, cores)
    assert validate.build_parser().parse_args(["d", "--model-path", "m.pth"]).workers == min(8, cores)
    assert 1 <= infer.build_parser().parse_args(["--model-path", "m.pth", "--pic-path", "p"]).workers <= cores


@pytest.mark.parametrize("cores, expected", [(1, 1), (2, 2), (3, 3), (8, 8), (64, 8)])
def test_workers_default_follows_the_cores_this_process_may_use(monkeypatch, cores, expected):
    """A 2-core machine (or a container or taskset limited to 2 cores of a larger one) gets 2 workers, not 8."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4 * cores)  # the machine's count is not what the process may use
    assert train.build_parser().parse_args(["d"]).workers == expected
    assert validate.build_parser().parse_args(["d", "--model-path", "m.pth"]).workers == expected
    assert infer.build_parser().parse_args(["--model-path", "m.pth", "--pic-path", "p"]).workers <= cores
    # An explicit -j is the user's choice and is kept.
    assert train.build_parser().parse_args(["d", "-j", "12"]).workers == 12


def test_distribution_name_is_our_own_and_the_import_name_stays():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    # "asl" on the package index is another project (Bindings to the ASL library on Mac OS X, 1.1).
    assert re.sub(r"[-_.]+", "-", project["name"]).lower() != "asl"
    assert (REPO / "src" / "asl" / "__init__.py").is_file()
    assert all(target.startswith("asl.") for target in project["scripts"].values())


def _zero_of(f, low: float, high: float) -> float:
    """Bisection: f changes sign once on [low, high]."""
    assert f(low) * f(high) < 0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if f(low) * f(middle) > 0 else (low, middle)
    return (low + high) / 2


def _settling_score(criterion, q: float) -> float:
    """The probability at which training stops moving a score the model cannot tell apart: the logit where the
    criterion's gradient over a share q of positive labels and 1 - q of negatives vanishes."""
    positives = round(q * 100_000)
    targets = torch.zeros(1, 100_000, dtype=torch.float64)
    targets[0, :positives] = 1

    def gradient(p: float) -> float:
        logits = torch.full((1, 100_000), torch.logit(torch.tensor(p, dtype=torch.float64)).item(),
                            dtype=torch.float64, requires_grad=True)
        criterion(logits, targets).backward()
        return float(logits.grad.sum())

    return _zero_of(gradient, 0.06, 0.99)


def test_the_demo_scores_settle_where_the_usage_doc_says():
    """docs/usage.md explains why the demo's score histogram has no negative near 0: under ASL (4, 0, 0.05), as
    train.py uses it (the focal weight a constant in the gradient), an undecided label settles at p = 0.72 for the
    demo's share of positive labels, where cross-entropy settles at the share itself."""
    report = (REPO / "pics" / "report" / "README.md").read_text()
    images = int(re.search(r"(\d+) images", report).group(1))
    classes = int(re.search(r"(\d+) classes", report).group(1))
    rows = re.findall(r"^\| \d+ \| [^|]+ \| [\d.]+ \| (\d+) \|", report, re.M)
    assert len(rows) == classes
    positives, labels = sum(map(int, rows)), images * classes
    doc = (REPO / "docs" / "usage.md").read_text()
    assert f"{positives} of {labels}" in doc
    q = positives / labels

    # The balance written out: a positive's pull up, q (1 - p), against a negative's, (1 - q) w dL/dx, with the
    # margin-shifted probability p - m, its focal weight w = (p - m)^4 and
    # d(-log(1 - p + m))/dx = p (1 - p) / (1 + m - p).
    m = 0.05
    written_out = _zero_of(lambda p: q * (1 - p) - (1 - q) * (p - m) ** 4 * p * (1 - p) / (1 + m - p), 0.06, 0.99)
    asl = _settling_score(AsymmetricLoss(gamma_neg=4, gamma_pos=0, clip=m, disable_torch_grad_focal_loss=True), q)
    assert asl == pytest.approx(written_out, abs=1e-4)
    assert f"p = {asl:.2f}" in doc
    # Inside the demo histogram's range of scores, as the doc says.
    assert 0.56 < asl < 0.88
    ce = _settling_score(AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0), q)
    assert ce == pytest.approx(q, abs=1e-4)
    assert f"p = q = {q:.2f}" in doc
