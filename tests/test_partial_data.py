"""Partial labels in the data: CSL's simulation (exact counts, determinism, types, refusals) and unknown labels in
CSV datasets."""
import numpy as np
import pytest
import torch

from asl.data import DatasetError, LabelTable, simulate_partial_dataset, simulate_partial_labels


def full_labels(n=200, c=6, seed=0):
    rng = np.random.default_rng(seed)
    frequency = np.array([0.02, 0.1, 0.3, 0.5, 0.8, 0.97])[:c]
    return (rng.random((n, c)) < frequency).astype(np.float32)


@pytest.mark.parametrize("per_class", [0, 3, 10, 40, 1000])
def test_fpc_keeps_exactly_n_positives_and_n_negatives_per_class(per_class):
    y = full_labels()
    out = simulate_partial_labels(y, "fpc", per_class, seed=1)
    for c in range(y.shape[1]):
        positives, negatives = int((y[:, c] == 1).sum()), int((y[:, c] == 0).sum())
        assert int((out[:, c] == 1).sum()) == min(per_class, positives)
        assert int((out[:, c] == 0).sum()) == min(per_class, negatives)
        assert int((out[:, c] == -1).sum()) == y.shape[0] - min(per_class, positives) - min(per_class, negatives)
    kept = out != -1
    assert np.array_equal(out[kept], y[kept])  # a kept label is never changed


def test_fpc_leaves_unknown_labels_unknown():
    y = full_labels()
    y[:50, 2] = -1
    out = simulate_partial_labels(y, "fpc", 1000)
    assert (out[:50, 2] == -1).all()
    assert int((out[:, 2] != -1).sum()) == 150


@pytest.mark.parametrize("p", [0.0, 0.25, 0.5, 1.0])
def test_rps_drops_each_label_with_probability_p(p):
    y = full_labels(n=2000)
    out = simulate_partial_labels(y, "rps", p, seed=3)
    dropped = out == -1
    assert np.array_equal(out[~dropped], y[~dropped])
    if p in (0.0, 1.0):
        assert dropped.mean() == p
    else:  # binomial with 12,000 draws: 5 standard deviations
        assert abs(dropped.mean() - p) < 5 * np.sqrt(p * (1 - p) / dropped.size)


def test_same_seed_same_result_other_seed_other_result():
    y = full_labels()
    for mode, param in [("fpc", 10), ("rps", 0.5)]:
        a, b = simulate_partial_labels(y, mode, param, seed=7), simulate_partial_labels(y, mode, param, seed=7)
        assert np.array_equal(a, b)
        assert not np.array_equal(a, simulate_partial_labels(y, mode, param, seed=8))


def test_ndarray_in_ndarray_out_tensor_in_tensor_out_input_untouched():
    y = full_labels()
    y_copy = y.copy()
    out = simulate_partial_labels(y, "rps", 0.5)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert np.array_equal(y, y_copy)
    t = torch.from_numpy(y.astype(np.int64))
    t_copy = t.clone()
    out_t = simulate_partial_labels(t, "fpc", 5)
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.int64 and out_t.device == t.device
    assert torch.equal(t, t_copy)
    assert np.array_equal(out_t.numpy(), simulate_partial_labels(y, "fpc", 5).astype(np.int64))
    assert simulate_partial_labels(y.tolist(), "rps", 1.0).tolist() == (-np.ones_like(y)).tolist()


def test_the_long_official_names():
    y = full_labels()
    assert np.array_equal(simulate_partial_labels(y, "fix_per_class", 4), simulate_partial_labels(y, "fpc", 4))
    assert np.array_equal(simulate_partial_labels(y, "random_per_sample", 0.3),
                          simulate_partial_labels(y, "rps", 0.3))


@pytest.mark.parametrize("mode, param, match", [("fcp", 10, "unknown partial-label simulation"),
                                                ("fpc", 2.5, "whole number"), ("fpc", -1, "whole number"),
                                                ("rps", 1.5, r"within \[0, 1\]"), ("rps", float("nan"), "number"),
                                                ("rps", "0.5", "number")])
