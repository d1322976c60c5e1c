"""Issue 29, the apps' part: what reaches a user from the model card, pictures, validate.py's console and infer.py's
thresholds. Small inputs throughout: model cards and thresholds as plain data, pictures of a few pixels."""
from __future__ import annotations

from asl.apps.export_hf import model_card
from asl.sources import config_from_checkpoint


def test_model_card_shows_hostile_class_names_as_text():
    names = ["<script>alert(1)</script>", "two\nlines", "```", "a|b", "plain"]
    config = config_from_checkpoint({"model_name": "tresnet_m<b>"}, names, 64)
    card = model_card(config, {"mAP": 50.0, "dataset": "coco</td>", "split": "val\n# heading", "num_images": 3,
                               "image_size": "<img src=x>"})
    lines = card.splitlines()
    assert "<script>" not in card and "<b>" not in card and "</td>" not in card and "<img" not in card
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in card
    # The card's own code block is the only one: the class name ``` is escaped, so no fence opens.
    assert [line for line in lines if line.startswith("```")] == ["```", "```"]
    assert "\\`\\`\\`" in card
    classes = [line for line in lines if line.startswith("- classes:")]
    # rendered, the backslash before n is literal: the page reads two\nlines on one line
    assert len(classes) == 1 and "two\\\\nlines" in classes[0] and "a\\|b" in classes[0]
    assert not any(line.startswith("# heading") for line in lines)
    assert lines[6] == "# tresnet\\_m&lt;b&gt;, multi-label, 5 classes"


def test_the_num_classes_advice_works_in_infer_and_export(tmp_path, write_image, capsys):
    """A bare state dict of a timm model does not say its class count; the message says to pass --num-classes,
    and infer.py and export.py take it."""
    import timm
    import torch

    from asl.apps import export, infer
    from asl.cli import run_main

    torch.manual_seed(0)
    bare = tmp_path / "bare.pth"
    torch.save({"model": timm.create_model("test_resnet", num_classes=3).state_dict()}, bare)
    picture = tmp_path / "a.png"
    write_image(picture, size=(24, 20))
    common = ["--model-path", str(bare), "--model-name", "timm/test_resnet", "--image-size", "32"]
    assert run_main(infer.main, [*common, "--pic-path", str(picture)]) == 2
    assert "--num-classes" in capsys.readouterr().err
    assert run_main(infer.main, [*common, "--pic-path", str(picture), "--num-classes", "3", "--top-k", "2"]) == 0
    assert capsys.readouterr().out.count("class_") == 2
    assert run_main(export.main, [*common, "--format", "hf", "--output", str(tmp_path / "hf"),
                                  "--num-classes", "3"]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def _eight_bit():
    import numpy as np

    return (np.arange(8 * 6, dtype=np.int64) * 37 % 256).reshape(6, 8).astype(np.uint8)


def test_wide_grey_pictures_decode_to_the_8_bit_picture_they_hold(tmp_path):
    """Datasets.md's rule for modes I;16, I and F: the range is the smallest usual one that holds the largest
    value, so an 8-bit picture stored wider decodes to its own values (the original's convert('RGB') made the
    16-bit one white and the [0, 1] float one black)."""
    import numpy as np
    from PIL import Image

    from asl.data.transforms import load_rgb

    grey = _eight_bit()
    stored = {
        "i.tif": ("I", Image.fromarray(grey).convert("I")),                      # PIL's convention: 0..255
        "i31.tif": ("I", Image.fromarray(grey.astype(np.int32) * 8421504)),     # the signed 32-bit range
        "f.tif": ("F", Image.fromarray(grey).convert("F")),                      # 0..255 floats
        "unit.tif": ("F", Image.fromarray(grey.astype(np.float32) / 255)),       # [0, 1] floats
        "deep.png": ("I;16", Image.fromarray(grey.astype(np.uint16) * 257)),     # the 16-bit range
        "low16.png": ("I;16", Image.fromarray(grey.astype(np.uint16))),          # 8-bit values in 16 bits
    }
    for name, (mode, picture) in stored.items():
        picture.save(tmp_path / name)
        with Image.open(tmp_path / name) as reread:
            assert reread.mode == mode, name
        decoded = np.asarray(load_rgb(tmp_path / name))
        assert decoded.shape == (6, 8, 3), name
        for c in range(3):
            np.testing.assert_array_equal(decoded[..., c], grey, err_msg=name)


def test_empty_and_text_files_named_like_pictures_are_named_as_such(tmp_path):
    import pytest

    from asl.data.transforms import UnreadableImageError, load_rgb

    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.jpg").write_text("not a picture\n")
    for name, words in (("empty.jpg", "the file is empty"), ("notes.jpg", "not a picture")):
        with pytest.raises(UnreadableImageError) as caught:
            load_rgb(tmp_path / name)
        assert str(tmp_path / name) in str(caught.value) and words in caught.value.reason
        assert "_io." not in str(caught.value)


def test_the_pixel_limit_is_said_and_can_be_raised(tmp_path, monkeypatch, write_image):
    import pytest
    from PIL import Image

    from asl.apps.infer import build_parser
    from asl.apps.options import check_pixel_limit
    from asl.data.transforms import MAX_PIXELS_ENV, UnreadableImageError, load_rgb
    from asl.errors import UsageError

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    monkeypatch.setenv(MAX_PIXELS_ENV, "")  # restored after the test, whatever --max-pixels sets
    picture = tmp_path / "big.png"
    write_image(picture, size=(40, 30))
    common = ["--model-path", "m.pth", "--pic-path", str(picture)]
    assert build_parser().parse_args([*common, "--max-pixels", "1000"]).max_pixels == 1000  # below its 1200 pixels
    with pytest.raises(UnreadableImageError) as caught:
        load_rgb(picture)
    assert "--max-pixels" in caught.value.reason and MAX_PIXELS_ENV in caught.value.reason
    build_parser().parse_args([*common, "--max-pixels", "0"])  # no limit
    assert load_rgb(picture).size == (40, 30)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(UsageError, match=MAX_PIXELS_ENV):
        check_pixel_limit()


def test_the_demo_timing_written_down_is_for_the_demo_that_runs():
    """BENCHMARKS.md's make demo row and docs/speed.md describe the schedule tools/demo.py runs by default (3
    epochs of 32 steps of 16 images at 64 px: the length its timing and its margin over chance were measured at)."""
    import importlib.util
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("demo", repo / "tools" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    args = demo.build_parser().parse_args([])
    row = next(line for line in (repo / "BENCHMARKS.md").read_text().splitlines() if line.startswith("| `make demo`"))
    assert f"{args.image_size} px, {args.epochs} epochs of 32 steps of 16 images" in row
    assert re.search(r"\b\d+ (min \d+ )?s alone", row)  # a time measured with nothing else running
    assert f"the demo job ({args.epochs} epochs)" in (repo / "docs" / "speed.md").read_text()
