"""CUDA-only checks of the training step (fp16 with GradScaler, bf16) and of evaluation; skipped without CUDA."""
import pytest
import torch

from asl.training.ema import ModelEma
from asl.evaluation.predictions import evaluate
from asl.training.step import StepConfig, create_optimizer, train_one_epoch
from asl.losses import AsymmetricLoss
from asl.models import create_model, prepare_for_inference
from asl.training.state import TrainState

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _batches(n=3, size=64, classes=5):
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=g),
             (torch.rand(4, classes, generator=g) < 0.3).float()) for _ in range(n)]


@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16])
def test_amp_training_step_on_cuda(amp_dtype):
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = create_model("tresnet_m", 5).to(device)
    before = model.head.fc.weight.detach().clone()
    optimizer = create_optimizer(model, lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    state = TrainState(model, ModelEma(model, 0.9), optimizer, None, scaler)
    stats = train_one_epoch(state, _batches(), AsymmetricLoss(4, 0, 0.05), StepConfig(device, amp_dtype))
    assert stats["steps"] == 3 and stats["images"] == 12
    assert torch.isfinite(torch.tensor(stats["loss"]))
    assert not torch.equal(model.head.fc.weight.detach(), before)


def test_cuda_evaluation_matches_cpu():
    torch.manual_seed(0)
    model = create_model("tresnet_m", 5).eval()
    batches = [(images, targets, torch.arange(i * 4, i * 4 + 4)) for i, (images, targets) in enumerate(_batches())]
    cpu = evaluate(prepare_for_inference(model), batches, torch.device("cpu"))
    gpu = evaluate(prepare_for_inference(model.to("cuda")), batches, torch.device("cuda"))
    torch.testing.assert_close(torch.as_tensor(gpu["scores"]), torch.as_tensor(cpu["scores"]), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16])
def test_the_memory_saving_norm_on_the_gpu_is_as_accurate_as_plain_autograd(dtype, positive_vectors):
    """The criterion of tests/test_amp.py, on CUDA (cuDNN's batch norm, fp32 and both autocast dtypes)."""
    import statistics

    from test_amp import autocast_errors

    errors = autocast_errors(torch.device("cuda"), dtype, positive_vectors)
    if dtype is None:
        assert max(errors[True]) < 1e-4
    else:
        assert statistics.median(errors[True]) <= 1.1 * statistics.median(errors[False])
        assert max(errors[True]) <= 1.1 * max(errors[False])