def test_bad_mode_or_param(mode, param, match):
    with pytest.raises(DatasetError, match=match):
        simulate_partial_labels(full_labels(), mode, param)


def test_targets_that_cannot_hold_minus_one_or_are_not_a_matrix():
    with pytest.raises(DatasetError, match="cannot hold -1"):
        simulate_partial_labels(full_labels().astype(bool), "rps", 0.5)
    with pytest.raises(DatasetError, match="num_samples, num_classes"):
        simulate_partial_labels(np.zeros(5), "rps", 0.5)


def test_a_dataset_gets_the_simulated_labels():
    y = full_labels(n=30)

    class Labelled:
        labels = LabelTable(6, 0.0, {1.0: [np.flatnonzero(row).tolist() for row in y]})

    dataset = Labelled()
    kept, annotated = simulate_partial_dataset(dataset, "fpc", 4, seed=2)
    expected = simulate_partial_labels(y, "fpc", 4, seed=2)
    assert np.array_equal(dataset.labels.dense(), expected)
    assert (kept, annotated) == (int((expected != -1).sum()), 180)


# ------------------------------------------------------------------------------------- unknown labels in a CSV set

def test_a_csv_cell_marks_labels_unknown_negative_or_all_others_unknown(tmp_path):
    from asl.data import create_dataset, has_unknown_labels

    (tmp_path / "classes.txt").write_text("cat\ndog\ncar\nbird\n")
    (tmp_path / "labels.csv").write_text("image,labels\n"
                                         "a.jpg,cat|?dog\n"        # dog unknown, the others absent
                                         "b.jpg,cat|-dog|?*\n"     # cat present, dog absent, car and bird unknown
                                         "c.jpg,?*\n"              # nothing known
                                         "d.jpg,car;bird\n")
    ds = create_dataset("csv", tmp_path, None, 16, train=False)
    np.testing.assert_array_equal(ds.targets(), [[1, -1, 0, 0], [1, 0, -1, -1], [-1, -1, -1, -1], [0, 0, 1, 1]])
    assert has_unknown_labels(ds)
    (tmp_path / "labels.csv").write_text("image,labels\na.jpg,cat\nb.jpg,-dog\n")
    ds = create_dataset("csv", tmp_path, None, 16, train=False)
    np.testing.assert_array_equal(ds.targets(), [[1, 0, 0, 0], [0, 0, 0, 0]])
    assert not has_unknown_labels(ds)


def test_a_csv_cell_that_gives_a_class_two_values_or_an_unknown_name(tmp_path):
    from asl.data import create_dataset

    (tmp_path / "labels.csv").write_text("image,labels\na.jpg,cat|?cat\n")
    with pytest.raises(DatasetError, match=r"labels.csv:2 gives class 'cat' two values"):
        create_dataset("csv", tmp_path, None, 16, train=False)
    (tmp_path / "classes.txt").write_text("cat\n")
    (tmp_path / "labels.csv").write_text("image,labels\na.jpg,?dog\n")
    with pytest.raises(DatasetError, match="'dog' at .*labels.csv:2 is not in the classes file"):
        create_dataset("csv", tmp_path, None, 16, train=False)


def test_classes_found_in_the_csv_include_unknown_and_negative_names(tmp_path):
    from asl.data import create_dataset

    (tmp_path / "labels.csv").write_text("image,labels\na.jpg,cat|?dog|-ant\n")
    assert create_dataset("csv", tmp_path, None, 16, train=False).classes == ["ant", "cat", "dog"]


def test_parse_simulation():
    from asl.data.partial import parse_simulation

    assert parse_simulation("fpc:1000") == ("fpc", 1000) and parse_simulation("RPS:0.5") == ("rps", 0.5)
    for bad in ("fpc", "rps:half", "fpc:1.5", "xyz:1"):
        with pytest.raises(DatasetError):
            parse_simulation(bad)
