"""NUS-WIDE (MIIL CSV), Open Images (MIIL release) and custom CSV loaders on small fixtures in their native
formats (nus_root and oi_root: tests/conftest.py); targets are written out by hand."""

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from asl.data import DatasetError, create_dataset


def names(ds):
    return [Path(ds.image_path(i)).name for i in range(len(ds))]


# ---------------------------------------------------------------- NUS-WIDE
def test_nus_wide_targets_and_missing_images(nus_root, caplog):
    caplog.set_level(logging.WARNING, logger="asl.data")
    train = create_dataset("nus-wide", nus_root, "train", 32, train=True)
    # sorted concept names over the whole CSV, both splits
    assert train.classes == ["animal", "clouds", "sky", "water", "zebra"]
    assert names(train) == ["a.jpg", "b.jpg", "d.jpg"]
    assert train.num_missing == 1
    assert "c_missing.jpg" in caplog.text and "1 of 4" in caplog.text
    np.testing.assert_array_equal(train.targets(), [[0, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0]])
    val = create_dataset("nus-wide", nus_root, "val", 32, train=False)
    assert val.classes == train.classes and val.num_missing == 0
    np.testing.assert_array_equal(val.targets(), [[1, 0, 1, 1, 0], [0, 0, 0, 0, 1]])


def test_nus_wide_headerless_and_errors(tmp_path, nus_root, write_csv):
    rows = list(csv.reader(open(nus_root / "nus_wid_data.csv")))[1:]
    write_csv(nus_root / "other.csv", rows)
    ds = create_dataset("nus-wide", nus_root, "val", 32, train=False, csv_file="other.csv")
    assert len(ds) == 2
    with pytest.raises(DatasetError, match="nus_wid_data.csv"):
        create_dataset("nus-wide", tmp_path, "train", 32, train=True)
    with pytest.raises(DatasetError, match="split"):
        create_dataset("nus-wide", nus_root, "test", 32, train=False)


# ---------------------------------------------------------------- Open Images
# the classes.csv that oi_root writes
MIDS = ["/m/01", "/m/02", "/m/03", "/m/04"]
MID_NAMES = ["Cat", "Dog", "Car", "Tree"]


def test_open_images_eval_keeps_unannotated(oi_root):
    ds = create_dataset("openimages", oi_root, "test", 32, train=False)
    assert ds.classes == MID_NAMES and ds.mids == MIDS
    assert names(ds) == ["e1.jpg", "e2.jpg"]
    np.testing.assert_array_equal(ds.targets(), [[-1, 1, 0, 0], [1, 1, -1, -1]])
    image, target = ds[1]
    assert image.shape == (3, 32, 32)


@pytest.mark.parametrize("mode,expected", [
    (None, [[1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]]),
    ("negative", [[1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]]),
    ("ignore", [[1, 0, 1, -1], [-1, -1, -1, 1], [0, -1, -1, -1]]),
])
def test_open_images_training_modes(oi_root, mode, expected):
    options = {} if mode is None else {"unannotated": mode}
    ds = create_dataset("openimages", oi_root, "train", 32, train=True, **options)
    assert names(ds) == ["t1.jpg", "t2.jpg", "t3.jpg"]
    np.testing.assert_array_equal(ds.targets(), expected)


def test_open_images_class_order_from_checkpoint(oi_root, tmp_path):
    idx_to_class = {0: "Tree", 1: "Cat", 2: "/m/02", 3: "Car"}   # names or MIDs, as checkpoints have them
    ds = create_dataset("openimages", oi_root, "test", 32, train=False, idx_to_class=idx_to_class)
    assert ds.idx_to_class() == {0: "Tree", 1: "Cat", 2: "Dog", 3: "Car"}
    np.testing.assert_array_equal(ds.targets(), [[0, -1, 1, 0], [-1, 1, 1, -1]])
    ckpt = tmp_path / "model.pth"
    torch.save({"model": {}, "num_classes": 4, "idx_to_class": {0: "/m/04", 1: "/m/03", 2: "/m/02", 3: "/m/01"}},
               ckpt)
    ds = create_dataset("openimages", oi_root, "test", 32, train=False, classes_file=ckpt)
    np.testing.assert_array_equal(ds.targets(), [[0, 0, 1, -1], [-1, -1, 1, 1]])
    with pytest.raises(DatasetError, match="Lion"):
        create_dataset("openimages", oi_root, "test", 32, train=False, idx_to_class={0: "Lion"})


def test_open_images_display_name_of_two_mids(oi_root, write_csv):
    # Open Images names some MIDs alike ("Jaguar": the animal and the car). A checkpoint naming its classes in
    # the table's order keeps them apart: the second "Jaguar" is /m/03, not the first one's /m/01 again.
    write_csv(oi_root / "classes.csv", [["/m/01", "Jaguar"], ["/m/02", "Dog"], ["/m/03", "Jaguar"], ["/m/04", "Tree"]])
    ds = create_dataset("openimages", oi_root, "test", 32, train=False,
                        idx_to_class={0: "Jaguar", 1: "Dog", 2: "Jaguar", 3: "Tree"})
    assert ds.mids == MIDS and ds.classes == ["Jaguar", "Dog", "Jaguar", "Tree"]
    np.testing.assert_array_equal(ds.targets(), [[-1, 1, 0, 0], [1, 1, -1, -1]])


