"""VOC 2007 loader on the real voc2007_mini sample, against the labels listed in its PROVENANCE.md."""

from pathlib import Path

import numpy as np
import pytest

from asl.data import DatasetError, create_dataset

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VOC = SHARED / "voc2007_mini"
needs_voc = pytest.mark.skipif(not (VOC / "VOCdevkit").is_dir(), reason="shared/data/voc2007_mini absent")

CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
           "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]

# PROVENANCE.md, "Labels": positives, then the classes marked difficult
LABELS = {
    "000342": (["person"], ["tvmonitor"]),
    "000456": (["bus", "person"], []),
    "000542": (["cat"], []),
    "001150": (["dog", "person"], ["sofa"]),
    "001763": (["cat", "dog", "sofa"], ["tvmonitor"]),
    "003123": (["diningtable", "person"], ["chair"]),
    "004101": (["person", "sofa"], ["bicycle"]),
    "004545": (["car", "dog", "horse", "person"], []),
    "008591": (["bottle", "diningtable"], ["chair"]),
}


def expected(image_id, difficult_value):
    t = np.zeros(20, np.float32)
    pos, diff = LABELS[image_id]
    for name in diff:
        t[CLASSES.index(name)] = difficult_value
    for name in pos:
        t[CLASSES.index(name)] = 1
    return t


def by_id(ds):
    return {Path(ds.image_path(i)).stem: ds.target(i).numpy() for i in range(len(ds))}


@needs_voc
@pytest.mark.parametrize("root", [VOC, VOC / "VOCdevkit", VOC / "VOCdevkit" / "VOC2007"])
def test_voc_eval_ignores_difficult(root):
    ds = create_dataset("voc", root, "test", 32, train=False)
    assert ds.classes == CLASSES and ds.num_classes == 20
    assert len(ds) == 9
    got = by_id(ds)
    assert sorted(got) == sorted(LABELS)
    for image_id in LABELS:
        np.testing.assert_array_equal(got[image_id], expected(image_id, -1), err_msg=image_id)
    assert Path(ds.image_path(0)).is_file()


@needs_voc
@pytest.mark.parametrize("mode,value", [(None, 1), ("positive", 1), ("ignore", -1), ("negative", 0)])
def test_voc_training_difficult_modes(mode, value):
    options = {} if mode is None else {"difficult": mode}
    got = by_id(create_dataset("voc", VOC, "test", 32, train=True, **options))
    for image_id in LABELS:
        np.testing.assert_array_equal(got[image_id], expected(image_id, value), err_msg=image_id)


def test_voc_missing_class_file_and_folder(tmp_path):
    main = tmp_path / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (tmp_path / "VOCdevkit" / "VOC2007" / "JPEGImages").mkdir()
    for name in CLASSES[:-1]:
        (main / f"{name}_test.txt").write_text("000001 -1\n")
    with pytest.raises(DatasetError) as err:
        create_dataset("voc", tmp_path, "test", 32, train=False)
    assert str(main / "tvmonitor_test.txt") in str(err.value) and "Datasets.md" in str(err.value)
    with pytest.raises(DatasetError, match="JPEGImages"):
        create_dataset("voc", tmp_path / "nothing", "test", 32, train=False)
    with pytest.raises(ValueError, match="difficult"):
        create_dataset("voc", tmp_path, "test", 32, train=False, difficult="maybe")


@pytest.mark.parametrize("broken", ["bird_test.txt", "test.txt"])
def test_voc_label_files_that_are_not_utf8_are_named(tmp_path, broken):
    main = tmp_path / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
    main.mkdir(parents=True)
    (tmp_path / "VOCdevkit" / "VOC2007" / "JPEGImages").mkdir()
    for name in CLASSES:
        (main / f"{name}_test.txt").write_text("000001 -1\n")
    (main / "test.txt").write_text("000001\n")
    (main / broken).write_bytes(b"000001 \xff\xfe-1\n")  # Latin-1 bytes, no UTF-8 text
    with pytest.raises(DatasetError, match="is not UTF-8 text") as err:
        create_dataset("voc", tmp_path, "test", 32, train=False)
    assert str(main / broken) in str(err.value)
