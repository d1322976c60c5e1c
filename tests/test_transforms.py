"""The original's augmentations: CutoutPIL geometry, the randaugment==1.0.2 policy (op set, magnitudes,
probabilities, each op against the PIL call the package makes), eval exactness vs torchvision, mode conversion."""

import collections
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from torchvision import transforms as T

from asl.data import create_dataset, to_float
from asl.data.transforms import (RANDAUGMENT_MAGNITUDES, RANDAUGMENT_OPS, CutoutPIL, RandAugment, TrainTransform,
                                 item_rng, load_rgb)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY_COCO = SHARED / "tiny_coco"
needs_coco = pytest.mark.skipif(not (TINY_COCO / "annotations").is_dir(), reason="shared/data/tiny_coco absent")


def noise_image(size=(64, 64), seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


class FixedSign(random.Random):
    """A generator whose choice() always picks `sign` (to know which branch of a signed op ran)."""

    def __init__(self, sign, seed=0):
        super().__init__(seed)
        self.sign = sign

    def choice(self, seq):
        assert list(seq) == [-1, 1]
        return self.sign


# ---------------------------------------------------------------- policy facts
def test_policy_op_set_and_magnitudes():
    assert sorted(RANDAUGMENT_OPS) == sorted([
        "Invert", "Cutout", "Sharpness", "AutoContrast", "Posterize", "ShearX", "TranslateX", "TranslateY",
        "ShearY", "Rotate", "Equalize", "Contrast", "Color", "Solarize", "Brightness"])
    m = RANDAUGMENT_MAGNITUDES
    ten = np.arange(10) / 9
    for name, top in [("ShearX", 0.3), ("ShearY", 0.3), ("TranslateX", 150 / 331), ("TranslateY", 150 / 331),
                      ("Rotate", 30), ("Color", 0.9), ("Contrast", 0.9), ("Sharpness", 0.9),
                      ("Brightness", 0.9)]:
        np.testing.assert_allclose(m[name], top * ten, rtol=1e-12, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(m["Solarize"], 256 - 256 * ten)
    assert list(m["Posterize"]) == [8, 8, 7, 7, 6, 6, 5, 5, 4, 4]
    assert list(m["Cutout"]) == [0, 2, 4, 7, 9, 11, 13, 16, 18, 20]


def test_policy_sampling_and_probabilities():
    ra = RandAugment()
    fired = collections.Counter()
    calls_per_image = collections.Counter()
    ra.op_funcs = {name: (lambda name: lambda img, mag, rng: (fired.update([(name, float(mag))]), img)[1])(name)
                   for name in RANDAUGMENT_OPS}
    picks = collections.Counter()
    n = 12000
    img = noise_image((8, 8))
    for k in range(n):
        rng = random.Random(k)
        for name, index in ra.sample(random.Random(k)):
            picks[(name, index)] += 1
        before = sum(fired.values())
        ra(img, rng)
        calls_per_image[sum(fired.values()) - before] += 1
    # two draws per call, uniform over 15 ops x magnitude indices 1..9 (index 0 never used)
    assert {i for _, i in picks} == set(range(1, 10))
    per_op = collections.Counter()
    for (name, _), c in picks.items():
        per_op[name] += c
    assert set(per_op) == set(RANDAUGMENT_OPS)
    for c in per_op.values():
        assert abs(c / (2 * n) - 1 / 15) < 0.012
    # each of the two applied with p = 0.5: 0, 1, 2 ops with probabilities 1/4, 1/2, 1/4
    assert abs(calls_per_image[0] / n - 0.25) < 0.02
    assert abs(calls_per_image[1] / n - 0.50) < 0.02
    assert abs(calls_per_image[2] / n - 0.25) < 0.02
    # magnitudes handed to the ops are the table's values
    for (name, mag) in fired:
        assert any(np.isclose(mag, v) for v in RANDAUGMENT_MAGNITUDES[name][1:]), (name, mag)


FILL = (128, 128, 128)


def reference(name, img, mag, sign):
    """What randaugment==1.0.2 does for one op (PIL calls written out from the package's facts)."""
    if name == "ShearX":
        return img.transform(img.size, Image.AFFINE, (1, mag * sign, 0, 0, 1, 0), Image.BICUBIC, fillcolor=FILL)
    if name == "ShearY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, mag * sign, 1, 0), Image.BICUBIC, fillcolor=FILL)
    if name == "TranslateX":
        return img.transform(img.size, Image.AFFINE, (1, 0, mag * img.size[0] * sign, 0, 1, 0), fillcolor=FILL)
    if name == "TranslateY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, mag * img.size[1] * sign), fillcolor=FILL)
    if name == "Rotate":  # RGBA rotation composited on grey, no sign
        rot = img.convert("RGBA").rotate(mag)
        return Image.composite(rot, Image.new("RGBA", rot.size, (128,) * 4), rot).convert(img.mode)
    enhancers = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
                 "Sharpness": ImageEnhance.Sharpness, "Brightness": ImageEnhance.Brightness}
    if name in enhancers:
        return enhancers[name](img).enhance(1 + mag * sign)
    if name == "Posterize":
        return ImageOps.posterize(img, int(mag))
    if name == "Solarize":
        return ImageOps.solarize(img, mag)
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    raise KeyError(name)


@pytest.mark.parametrize("name", [n for n in RANDAUGMENT_OPS if n != "Cutout"])
def test_each_op_matches_the_package_call(name):
    ra = RandAugment()
    img = noise_image((48, 40), seed=1)
    for index in (1, 5, 9):
        mag = RANDAUGMENT_MAGNITUDES[name][index]
        for sign in (-1, 1):
            got = np.asarray(ra.op_funcs[name](img, mag, FixedSign(sign)))
            want = np.asarray(reference(name, img, mag, sign))
            assert got.shape == want.shape
            np.testing.assert_array_equal(got, want, err_msg=f"{name} {index} {sign}")


def test_randaugment_cutout_op():
    ra = RandAugment()
    img = noise_image((50, 50), seed=2)
    for seed in range(20):
        size = int(RANDAUGMENT_MAGNITUDES["Cutout"][1 + seed % 9])
        rng = random.Random(seed)
        probe = random.Random(seed)
        cx, cy = probe.randrange(50), probe.randrange(50)
        out = np.asarray(ra.op_funcs["Cutout"](img, size, rng)).copy()
        expected = np.asarray(img).copy()
        half = size // 2  # half-open box of +-size//2 around the centre, clipped
        expected[max(0, cy - half):min(50, cy + half), max(0, cx - half):min(50, cx + half)] = (125, 122, 113)
        np.testing.assert_array_equal(out, expected)


# ---------------------------------------------------------------- CutoutPIL
def test_cutout_pil_geometry_and_drawing():
    cut = CutoutPIL(0.5)
    for seed in range(30):
        size = (224, 224) if seed % 2 else (61, 61)
        img = noise_image(size, seed)
        (x1, y1, x2, y2), fill = cut.box(*size, random.Random(seed))
        probe = random.Random(seed)
        cy, cx = probe.randrange(size[0]), probe.randrange(size[1])
        half = int(0.5 * size[0] + 0.5) // 2  # original: int(f * side + 0.5), then +-half, clipped to the image
        assert (y1, y2) == (min(max(cy - half, 0), size[0]), min(max(cy + half, 0), size[0]))
        assert (x1, x2) == (min(max(cx - half, 0), size[1]), min(max(cx + half, 0), size[1]))
        assert fill == (probe.randint(0, 255), probe.randint(0, 255), probe.randint(0, 255))
        drawn = img.copy()
        ImageDraw.Draw(drawn).rectangle([x1, y1, x2, y2], fill=fill)
        ours = cut(img, random.Random(seed))
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(drawn))
        arr = np.array(img)
        cut.apply_array(arr, random.Random(seed))
        np.testing.assert_array_equal(arr, np.asarray(drawn))
    # an interior box of a 224 picture is 113 x 113 pixels (both ends included, as ImageDraw draws)
    arr = np.zeros((224, 224, 3), np.uint8)
    interior = 0
    for seed in range(100):
        (x1, y1, x2, y2), fill = cut.box(224, 224, random.Random(seed))
        if 0 < x1 and x2 < 223 and 0 < y1 and y2 < 223 and any(fill):
            out = np.asarray(cut(Image.fromarray(arr), random.Random(seed)))
            assert out.any(axis=2).sum() == 113 * 113
            interior += 1
    assert interior > 5


