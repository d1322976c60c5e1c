"""infer.py on real COCO pictures with an official-layout checkpoint made from timm's TResNet-M.

The reference scores are timm's forward on pictures loaded with PIL + torchvision ``Resize((s, s))`` +
``ToTensor`` (validate.py's preprocessing), so the test also proves that infer.py preprocesses like validate.py.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")
from PIL import Image  # noqa: E402
from torchvision import transforms as T  # noqa: E402

from asl.checkpoint import CheckpointError  # noqa: E402
from asl.cli import run_main  # noqa: E402
from asl.evaluation.predictions import default_threshold, detections  # noqa: E402
from asl.models.loading import load_model, resolve_architecture  # noqa: E402
from asl.pictures import MIN_ANNOTATED_SIDE, annotate  # noqa: E402
from asl.models import convert_timm_tresnet, create_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "tiny_coco"
SIZE = 32  # TResNet works down to 32 pixels; 4x cheaper than 64

pytestmark = pytest.mark.skipif(not (DATA / "val2017").is_dir(), reason=f"shared test data not found at {DATA}")


from asl.apps import infer  # noqa: E402


def class_names() -> list[str]:
    data = json.loads((DATA / "annotations" / "instances_val2017.json").read_text())
    return [c["name"] for c in data["categories"]]


def timm_tresnet(name: str = "tresnet_m", seed: int = 0):
    """Random timm TResNet whose BatchNorm scales are >= 1e-5, so the official |w|+1e-5 form is exact."""
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=80).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.0)
                m.bias.uniform_(-0.2, 0.2)
        model.head.fc.weight.normal_(0.0, 0.1)
    return model


def save_official(model, path: Path) -> Path:
    torch.save({"model": convert_timm_tresnet(model.state_dict()), "num_classes": 80,
                "idx_to_class": dict(enumerate(class_names()))}, path)
    return path


def reference_scores(model, files, size: int = SIZE) -> np.ndarray:
    tf = T.Compose([T.Resize((size, size)), T.ToTensor()])
    x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        return torch.sigmoid(model(x)).double().numpy()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infer")
    model = timm_tresnet()
    pictures = sorted((DATA / "val2017").glob("*.jpg"))[:5]
    return {"model": model, "path": save_official(model, tmp / "coco_m.pth"), "pictures": pictures,
            "scores": dict(zip(pictures, reference_scores(model, pictures))), "names": class_names()}


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def separating_threshold(scores: np.ndarray, top: int = 10) -> tuple[float, int]:
    """A threshold in the widest gap among the ``top`` best scores, and how many scores lie above it."""
    s = np.sort(scores)[::-1][: top + 1]
    gaps = s[:-1] - s[1:]
    k = int(np.argmax(gaps))
    assert gaps[k] > 1e-3, "scores too close together for a robust threshold"
    return float((s[k] + s[k + 1]) / 2), k + 1


def test_one_picture_json_matches_reference(setup, capsys):
    picture = setup["pictures"][0]
    ref = setup["scores"][picture]
    th, count = separating_threshold(ref)
    code = run_main(infer.main, [f"--model_path={setup['path']}", f"--pic_path={picture}", f"--input_size={SIZE}",
                                 f"--th={th}", "--json", "--device=cpu"])
    assert code == 0
    [obj] = json_lines(capsys.readouterr().out)
    assert obj["image"] == str(picture)
    found = obj["detections"]
    assert len(found) == count
    order = np.argsort(-ref)[:count]
    assert [d["class"] for d in found] == [setup["names"][k] for k in order]  # best first, names from idx_to_class
    assert [d["score"] for d in found] == pytest.approx(ref[order], abs=1e-4)


def test_folder_recursive_batched_with_unreadable_and_top_k(setup, tmp_path, capsys):
    folder = tmp_path / "pics"
    (folder / "a" / "b").mkdir(parents=True)
    pictures = setup["pictures"]
    layout = [folder / pictures[0].name, folder / "a" / pictures[1].name, folder / "a" / "b" / pictures[2].name,
              folder / "a" / "b" / pictures[3].name]
    for src, dst in zip(pictures, layout):
        shutil.copy(src, dst)
    (folder / "a" / "broken.jpg").write_bytes(b"not a picture")
    (folder / "notes.txt").write_text("not a picture either, and not picked up: no picture extension")
    out_dir = tmp_path / "annotated"
    code = run_main(infer.main, ["--model-path", str(setup["path"]), "--pic-path", str(folder),
                                 "--input-size", str(SIZE), "--th", "0", "--top-k", "3", "--json", "-b", "2",
                                 "-j", "0", "--output", str(out_dir)])
    captured = capsys.readouterr()
    assert code == 0
    objs = {o["image"]: o["detections"] for o in json_lines(captured.out)}
    assert set(objs) == {str(p) for p in layout}
    for src, dst in zip(pictures, layout):
        ref = setup["scores"][src]
        top3 = np.argsort(-ref)[:3]
        assert [d["class"] for d in objs[str(dst)]] == [setup["names"][k] for k in top3]
        assert [d["score"] for d in objs[str(dst)]] == pytest.approx(ref[top3], abs=1e-4)
    unreadable = [ln for ln in captured.err.splitlines() if "broken.jpg" in ln]
    assert len(unreadable) == 1 and "Traceback" not in captured.err
    # Annotated copies keep the folder layout and are valid pictures of the original size, enlarged by a whole
    # factor when the shorter side is under MIN_ANNOTATED_SIDE (so the labels stay readable).
    for src, dst in zip(pictures, layout):
        written = out_dir / dst.relative_to(folder)
        with Image.open(written) as im:
            im.verify()
        with Image.open(written) as im, Image.open(src) as original:
            factor = max(1, -(-MIN_ANNOTATED_SIDE // min(original.size)))
            assert im.size == (original.width * factor, original.height * factor)
    assert not (out_dir / "a" / "broken.jpg").exists()


def test_plain_output_and_annotated_file(setup, tmp_path, capsys):
    picture = setup["pictures"][1]
    out = tmp_path / "annotated.png"
    code = run_main(infer.main, ["--model_path", str(setup["path"]), "--pic_path", str(picture), "--input_size",
                                 str(SIZE), "--th", "0", "--top_k", "2", "--output", str(out)])
    assert code == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    best = setup["names"][int(np.argmax(setup["scores"][picture]))]
    assert line.startswith(f"{picture}: {best} (")
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im, Image.open(picture) as original:
        assert im.size == original.size
        # The text box is drawn at the top left; the rest of the picture is untouched.
        drawn = np.asarray(im.convert("RGB"), dtype=np.int16)
        source = np.asarray(original.convert("RGB"), dtype=np.int16)
        assert np.abs(drawn[:20, :40] - source[:20, :40]).max() > 30
        assert np.array_equal(drawn[-10:, -10:], source[-10:, -10:])


def test_nothing_readable_fails_with_one_line_naming_the_picture(setup, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\x89PNG broken")
    code = run_main(infer.main, ["--model_path", str(bad.parent.parent / "missing.pth"), "--pic_path", str(bad)],
                    prog="infer.py")
    assert code == 2  # the checkpoint is checked first: nothing is decoded for a run that cannot work
    capsys.readouterr()
    code = run_main(infer.main, ["--model_path", str(setup["path"]), "--pic_path", str(bad), "--input_size",
                                 str(SIZE)], prog="infer.py")
    err = capsys.readouterr().err
    assert code == 2  # nothing readable is bad input, not a bug
    assert "Traceback" not in err
    assert len([ln for ln in err.splitlines() if "bad.jpg" in ln]) == 1, err
    assert "could be read" in err.strip().splitlines()[-1]


def test_missing_path_is_one_line_error(setup, tmp_path, capsys):
    code = run_main(infer.main, ["--model_path", str(setup["path"]), "--pic_path", str(tmp_path / "nope.jpg")],
                    prog="infer.py")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "nope.jpg" in err


# ------------------------------------------------------------------------------------------- library parts

def test_default_thresholds_follow_the_original():
    assert default_threshold("MS-COCO") == 0.7
    assert default_threshold("OpenImages") == 0.995
    assert default_threshold("openimages") == 0.995
    assert default_threshold("NUS-WIDE") == 0.7 and default_threshold(None) == 0.7


def test_detections_threshold_is_strict_and_sorted():
    found = detections(torch.tensor([0.2, 0.9, 0.7, 0.95]), ["a", "b", "c", "d"], threshold=0.7)
    assert found == [{"class": "d", "score": pytest.approx(0.95)}, {"class": "b", "score": pytest.approx(0.9)}]
    assert [d["class"] for d in detections([0.2, 0.9, 0.7, 0.95], "abcd", 0.0, top_k=3)] == ["d", "b", "c"]


def test_bottleneck_head_and_class_count_detected_from_shapes(tmp_path):
    """An Open Images style file: bottleneck head, no model name, no idx_to_class, num_classes from the head."""
    torch.manual_seed(0)
    model = create_model("tresnet_m", 7, bottleneck_head=True)
    path = tmp_path / "oi_like.pth"
    torch.save({"model": model.state_dict()}, path)
    loaded = load_model(path)
    assert (loaded.model_name, loaded.bottleneck_head, loaded.num_classes) == ("tresnet_m", True, 7)
    assert loaded.class_names == [f"class_{i}" for i in range(7)]
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), model.eval()(x), atol=1e-4)
    with pytest.raises(CheckpointError, match="tresnet_xl"):
        resolve_architecture({"model": model.state_dict()}, "tresnet_xl")
    with pytest.raises(CheckpointError, match="num_classes"):
        resolve_architecture({"model": model.state_dict(), "num_classes": 8})
    for bad in ("eighty", [80], 7.5, 0, True):
        with pytest.raises(CheckpointError, match=r"the checkpoint's num_classes entry is .*, not a positive whole"):
            resolve_architecture({"model": model.state_dict(), "num_classes": bad})
    for fine in (7.0, np.int64(7), torch.tensor(7)):
        assert resolve_architecture({"model": model.state_dict(), "num_classes": fine})["num_classes"] == 7


def test_annotate_keeps_size_and_mode():
    picture = Image.new("L", (420, 400), color=200)
    out = annotate(picture, [{"class": "person", "score": 0.93}])
    assert out.size == (420, 400) and out.mode == "RGB"
    assert np.asarray(out)[:10, :30].min() < 150  # dark box and text drawn


def test_annotate_enlarges_thumbnails_by_a_whole_factor():
    out = annotate(Image.new("RGB", (120, 90), color=(200, 10, 10)), [{"class": "person", "score": 0.93}])
    assert MIN_ANNOTATED_SIDE == 320
    assert out.size == (480, 360)  # ceil(320 / 90) = 4, nearest neighbour keeps the pixels
    assert tuple(np.asarray(out)[-1, -1]) == (200, 10, 10)
    assert np.asarray(out)[:10, :30].min() < 150  # dark box and text drawn


def _two_classes_pass(setup, ref, order) -> dict:
    """Per-class thresholds under which exactly two classes pass on a picture with scores ``ref``: order[0] with a
    threshold just below its score, order[5] with one just below its own; the classes ranked 1..4 score above
    order[5] yet their threshold (1.0) keeps them out."""
    chosen = {name: 1.0 for name in setup["names"]}
    for k in (order[0], order[5]):
        chosen[setup["names"][k]] = float(ref[k]) - 1e-3
    return chosen


def test_per_class_thresholds_file(setup, tmp_path, capsys):
    """--thresholds FILE: each class at its own threshold. Chosen here so that exactly two classes pass on the
    picture: one threshold in the widest score gap below the best class, the rest above every score."""
    picture = setup["pictures"][1]
    ref = setup["scores"][picture]
    order = np.argsort(-ref)
    chosen = _two_classes_pass(setup, ref, order)
    th_file = tmp_path / "th.json"
    th_file.write_text(json.dumps(chosen))
    code = run_main(infer.main, [f"--model_path={setup['path']}", f"--pic_path={picture}", f"--input_size={SIZE}",
                                 f"--thresholds={th_file}", "--json", "--device=cpu"])
    assert code == 0
    [obj] = json_lines(capsys.readouterr().out)
    assert [d["class"] for d in obj["detections"]] == [setup["names"][order[0]], setup["names"][order[5]]]

    both = run_main(infer.main, [f"--model_path={setup['path']}", f"--pic_path={picture}", "--th=0.5",
                                 f"--thresholds={th_file}"])
    assert both == 2 and "not both" in capsys.readouterr().err
    th_file.write_text(json.dumps({"person": 0.5}))
    wrong = run_main(infer.main, [f"--model_path={setup['path']}", f"--pic_path={picture}", f"--input_size={SIZE}",
                                  f"--thresholds={th_file}"])
    assert wrong == 2 and "does not fit this model" in capsys.readouterr().err


@pytest.mark.faults
def test_unreadable_folders_are_named_not_skipped_silently(tmp_path, monkeypatch, caplog):
    from asl.errors import UsageError
    from asl.pictures import find_images

    import logging
    import os

    for sub in ("ok", "locked"):
        (tmp_path / "pics" / sub).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "pics" / sub / "a.jpg")
    real_scandir = os.scandir

    def scandir(path="."):  # as a folder without read permission behaves (root ignores chmod, so it is faked)
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level(logging.WARNING, logger="asl.pictures"):
        assert find_images([tmp_path / "pics"]) == [tmp_path / "pics" / "ok" / "a.jpg"]
    assert "skipped 1 unreadable folder(s)" in caplog.text and "locked (Permission denied)" in caplog.text
    with pytest.raises(UsageError, match=r"cannot read the folder .*locked: Permission denied"):
        find_images([tmp_path / "pics" / "locked"])


@pytest.mark.parametrize("ckpt, source, expected", [
    ({"image_size": 128}, "model-highest.pth", (128, "stored in the checkpoint")),
    ({}, "MS_COCO_TRresNet_L_448_86.6.pth", (448, "from the file name")),
    ({}, "https://host/x/MS_COCO_TResNet_xl_640_88.4.pth", (640, "from the file name")),
    ({}, "MS_COCO_TRresNet_M_224_81.8.pth", (224, "from the file name")),
    ({}, "my_model.pth", (448, "the default, as the checkpoint does not say")),
    ({"image_size": True}, "m_86.6.pth", (448, "the default: the checkpoint's image_size True is no size within "
                                                "1..4096")),
])
def test_the_input_size_comes_from_the_checkpoint(ckpt, source, expected):
    from asl.models.loading import stored_image_size

    assert stored_image_size(ckpt, source) == expected


def test_thresholds_a_model_folder_carries_are_used_and_th_overrides_them(setup, tmp_path, capsys):
    """A folder of export.py --format hf carries per-class thresholds (config.json, asl.thresholds): infer.py uses
    them and says so; --th replaces them; --top-k alone still lists the best classes whatever their scores."""
    from types import SimpleNamespace

    from asl.apps.export_hf import export_hf

    picture = setup["pictures"][1]
    ref = setup["scores"][picture]
    order = np.argsort(-ref)
    chosen = _two_classes_pass(setup, ref, order)
    folder = tmp_path / "exported"
    export_hf(load_model(setup["path"], prepare=False), folder, SIZE, thresholds=chosen)
    assert run_main(infer.main, [f"--model-path={folder}", f"--pic-path={picture}", "--json", "--device=cpu"]) == 0
    captured = capsys.readouterr()
    [obj] = json_lines(captured.out)
    assert [d["class"] for d in obj["detections"]] == [setup["names"][order[0]], setup["names"][order[5]]]
    assert "per-class thresholds stored with the model" in captured.err

    # The order of the rules, on the loaded model's fields alone (no second load needed).
    names = setup["names"]
    stored = SimpleNamespace(thresholds=chosen, checkpoint_info={}, class_names=names, source=str(folder))
    flags = {"thresholds": None, "th": None, "top_k": None, "dataset_type": "MS-COCO"}
    values, _ = infer._threshold(SimpleNamespace(**flags), stored)
    assert list(values) == [chosen[n] for n in names]
    assert infer._threshold(SimpleNamespace(**{**flags, "th": 0.4}), stored)[0] == 0.4
    assert infer._threshold(SimpleNamespace(**{**flags, "top_k": 3}), stored)[0] == float("-inf")
    single = SimpleNamespace(thresholds=None, checkpoint_info={"threshold": 0.25}, class_names=names, source="m")
    assert infer._threshold(SimpleNamespace(**flags), single)[0] == 0.25
    bare = SimpleNamespace(thresholds=None, checkpoint_info={}, class_names=names, source="m")
    assert infer._threshold(SimpleNamespace(**flags), bare)[0] == 0.7  # the original's MS-COCO default


def test_a_run_of_timms_tresnet_stays_timms_and_a_timm_config_still_names_ours():
    """train.py --model-name timm/tresnet_m saves timm's network (keys under ``net.``): it loads back as timm's, not
    as our TResNet. A timm config's ``timm/tresnet_m`` over weights in our layout is our tresnet_m."""
    with torch.device("meta"):  # shapes and names are all the decision reads
        timms = create_model("timm/tresnet_m", 3).state_dict()
        ours = create_model("tresnet_m", 3).state_dict()
    assert resolve_architecture({"model": timms, "model_name": "timm/tresnet_m", "num_classes": 3})["model_name"] \
        == "timm/tresnet_m"
    assert resolve_architecture({"model": ours, "model_name": "timm/tresnet_m"})["model_name"] == "tresnet_m"
    with pytest.raises(CheckpointError, match="model_name='timm/tresnet_l' but its weights are a tresnet_m"):
        resolve_architecture({"model": ours, "model_name": "timm/tresnet_l"})
