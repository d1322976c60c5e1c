"""Metrics against sklearn and hand-computed cases."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_fscore_support

from asl.evaluation.metrics import weighted_partial_mAP
from asl.metrics import (ThresholdMetrics, average_precision, mAP, partial_mAP, per_class_ap,
                         per_class_partial_ap, threshold_metrics)


def tie_free_data(seed, n=300, c=12, pos_rate=0.2):
    rng = np.random.default_rng(seed)
    scores = rng.permutation(n * c).reshape(n, c) / (n * c)  # all distinct
    targets = (rng.random((n, c)) < pos_rate).astype(np.float32)
    targets[0] = 1  # every class has a positive
    return targets, scores


# -------------------------------------------------------------------------------------------------------- AP / mAP

def test_average_precision_equals_sklearn_without_ties():
    targets, scores = tie_free_data(seed=0)
    expected = np.array([average_precision_score(targets[:, k], scores[:, k]) for k in range(targets.shape[1])])
    np.testing.assert_allclose(per_class_ap(targets, scores), expected, rtol=1e-7, atol=1e-12)
    assert mAP(targets, scores) == pytest.approx(100 * expected.mean(), rel=1e-7)
    for k in range(3):
        assert average_precision(scores[:, k], targets[:, k]) == pytest.approx(expected[k], rel=1e-7)


def test_hand_computed_average_precision():
    # Ranking by score: 0.9(+) 0.8(-) 0.7(+) 0.6(-): precisions at the positives 1/1 and 2/3 -> AP = 5/6.
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(5 / 6)
    # Ranking 0.8(+) 0.4(-) 0.35(+) 0.1(-): the same 5/6 from unsorted input.
    assert average_precision([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(5 / 6)
    # Ranking 0.9(-) 0.5(-) 0.3(+): 1/3.
    assert average_precision([0.3, 0.9, 0.5], [1, 0, 0]) == pytest.approx(1 / 3)
    # Perfect ranking: 1 (up to the 1e-8 added to the number of positives).
    assert average_precision([0.9, 0.8, 0.1], [1, 1, 0]) == pytest.approx(1.0, abs=1e-7)


def test_mean_includes_classes_without_positives():
    # Column 0: AP 5/6; column 1 has no positive: AP 0, and it still counts in the mean (original behaviour).
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    targets = np.array([[1, 0], [0, 0], [1, 0], [0, 0]])
    np.testing.assert_allclose(per_class_ap(targets, scores), [5 / 6, 0.0])
    assert mAP(targets, scores) == pytest.approx(100 * (5 / 6) / 2)  # 41.666...


def test_ties_are_ranked_by_descending_index():
    # stable argsort ascending, reversed: among equal scores the later sample comes first.
    assert average_precision([0.5, 0.5], [1, 0]) == pytest.approx(0.5)  # order: sample 1 (-), sample 0 (+)
    assert average_precision([0.5, 0.5], [0, 1]) == pytest.approx(1.0, abs=1e-7)


def test_only_target_one_is_positive():
    # Targets of -1 are negatives for mAP (as in the original); partial_mAP is the one that masks them.
    assert average_precision([0.9, 0.8, 0.7], [-1, 1, 0]) == pytest.approx(0.5)


def test_torch_inputs_give_the_same_numbers():
    targets, scores = tie_free_data(seed=1, n=50, c=4)
    expected = mAP(targets, scores)
    t = torch.from_numpy(targets)
    s = torch.from_numpy(scores).float().requires_grad_(True)  # a graph-attached tensor is fine
    assert mAP(t, s) == pytest.approx(mAP(targets, s.detach().numpy()))
    assert mAP(t.long(), torch.from_numpy(scores)) == pytest.approx(expected)
    np.testing.assert_allclose(per_class_ap(t, torch.from_numpy(scores)), per_class_ap(targets, scores))
    assert isinstance(mAP(t, s), float)


def test_logits_and_probabilities_give_the_same_map():
    targets, _ = tie_free_data(seed=2, n=80, c=5)
    logits = torch.randn(80, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert mAP(targets, logits) == pytest.approx(mAP(targets, torch.sigmoid(logits)))


def test_chunked_ranking_matches_per_column(monkeypatch):
    import asl.evaluation.metrics as metrics

    targets, scores = tie_free_data(seed=3, n=40, c=9)
    whole = per_class_ap(targets, scores)
    monkeypatch.setattr(metrics, "_MAX_ELEMENTS_PER_CHUNK", 40 * 2)  # two columns at a time
    np.testing.assert_array_equal(per_class_ap(targets, scores), whole)


def test_input_validation_and_empty():
    with pytest.raises(ValueError, match="same shape"):
        mAP(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="same length"):
        average_precision([0.1, 0.2], [1])
    assert mAP(np.zeros((0, 3)), np.zeros((0, 3))) == 0.0


# ----------------------------------------------------------------------------------------------------- partial mAP

def test_partial_map_scores_each_class_on_its_annotated_rows():
    targets, scores = tie_free_data(seed=4, n=200, c=8)
    rng = np.random.default_rng(5)
    partial = np.where(rng.random(targets.shape) < 0.4, -1.0, targets)
    partial[:, 6] = -1
    partial[:5, 6] = [1, 0, 1, 0, 0]  # class 6: only five annotated rows
    partial[:, 7] = np.where(partial[:, 7] == 1, 1, -1)  # class 7: positives only -> skipped

    expected = []
    for k in range(7):
        rows = partial[:, k] != -1
        expected.append(average_precision_score(partial[rows, k], scores[rows, k]))
    per_class = per_class_partial_ap(partial, scores)
    np.testing.assert_allclose(per_class[:7], expected, rtol=1e-7)
    assert np.isnan(per_class[7])
    assert partial_mAP(partial, scores) == pytest.approx(100 * np.mean(expected), rel=1e-7)
    # Masking changes the answer compared with treating -1 as a negative.
    assert partial_mAP(partial, scores) != pytest.approx(mAP(partial, scores))


def test_partial_map_hand_computed_and_skips():
    # Class 0 annotated rows 0, 2, 3: ranking 0.9(+) 0.6(-) 0.2(+) -> (1 + 2/3) / 2 = 5/6; row 1 (-1, score 0.8)
    # would otherwise rank second. Class 1 has no positive -> skipped. Class 2 annotated rows: 0.7(+) 0.4(-) -> 1.
    targets = np.array([[1, 0, -1], [-1, 0, 1], [0, -1, 0], [1, 0, -1]])
    scores = np.array([[0.9, 0.5, 0.1], [0.8, 0.5, 0.7], [0.6, 0.5, 0.4], [0.2, 0.5, 0.3]])
    np.testing.assert_allclose(per_class_partial_ap(targets, scores), [5 / 6, np.nan, 1.0], rtol=1e-7)
    assert partial_mAP(targets, scores) == pytest.approx(100 * (5 / 6 + 1.0) / 2, rel=1e-7)
    assert partial_mAP(torch.tensor(targets), torch.tensor(scores)) == pytest.approx(partial_mAP(targets, scores))
    assert partial_mAP(np.full((3, 2), -1), np.zeros((3, 2))) == 0.0


def stated_weighted_partial_map(targets, scores):
    """CSL's class-weighted partial mAP written out: per class, drop the unknown (-1) rows; skip a class without
    an annotated positive or negative; in descending score order, AP = the sum over positives of (positives so
    far / rank), divided by (positives + 1e-8); weight = the class's number of positives;
    result = 100 * sum(AP * weight) / sum(weight)."""
    aps, weights = [], []
    for k in range(targets.shape[1]):
        pairs = [(scores[i, k], targets[i, k]) for i in range(targets.shape[0]) if targets[i, k] != -1]
        labels = [y for _, y in sorted(pairs, key=lambda pair: -pair[0])]
        if 1 not in labels or 0 not in labels:
            continue
        hits, precisions = 0, []
        for rank, y in enumerate(labels, 1):
            if y == 1:
                hits += 1
                precisions.append(hits / rank)
        aps.append(sum(precisions) / (len(precisions) + 1e-8))  # the official adds 1e-8 to the count
        weights.append(sum(1 for i in range(targets.shape[0]) if targets[i, k] == 1))
    return 100 * sum(a * w for a, w in zip(aps, weights)) / sum(weights)


def test_weighted_partial_map_against_the_written_out_statement():
    targets, scores = tie_free_data(seed=6, n=120, c=9, pos_rate=0.15)
    rng = np.random.default_rng(7)
    partial = np.where(rng.random(targets.shape) < 0.5, -1.0, targets)
    partial[:, 8] = np.where(partial[:, 8] == 1, 1, -1)  # positives only: skipped
    expected = stated_weighted_partial_map(partial, scores)
    assert weighted_partial_mAP(partial, scores) == pytest.approx(expected, rel=1e-9)
    assert weighted_partial_mAP(torch.tensor(partial), torch.tensor(scores)) == pytest.approx(expected, rel=1e-9)
    assert weighted_partial_mAP(partial, scores) != pytest.approx(partial_mAP(partial, scores), rel=1e-3)


def test_weighted_partial_map_hand_computed():
    # The hand case above: class 0 AP 5/6 with 2 positives, class 2 AP 1 with 1 positive, class 1 skipped.
    targets = np.array([[1, 0, -1], [-1, 0, 1], [0, -1, 0], [1, 0, -1]])
    scores = np.array([[0.9, 0.5, 0.1], [0.8, 0.5, 0.7], [0.6, 0.5, 0.4], [0.2, 0.5, 0.3]])
    assert weighted_partial_mAP(targets, scores) == pytest.approx(100 * (2 * 5 / 6 + 1 * 1.0) / 3, rel=1e-7)
    assert weighted_partial_mAP(np.full((3, 2), -1), np.zeros((3, 2))) == 0.0


def test_partial_map_equals_map_when_fully_annotated():
    targets, scores = tie_free_data(seed=6, n=60, c=5)
    assert partial_mAP(targets, scores) == pytest.approx(mAP(targets, scores))


# ----------------------------------------------------------------------------------------------- threshold metrics

SCORES_4x3 = np.array([
    [0.9, 0.2, 0.6],
    [0.4, 0.7, 0.8],
    [0.6, 0.1, 0.3],
    [0.5, 0.9, 0.2],  # 0.5 is not > 0.5: a negative prediction (strict threshold)
])
TARGETS_4x3 = np.array([
    [1, 0, 0],
    [1, 1, 0],
    [0, 0, 1],
    [1, 0, 0],
])
# Predictions at 0.5: [[1,0,1],[0,1,1],[1,0,0],[0,1,0]]
#   class 0: tp 1 (row 0), fp 1 (row 2), fn 2 (rows 1, 3) -> P 50, R 33.33, F1 40
#   class 1: tp 1 (row 1), fp 1 (row 3), fn 0             -> P 50, R 100,   F1 66.67
#   class 2: tp 0, fp 2 (rows 0, 1), fn 1 (row 2)         -> P 0,  R 0,     F1 0 (no true positive)
#   P_C = 100/3, R_C = (100/3 + 100)/3 = 400/9, F_C = (40 + 200/3)/3 = 320/9
#   F_C_standard = 2 * (100/3) * (400/9) / (100/3 + 400/9) = 800/21
#   overall: tp 2, fp 4, fn 3 -> P_O 100/3, R_O 40, F_O = 2*tp/(2*tp+fp+fn) = 400/11
EXPECTED_4x3 = {
    "P_C": 100 / 3, "R_C": 400 / 9, "F_C": 320 / 9, "F_C_standard": 800 / 21,
    "P_O": 100 / 3, "R_O": 40.0, "F_O": 400 / 11,
}


def test_threshold_metrics_hand_computed():
    got = threshold_metrics(TARGETS_4x3, SCORES_4x3, threshold=0.5)
    assert got.keys() == EXPECTED_4x3.keys()
    for key, value in EXPECTED_4x3.items():
        assert got[key] == pytest.approx(value), key
    meter = ThresholdMetrics(3, threshold=0.5)
    meter.update(SCORES_4x3, TARGETS_4x3)
    assert meter.format_line() == "P_C 33.33 R_C 44.44 F_C 35.56 P_O 33.33 R_O 40.00 F_O 36.36"
    np.testing.assert_array_equal(meter.tp, [1, 1, 0])
    np.testing.assert_array_equal(meter.fp, [1, 1, 2])
    np.testing.assert_array_equal(meter.fn, [2, 0, 1])


def test_threshold_metrics_accumulate_over_batches_and_accept_torch():
    meter = ThresholdMetrics(3, threshold=0.5)
    meter.update(torch.tensor(SCORES_4x3[:1], dtype=torch.float32), torch.tensor(TARGETS_4x3[:1]))
    meter.update(torch.tensor(SCORES_4x3[1:3]), torch.tensor(TARGETS_4x3[1:3], dtype=torch.float32))
    meter.update(SCORES_4x3[3:], TARGETS_4x3[3:])
    for key, value in EXPECTED_4x3.items():
        assert meter.compute()[key] == pytest.approx(value), key
    meter.reset()
    assert meter.compute() == {k: 0.0 for k in EXPECTED_4x3}  # nothing seen: every ratio guarded to 0


def test_threshold_metrics_ignore_unannotated_targets():
    targets = TARGETS_4x3.astype(float).copy()
    scores = np.vstack([SCORES_4x3, [[0.9, 0.1, 0.95]]])
    targets = np.vstack([targets, [[-1, -1, -1]]])  # an extra row, not annotated at all
    got = threshold_metrics(targets, scores, threshold=0.5)
    for key, value in EXPECTED_4x3.items():
        assert got[key] == pytest.approx(value), key


def test_threshold_metrics_against_sklearn():
    rng = np.random.default_rng(7)
    targets = (rng.random((120, 6)) < 0.3).astype(int)
    scores = np.clip(0.6 * targets + 0.6 * rng.random((120, 6)), 0, 1)
    got = threshold_metrics(targets, scores, threshold=0.7)
    pred = (scores > 0.7).astype(int)
    p, r, f, _ = precision_recall_fscore_support(targets, pred, average=None, zero_division=0)
    micro_p, micro_r, micro_f, _ = precision_recall_fscore_support(targets, pred, average="micro", zero_division=0)
    assert got["P_C"] == pytest.approx(100 * p.mean())
    assert got["R_C"] == pytest.approx(100 * r.mean())
    assert got["F_C"] == pytest.approx(100 * f.mean())
    assert got["F_C_standard"] == pytest.approx(2 * got["P_C"] * got["R_C"] / (got["P_C"] + got["R_C"]))
    assert (got["P_O"], got["R_O"], got["F_O"]) == pytest.approx((100 * micro_p, 100 * micro_r, 100 * micro_f))


def test_threshold_metrics_validate_shapes():
    meter = ThresholdMetrics(3)
    with pytest.raises(ValueError, match="same shape"):
        meter.update(np.zeros((2, 3)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"\(batch, 3\)"):
        meter.update(np.zeros((2, 4)), np.zeros((2, 4)))
