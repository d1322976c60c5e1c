"""NUS-WIDE (MIIL CSV), Open Images (MIIL release) and custom CSV loaders on small fixtures written here in
their native formats; targets are written out by hand."""

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from asl.data import DatasetError, create_dataset


def write_image(path, colour=(200, 30, 30), size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def names(ds):
    return [Path(ds.image_path(i)).name for i in range(len(ds))]


# ---------------------------------------------------------------- NUS-WIDE
@pytest.fixture
def nus_root(tmp_path):
    root = tmp_path / "nus"
    for name in ["a.jpg", "b.jpg", "d.jpg", "v1.jpg", "v2.jpg"]:
        write_image(root / "images" / name)
    write_csv(root / "nus_wid_data.csv", [
        ["filepath", "label", "split_name"],
        ["images/a.jpg", "['clouds', 'sky']", "train"],
        ["images/b.jpg", "['water']", "train"],
        ["images/c_missing.jpg", "['sky', 'animal']", "train"],
        ["images/d.jpg", "[]", "train"],
        ["images/v1.jpg", "['animal', 'water', 'sky']", "val"],
        ["images/v2.jpg", "['zebra']", "val"],
    ])
    return root


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


def test_nus_wide_headerless_and_errors(tmp_path, nus_root):
    rows = list(csv.reader(open(nus_root / "nus_wid_data.csv")))[1:]
    write_csv(nus_root / "other.csv", rows)
    ds = create_dataset("nus-wide", nus_root, "val", 32, train=False, csv_file="other.csv")
    assert len(ds) == 2
    with pytest.raises(DatasetError, match="nus_wid_data.csv"):
        create_dataset("nus-wide", tmp_path, "train", 32, train=True)
    with pytest.raises(DatasetError, match="split"):
        create_dataset("nus-wide", nus_root, "test", 32, train=False)


# ---------------------------------------------------------------- Open Images
MIDS = ["/m/01", "/m/02", "/m/03", "/m/04"]
MID_NAMES = ["Cat", "Dog", "Car", "Tree"]


@pytest.fixture
def oi_root(tmp_path):
    root = tmp_path / "oi"
    for name in ["t1.jpg", "t2.jpg", "t3.jpg"]:
        write_image(root / "train" / name)
    write_image(root / "test" / "e1.jpg")
    write_image(root / "test" / "e2.jpg")
    write_csv(root / "classes.csv", [["LabelName", "DisplayName"]] + [[m, n] for m, n in zip(MIDS, MID_NAMES)])
    write_csv(root / "data.csv", [
        ["ImageID", "positive", "negative", "split"],
        ["t1.jpg", "['/m/01', '/m/03']", "['/m/02']", "train"],
        ["t2", "['/m/04']", "[]", "train"],                      # no extension: .jpg is appended
        ["t3.jpg", "[]", "['/m/01', '/m/99']", "train"],        # /m/99 is not a class: ignored
        ["e1.jpg", "['/m/02']", "['/m/04', '/m/03']", "test"],
        ["e2.jpg", "['/m/01', '/m/02']", "[]", "test"],
    ])
    return root


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


def test_open_images_missing_files(tmp_path, oi_root):
    (oi_root / "data.csv").rename(oi_root / "elsewhere.csv")
    with pytest.raises(DatasetError, match="data.csv"):
        create_dataset("openimages", oi_root, "test", 32, train=False)
    ds = create_dataset("openimages", oi_root, "test", 32, train=False, csv_file=oi_root / "elsewhere.csv")
    assert len(ds) == 2


# ---------------------------------------------------------------- custom CSV
@pytest.fixture
def csv_root(tmp_path):
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


def test_csv_without_split_column(tmp_path):
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
