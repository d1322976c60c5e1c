"""Every model family through every script a user runs on it: train.py, then validate.py on the saved
model-highest.pth (the mAP train.py printed), infer.py on a picture, export.py to ONNX (onnxruntime agrees with
PyTorch). Tiny generated data, tiny pictures, one epoch of a few steps. ``compiled`` trains under torch.compile."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from asl.cli import run_main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SIZE = 32
FAMILIES = {
    "tresnet_m": ["--model-name", "tresnet_m"],
    "tresnet_l": ["--model-name", "tresnet_l"],
    "tresnet_xl": ["--model-name", "tresnet_xl"],
    "bottleneck_head": ["--model-name", "tresnet_m", "--bottleneck-head"],
    "timm_backbone": ["--model-name", "timm/resnet10t"],
    "ml_decoder": ["--model-name", "tresnet_m", "--head", "ml-decoder"],
    "tresnet_v2_l": ["--model-name", "tresnet_v2_l"],
    # train.py --compile with inductor, the default backend: timm's smallest model, because compiling a TResNet
    # takes over a minute on 2 cores (its layers under inductor: tests/test_compile.py).
    "compiled": ["--model-name", "timm/test_resnet", "--compile"],
}


def _run(main, argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run_main(main, argv)
    return code, out.getvalue()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_train_validate_infer_export(family, tmp_path, make_synthetic, capsys):
    from asl.apps import export, infer, train, validate

    torch._dynamo.reset()
    data = make_synthetic(8, 8, SIZE)
    run = tmp_path / "run"
    code, text = _run(train.main, [str(data), "--dataset", "synthetic", *FAMILIES[family], "--image-size", str(SIZE),
                                   "-b", "4", "-j", "0", "--epochs", "1", "--stop-epoch", "0", "--device", "cpu",
                                   "--output-dir", str(run)])
    assert code == 0, capsys.readouterr().err[-2000:]
    trained = float(text.rsplit("highest_mAP = ", 1)[1].split()[0].rstrip(","))
    checkpoint = run / "model-highest.pth"

    # The name is not passed: validate.py, infer.py and export.py read the architecture from the checkpoint.
    code, text = _run(validate.main, [str(data), "--dataset", "synthetic", "--model-path", str(checkpoint),
                                      "-b", "4", "-j", "0", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert float(text.strip().splitlines()[-1].split(":")[1]) == pytest.approx(trained, abs=0.05)

    picture = sorted(p for p in data.rglob("*") if p.suffix.lower() in (".jpg", ".png"))[0]
    code, text = _run(infer.main, ["--model-path", str(checkpoint), "--pic-path", str(picture), "--json",
                                   "--th", "0", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err[-2000:]
    found = json.loads(text.strip().splitlines()[-1])
    assert found["image"].endswith(picture.name) and len(found["detections"]) > 0

    onnx_path = tmp_path / "model.onnx"
    assert run_main(export.main, ["--model-path", str(checkpoint), "--output", str(onnx_path),
                                  "--image-size", str(SIZE)]) == 0, capsys.readouterr().err[-2000:]
    ort = pytest.importorskip("onnxruntime")
    from asl.models.loading import load_model

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = load_model(checkpoint, prepare=False).model(x).numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max() + 1e-6
