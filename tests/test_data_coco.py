"""COCO loader on the real tiny_coco sample, checked against targets computed here from the raw json; the
synthetic set; dataset errors; create_dataset's name/option handling."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from asl.data import DATASET_NAMES, DatasetError, create_dataset, default_split, generate_synthetic_coco

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY_COCO = SHARED / "tiny_coco"
needs_coco = pytest.mark.skipif(not (TINY_COCO / "annotations").is_dir(), reason="shared/data/tiny_coco absent")


def expected_from_json(ann_file):
    """Targets by the original's rules, with the json module only: images in the order of their first
    annotation, class index = position in the categories list, any annotation (crowd too) makes it present."""
    doc = json.loads(Path(ann_file).read_text())
    cat_pos = {c["id"]: k for k, c in enumerate(doc["categories"])}
    files = {im["id"]: im["file_name"] for im in doc["images"]}
    order, labels = [], {}
    for ann in doc["annotations"]:
        if ann["image_id"] not in labels:
            order.append(ann["image_id"])
            labels[ann["image_id"]] = np.zeros(len(doc["categories"]), np.float32)
        labels[ann["image_id"]][cat_pos[ann["category_id"]]] = 1
    return doc, [files[i] for i in order], np.stack([labels[i] for i in order])


@needs_coco
@pytest.mark.parametrize("split,dropped", [("train2017", ["000000262284.jpg"]),
                                           ("val2017", ["000000226111.jpg", "000000058636.jpg"])])
def test_coco_targets_match_json(split, dropped):
    doc, files, targets = expected_from_json(TINY_COCO / "annotations" / f"instances_{split}.json")
    ds = create_dataset("coco", TINY_COCO, split, 32, train=False)
    assert len(ds) == len(doc["images"]) - len(dropped) == len(files)
    got_files = [Path(ds.image_path(i)).name for i in range(len(ds))]
    assert got_files == files
    for name in dropped:
        assert name not in got_files
    assert all(Path(ds.image_path(i)).parent == TINY_COCO / split for i in range(len(ds)))
    np.testing.assert_array_equal(ds.targets(), targets)
    assert ds.classes == [c["name"] for c in doc["categories"]]
    assert ds.num_classes == 80
    assert ds.idx_to_class()[0] == "person" and ds.idx_to_class()[79] == "toothbrush"
    image, target = ds[3]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert target.dtype == torch.float32 and torch.equal(target, torch.from_numpy(targets[3]))


@needs_coco
def test_coco_crowd_annotations_count():
    doc, files, targets = expected_from_json(TINY_COCO / "annotations" / "instances_train2017.json")
    crowd = [a for a in doc["annotations"] if a.get("iscrowd")]
    assert crowd, "the sample has crowd annotations"
    ds = create_dataset("coco", TINY_COCO, "train2017", 32, train=True)
    by_name = {Path(ds.image_path(i)).name: i for i in range(len(ds))}
    cat_pos = {c["id"]: k for k, c in enumerate(doc["categories"])}
    file_of = {im["id"]: im["file_name"] for im in doc["images"]}
    for ann in crowd:
        assert ds.target(by_name[file_of[ann["image_id"]]])[cat_pos[ann["category_id"]]] == 1


def test_missing_annotation_file_names_path(tmp_path):
    (tmp_path / "val2014").mkdir()
    with pytest.raises(DatasetError) as err:
        create_dataset("coco", tmp_path, None, 32, train=False)
    message = str(err.value)
    assert str(tmp_path / "annotations" / "instances_val2014.json") in message
    assert "Datasets.md" in message and "\n" not in message


def test_missing_image_folder_names_path(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text('{"images": [], "annotations": [], '
                                                                     '"categories": []}')
    with pytest.raises(DatasetError, match="val2017"):
        create_dataset("coco", tmp_path, "val2017", 32, train=False)


def test_names_options_and_default_splits(tmp_path):
    assert DATASET_NAMES == ("coco", "voc", "nus-wide", "openimages", "csv", "synthetic", "webdataset")
    assert default_split("coco", True) == "train2014" and default_split("coco", False) == "val2014"
    assert default_split("voc", False) == "test" and default_split("openimages", False) == "test"
    with pytest.raises(ValueError, match="known"):
        create_dataset("imagenet", tmp_path, None, 32, train=False)
    with pytest.raises(DatasetError, match="difficult"):
        create_dataset("coco", tmp_path, None, 32, train=False, difficult="ignore")


def test_synthetic_is_deterministic_and_loads_as_coco(tmp_path):
    a = generate_synthetic_coco(tmp_path / "a", num_train=6, num_val=3, image_size=48, seed=3)
    b = generate_synthetic_coco(tmp_path / "b", num_train=6, num_val=3, image_size=48, seed=3)
    c = generate_synthetic_coco(tmp_path / "c", num_train=6, num_val=3, image_size=48, seed=4)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert len([f for f in files_a if f.suffix == ".jpg"]) == 9
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "train" / "000000000001.jpg").read_bytes() != (c / "train" / "000000000001.jpg").read_bytes()

    doc, files, targets = expected_from_json(a / "annotations" / "instances_train.json")
    assert len(files) == 6, "every generated picture has an annotation"
    assert [c["name"] for c in doc["categories"]] == ["circle", "square", "triangle", "cross", "ring", "star"]
    assert all(1 <= t.sum() <= 3 for t in targets)
    ds = create_dataset("synthetic", a, "train", 32, train=True)
    assert ds.classes == ["circle", "square", "triangle", "cross", "ring", "star"]
    np.testing.assert_array_equal(ds.targets(), targets)
    assert [Path(ds.image_path(i)).name for i in range(len(ds))] == files
    image, target = ds[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8


def test_synthetic_generated_when_absent(tmp_path):
    root = tmp_path / "demo"
    ds = create_dataset("synthetic", root, "val", 32, train=False, num_train=4, num_val=2, synthetic_size=40)
    assert len(ds) == 2 and (root / "annotations" / "instances_train.json").is_file()
    stamp = (root / "annotations" / "instances_val.json").stat().st_mtime_ns
    create_dataset("synthetic", root, "val", 32, train=False)  # present: not regenerated
    assert (root / "annotations" / "instances_val.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("content, expected", [
    ("{not json", "instances_val.json is not a usable COCO annotation file"),
    ("", "instances_val.json is not a usable COCO annotation file"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 5, "image_id": 1, "category_id": 999}],'
     ' "categories": [{"id": 1, "name": "cat"}]}', "category_id 999"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 5, "image_id": 1, "category_id": 1}],'
     ' "categories": []}', "has no categories"),
    ('{"images": [], "annotations": [{"id": 5, "image_id": 44, "category_id": 1}],'
     ' "categories": [{"id": 1, "name": "cat"}]}', "image id 44"),
    ('{"images": [{"id": 1, "file_name": null}], "annotations": [{"id": 5, "image_id": 1, "category_id": 1}],'
     ' "categories": [{"id": 1, "name": "cat"}]}', "image 1 has no file_name"),
    ('{"images": [{"id": 1}], "annotations": [{"id": 5, "image_id": 1, "category_id": 1}],'
     ' "categories": [{"id": 1, "name": "cat"}]}', "image 1 has no file_name"),
])
@pytest.mark.faults
def test_broken_annotation_files_are_named_with_the_reason(tmp_path, content, expected):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val").mkdir()
    (tmp_path / "annotations" / "instances_val.json").write_text(content)
    with pytest.raises(DatasetError, match=expected) as err:
        create_dataset("coco", tmp_path, "val", 32, train=False)
    assert "instances_val.json" in str(err.value)


@pytest.mark.faults
def test_file_names_outside_the_dataset_are_refused_unless_allowed(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val").mkdir()
    (tmp_path / "annotations" / "instances_val.json").write_text(
        '{"images": [{"id": 1, "file_name": "../../etc/passwd"}], "categories": [{"id": 1, "name": "cat"}],'
        ' "annotations": [{"id": 5, "image_id": 1, "category_id": 1}]}')
    with pytest.raises(DatasetError, match=r"1 image path\(s\) point outside .*'../../etc/passwd'"):
        create_dataset("coco", tmp_path, "val", 32, train=False)
    assert len(create_dataset("coco", tmp_path, "val", 32, train=False, allow_outside_root=1)) == 1
