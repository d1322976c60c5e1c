"""Every model family a user trains, end to end once, and the rest loaded and run.

End to end (train.py, then validate.py on the saved model-highest.pth gives the mAP train.py printed, infer.py on
a picture, export.py to ONNX that onnxruntime agrees with): TResNet, ML-Decoder, a timm backbone, and
``train.py --compile``. The other families (TResNet-L, XL, L v2, the Open Images bottleneck head) share that code
path and differ only in the network, so they are checked where they differ: a checkpoint of each loads back
through ``load_model`` and gives the network's own outputs. Tiny generated data, 32 px, one epoch of two steps."""
from __future__ import annotations

import contextlib
import functools
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
    "timm_backbone": ["--model-name", "timm/resnet10t"],
    "ml_decoder": ["--model-name", "tresnet_m", "--head", "ml-decoder"],
    "compiled": ["--model-name", "timm/test_resnet", "--compile"],
}


def _run(main, argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run_main(main, argv)
    return code, out.getvalue()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_train_validate_infer_export(family, tmp_path, make_synthetic, capsys, monkeypatch):
    from asl.apps import export, infer, train, validate

    if family == "compiled":
        # AOTAutograd traces the whole training step as inductor would (functionalised forward and backward);
        # inductor's code generation on our layers is checked in tests/test_compile.py, where it is exact.
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
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

    if family == "compiled":
        return  # the saved weights are the plain model's: export is the tresnet_m family's path
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


@pytest.mark.parametrize("name, bottleneck", [("tresnet_l", False), ("tresnet_xl", False), ("tresnet_v2_l", False),
                                              ("tresnet_m", True)])
def test_other_families_load_back_and_run(name, bottleneck, tmp_path):
    """A checkpoint of each family, in the file format train.py writes, loads through ``load_model`` with no name
    given (the shapes tell the architecture) and gives the network's logits, folded for inference or not."""
    from asl.checkpoint import make_model_checkpoint, save_checkpoint
    from asl.models import create_model
    from asl.models.loading import load_model

    torch.manual_seed(0)
    model = create_model(name, 3, bottleneck_head=bottleneck).eval()
    with torch.no_grad():  # non-trivial statistics, so that folding the norms is put to the test
        for module in model.modules():
            if hasattr(module, "running_var") and module.running_var is not None:
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "m.pth"
    save_checkpoint(make_model_checkpoint(model.state_dict(), 3, {0: "a", 1: "b", 2: "c"}, image_size=SIZE), path)
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
        for prepare in (False, True):
            loaded = load_model(path, prepare=prepare)
            assert (loaded.model_name, loaded.bottleneck_head, loaded.class_names) == (name, bottleneck,
                                                                                      ["a", "b", "c"])
            got = loaded.model(x)
            assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item() + 1e-6
