"""export.py: an official-layout checkpoint (from timm's TResNet-M) to ONNX; onnxruntime must agree with PyTorch."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from asl.cli import run_main  # noqa: E402
from asl.models import convert_timm_tresnet  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

from asl.apps import export  # noqa: E402

SIZE = 64


def test_onnx_export_dynamic_batch_matches_pytorch(tmp_path, capsys):
    torch.manual_seed(0)
    model = timm.create_model("tresnet_m", num_classes=80).eval()
    with torch.no_grad():
        for m in model.modules():  # scales >= 1e-5: the official |w| + 1e-5 form then holds them exactly
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.0)
                m.bias.uniform_(-0.2, 0.2)
        model.head.fc.weight.normal_(0.0, 0.1)
    names = {i: f"label {i}" for i in range(80)}
    ckpt = tmp_path / "model.pth"
    torch.save({"model": convert_timm_tresnet(model.state_dict()), "num_classes": 80, "idx_to_class": names}, ckpt)
    out = tmp_path / "out" / "model.onnx"

    code = run_main(export.main, ["--model_path", str(ckpt), "--format", "onnx", "--output", str(out),
                                  "--image-size", str(SIZE)])
    assert code == 0, capsys.readouterr().err
    assert out.is_file()

    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["class_names"]) == [names[i] for i in range(80)]

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    [inp] = session.get_inputs()
    assert inp.shape[0] == "batch" and inp.shape[1:] == [3, SIZE, SIZE]
    for batch in (1, 3):  # a batch size other than the one traced with (2): the axis really is dynamic
        x = torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
        got = session.run(None, {inp.name: x.numpy()})[0]
        with torch.no_grad():
            want = model(x).numpy()  # timm's own forward: an independent reference
        assert got.shape == (batch, 80)
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= 1e-4 * scale + 1e-6


def test_unknown_format_and_missing_file_are_usage_errors(tmp_path, capsys):
    assert run_main(export.main, ["--model-path", str(tmp_path / "x.pth"), "--format", "tflite"]) == 2
    assert run_main(export.main, ["--model-path", str(tmp_path / "x.pth")], prog="export.py") == 2
    err = capsys.readouterr().err
    assert "x.pth" in err.strip().splitlines()[-1] and "Traceback" not in err
