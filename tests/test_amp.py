"""The AMP training path on the CPU: CI runs the paper's autocast recipe (bf16 and fp16 with GradScaler) and checks
that the memory-saving norm is as accurate under autocast as plain autograd."""
import copy
import statistics

import pytest
import torch

from asl.losses import AsymmetricLoss
from asl.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _gradients(model: torch.nn.Module, memory_efficient: bool, dtype, x, y) -> dict:
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "memory_efficient"):
            module.memory_efficient = memory_efficient
    with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits = model(x)
    AsymmetricLoss(4, 0, 0.05)(logits.float(), y).backward()
    return {name: p.grad.double() for name, p in model.named_parameters()}


def autocast_errors(device: torch.device, dtype, positive_vectors) -> dict[bool, list[float]]:
    """Error of each parameter's gradient under ``dtype`` autocast (None: fp32) against the fp32 gradient of plain
    autograd (largest difference over largest value), for plain autograd (False) and the memory-saving norm (True);
    TResNet-M at 32 px, batch 2."""
    torch.manual_seed(0)
    model = positive_vectors(create_model("tresnet_m", 5).to(device).train())
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 32, 32, generator=g).to(device), (torch.rand(2, 5, generator=g) > 0.5).float().to(device)
    reference = _gradients(model, False, None, x, y)
    errors = {}
    for memory_efficient in (False, True):
        got = _gradients(model, memory_efficient, dtype, x, y)
        errors[memory_efficient] = [((got[n] - ref).abs().max() / ref.abs().max()).item()
                                    for n, ref in reference.items()]
    return errors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_autocast_the_memory_saving_norm_is_as_accurate_as_plain_autograd(dtype, positive_vectors):
    """The memory-saving norm's median and worst tensor error are within 10% of plain autograd's."""
    errors = autocast_errors(torch.device("cpu"), dtype, positive_vectors)
    plain, ours = errors[False], errors[True]
    assert statistics.median(ours) <= 1.1 * statistics.median(plain)
    assert max(ours) <= 1.1 * max(plain)
    assert statistics.median(plain) > 0  # autocast really ran in reduced precision


@pytest.mark.slow
def test_train_py_runs_the_autocast_recipe_on_the_cpu(tmp_path, make_synthetic, capsys):
    """--amp-dtype bfloat16 / float16 train on the CPU, save finite weights that differ from the fp32 run's, and
    record the dtype they used. timm's smallest network: the recipe's code path is the same for every model, and
    the TResNet layers under autocast are the test above."""
    from asl.apps import train
    from asl.cli import run_main

    data = make_synthetic(8, 8, 32)
    weights = {}
    for dtype in ("none", "bfloat16", "float16"):
        out = tmp_path / dtype
        code = run_main(train.main, [str(data), "--dataset", "synthetic", "--model-name", "timm/test_resnet",
                                     "--image-size", "32", "-b", "4", "-j", "0",
                                     "--epochs", "1", "--stop-epoch", "0", "--device", "cpu", "--amp-dtype", dtype,
                                     "--output-dir", str(out)])
        assert code == 0, capsys.readouterr().err[-2000:]
        last = torch.load(out / "last.pth", weights_only=True)
        assert last["args"]["amp_dtype"] == dtype
        weights[dtype] = last["model"]
        assert all(torch.isfinite(v).all() for v in weights[dtype].values() if v.is_floating_point())
    for dtype in ("bfloat16", "float16"):
        assert any(not torch.equal(weights[dtype][k], weights["none"][k]) for k in weights["none"])
