"""Per-class thresholds (asl.evaluation.thresholds) against hand-computed cases and a brute-force search with
sklearn's F1."""
from __future__ import annotations

import json

import numpy as np
import pytest

from asl.errors import UsageError
from asl.metrics import ThresholdMetrics, precision_recall_curve
from asl.evaluation.thresholds import NEVER, load_thresholds, max_f1_thresholds, precision_thresholds, save_thresholds

sklearn_metrics = pytest.importorskip("sklearn.metrics")


def brute_force_best(scores: np.ndarray, targets: np.ndarray):
    """Every set 'score >= c' for c > 0 among the scores (a score of 0 is above no threshold in [0, 1]), scored
    with sklearn's F1; ties go to the highest c; predicting nothing (c = 2) when no set has F1 > 0."""
    keep = targets >= 0
    s, t = scores[keep], (targets[keep] == 1).astype(int)
    best_c, best_f1 = 2.0, 0.0
    for c in sorted(set(s[s > 0].tolist()), reverse=True):
        f1 = sklearn_metrics.f1_score(t, (s >= c).astype(int), zero_division=0)
        if f1 > best_f1 + 1e-12:
            best_c, best_f1 = c, f1
    return best_c, best_f1


def test_hand_computed_max_f1():
    # F1 of the top 1..4: 2/3, 1/2, 4/5, 2/3 -> the top 3; halfway between 0.3 and 0.1 is 0.2.
    scores = np.array([[0.9], [0.8], [0.3], [0.1]])
    targets = np.array([[1], [0], [1], [0]])
    assert max_f1_thresholds(targets, scores) == pytest.approx([0.2])


def test_ties_and_the_bottom_set():
    # A tie at 0.5 is taken whole; the best set is everything, so the threshold is halfway to 0.
    scores = np.array([[0.5], [0.5], [0.2]])
    targets = np.array([[1], [0], [1]])
    # top-2 (the tie): F1 = 2*1/(2+2) = 0.5; all 3: 2*2/(3+2) = 0.8
    assert max_f1_thresholds(targets, scores) == pytest.approx([0.1])


def test_equal_f1_prefers_the_higher_threshold():
    # F1 of the top 1..4: 2/3, 1/2, 2/5, 2/3 -> the top 1 and the top 4 tie; the top 1 (0.7) wins.
    scores = np.array([[0.8], [0.6], [0.4], [0.2]])
    targets = np.array([[1], [0], [0], [1]])
    assert max_f1_thresholds(targets, scores) == pytest.approx([0.7])


def test_no_positive_unannotated_and_all_positive():
    scores = np.array([[0.9, 0.9, 0.6], [0.1, 0.8, 0.4], [0.5, 0.2, 0.2]])
    targets = np.array([[0, -1, 1], [0, 1, 1], [0, 0, 1]])
    th = max_f1_thresholds(targets, scores)
    assert th[0] == NEVER  # never predicted
    # class 1: the -1 at 0.9 is ignored, so the best set is {0.8}: halfway to 0.2 is 0.5
    assert th[1] == pytest.approx(0.5)
    assert th[2] == pytest.approx(0.1)  # every sample positive: predict all (halfway to 0)


def test_positives_scored_0_cannot_be_predicted():
    scores = np.array([[0.0, 0.5, 0.0], [0.0, 0.0, 0.0], [0.7, 0.0, 0.0]])
    targets = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0]])
    # class 0: its positive scores 0, below any threshold: the only predictable set holds no positive.
    # class 1: a set reaching its positive would need a threshold below 0. class 2: nothing is predictable.
    assert max_f1_thresholds(targets, scores).tolist() == [NEVER] * 3
    assert precision_thresholds(targets, scores, 0.5).tolist() == [NEVER] * 3


def test_adjacent_float32_scores_are_still_separated():
    high = np.float32(0.5)
    low = np.nextafter(high, np.float32(0))
    scores = np.array([[high], [low]], dtype=np.float32)
    targets = np.array([[1], [0]])
    th = max_f1_thresholds(targets, scores)
    predicted = scores[:, 0] > np.float32(th[0])
    assert predicted.tolist() == [True, False]
    meter = ThresholdMetrics(1, th)
    meter.update(scores, targets)
    assert meter.compute()["F_O"] == pytest.approx(100.0)