def test_open_images_idx_to_class_as_text_is_refused(oi_root):
    # What --dataset-option idx_to_class=... gives: text, which names no classes.
    with pytest.raises(DatasetError, match="idx_to_class must be a mapping .* give classes_file=FILE instead"):
        create_dataset("openimages", oi_root, "test", 32, train=False, idx_to_class="{0: 'Cat'}")


def test_open_images_missing_files(tmp_path, oi_root):
    (oi_root / "data.csv").rename(oi_root / "elsewhere.csv")
    with pytest.raises(DatasetError, match="data.csv"):
        create_dataset("openimages", oi_root, "test", 32, train=False)
    ds = create_dataset("openimages", oi_root, "test", 32, train=False, csv_file=oi_root / "elsewhere.csv")
    assert len(ds) == 2


# ---------------------------------------------------------------- custom CSV
@pytest.fixture
def csv_root(tmp_path, write_image):
    root = tmp_path / "mydata"
    for name in ["p1.jpg", "p2.jpg", "p3.jpg", "p4.jpg"]:
        write_image(root / "photos" / name)
    (root / "labels.csv").write_text(
        "image,labels,split\n"
        "photos/p1.jpg,cat|dog,train\n"
        "photos/p2.jpg,car,val\n"
        "photos/p3.jpg,,train\n"
        "photos/p4.jpg, dog ; car ,train\n"
    )
    return root


def test_csv_inferred_classes(csv_root):
    train = create_dataset("csv", csv_root, "train", 32, train=True)
    assert train.classes == ["car", "cat", "dog"]
    assert names(train) == ["p1.jpg", "p3.jpg", "p4.jpg"]
    np.testing.assert_array_equal(train.targets(), [[0, 1, 1], [0, 0, 0], [1, 0, 1]])
    val = create_dataset("csv", csv_root / "labels.csv", "val", 32, train=False)
    np.testing.assert_array_equal(val.targets(), [[1, 0, 0]])


def test_csv_classes_file_and_errors(csv_root, tmp_path):
    (csv_root / "classes.txt").write_text("dog\ncat\ncar\nbird\n")
    ds = create_dataset("csv", csv_root, "train", 32, train=False)
    assert ds.classes == ["dog", "cat", "car", "bird"]
    np.testing.assert_array_equal(ds.targets(), [[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0]])
    (csv_root / "classes.txt").write_text("dog\ncat\n")
    with pytest.raises(DatasetError, match="'car'"):
        create_dataset("csv", csv_root, "train", 32, train=False)
    (tmp_path / "bad.csv").write_text("file,tags\na.jpg,x\n")
    with pytest.raises(DatasetError, match="image,labels"):
        create_dataset("csv", tmp_path / "bad.csv", None, 32, train=False)
    with pytest.raises(DatasetError, match="Datasets.md"):
        create_dataset("csv", tmp_path / "nope", "train", 32, train=False)


def test_csv_without_split_column(tmp_path, write_image):
    write_image(tmp_path / "x.png")
    (tmp_path / "train.csv").write_text(f"image,labels\n{tmp_path / 'x.png'},a;b\n")
    with pytest.raises(DatasetError, match="outside .* allow_outside_root=1"):
        create_dataset("csv", tmp_path, "train", 16, train=False)  # absolute paths are opt-in
    ds = create_dataset("csv", tmp_path, "train", 16, train=False, allow_outside_root=1)
    assert ds.classes == ["a", "b"] and ds.image_path(0) == str(tmp_path / "x.png")
    np.testing.assert_array_equal(ds.targets(), [[1, 1]])


@pytest.mark.faults
def test_non_utf8_label_files_are_named(tmp_path, nus_root, oi_root):
    (nus_root / "nus_wid_data.csv").write_bytes("filepath,label,split_name\nimages/a.jpg,\"['caf\xe9']\",train\n"
                                                .encode("latin-1"))
    with pytest.raises(DatasetError, match="nus_wid_data.csv is not UTF-8"):
        create_dataset("nus-wide", nus_root, "train", 32, train=False)
    classes = tmp_path / "classes.csv"
    classes.write_bytes("/m/01,Caf\xe9\n".encode("latin-1"))
    with pytest.raises(DatasetError, match="classes.csv is not UTF-8"):
        create_dataset("openimages", oi_root, "test", 32, train=False, classes_file=classes)


@pytest.mark.faults
def test_a_refused_classes_checkpoint_gets_our_message(tmp_path, oi_root):
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    evil = tmp_path / "evil.pth"
    torch.save({"idx_to_class": {0: "a"}, "x": Payload()}, evil)
    with pytest.raises(DatasetError, match="classes_file: refusing to unpickle"):
        create_dataset("openimages", oi_root, "test", 32, train=False, classes_file=evil)