def test_train_transform_output_and_determinism():
    arr = np.asarray(noise_image((32, 32), 3)).copy()
    tf = TrainTransform()
    a = tf(arr.copy(), item_rng(0, 2, 9))
    b = tf(arr.copy(), item_rng(0, 2, 9))
    assert a.dtype == torch.uint8 and a.shape == (3, 32, 32)
    assert torch.equal(a, b)
    assert item_rng(0, 2, 9).random() != item_rng(0, 2, 10).random() != item_rng(0, 3, 9).random()


# ---------------------------------------------------------------- eval exactness and modes
def test_to_float_is_to_tensor():
    img = noise_image((37, 29), 4)
    uint8 = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    assert torch.equal(to_float(uint8), T.ToTensor()(img))


@needs_coco
@pytest.mark.parametrize("size", [224, 97])
def test_eval_items_equal_torchvision(size):
    ds = create_dataset("coco", TINY_COCO, "val2017", size, train=False)
    reference_tf = T.Compose([T.Resize((size, size)), T.ToTensor()])
    for i in (0, 7, 21):
        image, _ = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, size, size)
        want = reference_tf(Image.open(ds.image_path(i)).convert("RGB"))
        assert torch.equal(to_float(image), want)


def write_modes(folder):
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (30, 44, 3), dtype=np.uint8)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (30, 44, 1), dtype=np.uint8)], axis=2)
    pal = Image.fromarray(rgb).quantize(16)
    pal.info["transparency"] = 3
    pictures = {
        "gray.png": ("L", Image.fromarray(rgb).convert("L"), {}),
        "gray_alpha.png": ("LA", Image.fromarray(rgb).convert("LA"), {}),
        "rgba.png": ("RGBA", Image.fromarray(rgba, "RGBA"), {}),
        "palette.png": ("P", Image.fromarray(rgb).quantize(16), {}),
        "palette_t.png": ("P", pal, {"transparency": 3}),
        "cmyk.jpg": ("CMYK", Image.fromarray(rgb).convert("CMYK"), {}),
        "bits.png": ("1", Image.fromarray(rgb).convert("1"), {}),
    }
    files = {}
    for name, (mode, picture, options) in pictures.items():
        picture.save(folder / name, **options)
        files[name] = mode
    return rgb, files


def test_any_mode_becomes_rgb(tmp_path):
    rgb, files = write_modes(tmp_path)
    for name, mode in files.items():
        assert Image.open(tmp_path / name).mode == mode
        img = load_rgb(tmp_path / name)
        assert img.mode == "RGB" and img.size == (44, 30)
        want = Image.open(tmp_path / name).convert("RGB")  # the original's .convert('RGB')
        np.testing.assert_array_equal(np.asarray(img), np.asarray(want), err_msg=name)
    (tmp_path / "labels.csv").write_text("image,labels\n" + "".join(f"{n},x\n" for n in files))
    ds = create_dataset("csv", tmp_path, None, 16, train=False)
    for i in range(len(ds)):
        image, _ = ds[i]
        want = T.Compose([T.Resize((16, 16)), T.PILToTensor()])(Image.open(ds.image_path(i)).convert("RGB"))
        assert torch.equal(image, want), ds.image_path(i)


def test_sixteen_bit_keeps_the_top_byte(tmp_path):
    values = np.array([[0, 255, 256, 4095, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    img = np.asarray(load_rgb(tmp_path / "deep.png"))
    want = (values.astype(np.int64) >> 8).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(img[..., c], want)