@pytest.mark.parametrize("seed", range(6))
def test_random_cases_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, c = 40, 5
    # Scores on a coarse grid so that ties are common; some -1 labels.
    scores = (rng.integers(0, 12, (n, c)) / 12.0).astype(np.float32)
    targets = (rng.random((n, c)) < 0.3).astype(int)
    targets[rng.random((n, c)) < 0.1] = -1
    th = max_f1_thresholds(targets, scores)
    for k in range(c):
        best_c, best_f1 = brute_force_best(scores[:, k], targets[:, k])
        keep = targets[:, k] >= 0
        chosen = scores[keep, k] > np.float32(th[k])
        assert chosen.tolist() == (scores[keep, k] >= best_c).tolist()
        assert sklearn_metrics.f1_score(targets[keep, k] == 1, chosen, zero_division=0) == pytest.approx(best_f1)


def test_precision_rule_takes_the_most_recall_at_the_target():
    # precision of the top 1..5: 1, 1, 2/3, 3/4, 3/5. Target 0.75: the top 4 (recall 3/3), threshold 0.25.
    scores = np.array([[0.9], [0.7], [0.5], [0.3], [0.2]])
    targets = np.array([[1], [1], [0], [1], [0]])
    assert precision_thresholds(targets, scores, 0.75) == pytest.approx([0.25])
    assert precision_thresholds(targets, scores, 1.0) == pytest.approx([0.6])
    # Never reached: a class whose best precision is 1/2.
    assert precision_thresholds(np.array([[0], [1]]), np.array([[0.9], [0.1]]), 0.9)[0] == NEVER
    # 9 of 10 is exactly 0.9 (no floating-point miss)
    s = np.linspace(1.0, 0.1, 10)[:, None]
    t = np.array([1] * 9 + [0])[:, None]
    t[4, 0], t[9, 0] = 0, 1
    assert (s[:, 0] > precision_thresholds(t, s, 0.9)[0]).sum() == 10


def test_file_round_trip_and_errors(tmp_path):
    path = tmp_path / "sub" / "th.json"
    save_thresholds(path, ["cat", "dog"], [0.25, 1.0])
    assert json.loads(path.read_text()) == {"cat": 0.25, "dog": 1.0}
    assert load_thresholds(path, ["dog", "cat"]).tolist() == [1.0, 0.25]  # the model's order
    cases = {
        "missing": ({"cat": 0.5}, "no threshold for 1 of the model's classes (first: 'dog')"),
        "unknown": ({"cat": 0.5, "dog": 0.5, "cow": 0.5}, "1 class(es) the model does not have (first: 'cow')"),
        "range": ({"cat": 1.5, "dog": 0.5}, "the threshold of 'cat' must be a number within [0, 1], got 1.5"),
        "text": ({"cat": "high", "dog": 0.5}, "got 'high'"),
        "list": ([0.5, 0.5], "must hold a JSON object"),
    }
    for name, (document, message) in cases.items():
        bad = tmp_path / f"{name}.json"
        bad.write_text(json.dumps(document))
        with pytest.raises(UsageError, match=str(bad)) as info:
            load_thresholds(bad, ["cat", "dog"])
        assert message in str(info.value)
    with pytest.raises(UsageError, match="the class name 'cat' repeats"):
        save_thresholds(tmp_path / "dup.json", ["cat", "dog", "cat"], [0.1, 0.2, 0.3])
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UsageError, match="is not valid JSON"):
        load_thresholds(tmp_path / "broken.json", ["cat"])
    with pytest.raises(UsageError, match="cannot read the thresholds file"):
        load_thresholds(tmp_path / "absent.json", ["cat"])


def test_precision_recall_curve_matches_sklearn():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 8, 60) / 8.0  # with ties
    targets = (rng.random(60) < 0.4).astype(int)
    precision, recall, thresholds = precision_recall_curve(scores, targets)
    ref_p, ref_r, ref_t = sklearn_metrics.precision_recall_curve(targets, scores, drop_intermediate=False)
    # sklearn: increasing thresholds plus a final (1, 0) point; ours: decreasing, without it.
    by_threshold = {float(t): (p, r) for p, r, t in zip(ref_p[:-1], ref_r[:-1], ref_t)}
    assert sorted(by_threshold, reverse=True) == thresholds.tolist()
    for p, r, t in zip(precision, recall, thresholds):
        assert (p, r) == pytest.approx(by_threshold[float(t)])


def test_a_deeply_nested_file_is_one_line_naming_it(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(UsageError, match="deep.json is nested too deeply"):
        load_thresholds(path, ["a"])


def test_names_near_the_file_system_limit_can_be_written(tmp_path):
    """The atomic writer's temporary name must fit wherever the final name fits (255 bytes here)."""
    for length in (240, 250, 255):
        path = tmp_path / ("t" * (length - 5) + ".json")
        save_thresholds(path, ["a"], np.array([0.5]))
        assert load_thresholds(path, ["a"]).tolist() == [0.5]
