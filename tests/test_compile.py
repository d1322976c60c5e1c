"""torch.compile: TResNet traces to one graph with no break, in training (forward + ASL loss) and in eval, and a
compiled training step gives eager's gradients and running statistics: inductor (through AOTAutograd, which
traces the memory-saving norm's and the blur's autograd Functions) on the stem and a downsampling block, in
float64. Together: the whole network is one graph of these layers, and each of them compiles exactly.
``train.py --compile`` itself runs in tests/test_round_trip.py.

The graph test runs TResNet-M: it holds every layer class and code path of the family (the stem, basic and
bottleneck blocks, anti-aliased stride-2 blocks, SE in both block kinds), and L, XL and L v2 are the same classes
at other depths and widths, which change nothing that dynamo traces."""
import pytest
import torch
import torch.nn as nn

from asl.losses import AsymmetricLoss
from asl.models import create_model
from asl.models.layers import ABN

dynamo = pytest.importorskip("torch._dynamo")

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _batch(num_classes: int):
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 32, 32, generator=g), (torch.rand(2, num_classes, generator=g) > 0.5).float()


def test_one_graph_in_training_and_in_eval():
    torch.manual_seed(0)
    model = create_model("tresnet_m", 5).train()
    criterion = AsymmetricLoss(4, 0, 0.05, disable_torch_grad_focal_loss=True)
    x, y = _batch(5)
    dynamo.reset()
    train = dynamo.explain(lambda a, b: criterion(model(a).float(), b))(x, y)
    assert (train.graph_count, train.graph_break_count) == (1, 0), [r.reason for r in train.break_reasons]
    model.eval()
    dynamo.reset()
    with torch.no_grad():
        evaluation = dynamo.explain(model)(x)
    assert (evaluation.graph_count, evaluation.graph_break_count) == (1, 0)


def _eager_then_compiled(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **compile_options):
    """((gradients, buffers) of one eager training step, the same of one compiled step from the same state): ASL
    on the model's output in ``y``'s dtype."""
    criterion = AsymmetricLoss(4, 0, 0.05, disable_torch_grad_focal_loss=True)

    def step(forward):
        model.zero_grad(set_to_none=True)
        criterion(forward(x).to(y.dtype), y).backward()
        return ({n: p.grad.clone() for n, p in model.named_parameters()},
                {k: b.clone() for k, b in model.named_buffers()})

    start = {k: v.clone() for k, v in model.state_dict().items()}
    eager = step(model)
    model.load_state_dict(start)  # the same running statistics before the compiled step
    dynamo.reset()
    return eager, step(torch.compile(model, fullgraph=True, **compile_options))


def test_inductor_runs_the_custom_layers_to_float64_rounding(positive_vectors):
    """Inductor, the backend of ``train.py --compile``, on the stem and a downsampling block: the memory-saving
    norm with both activations, the blur, SE. Float64, because in fp32 a deep net's gradients move by far more than
    1e-3 under any reordering of its sums (TResNet-M's own fp32 gradients are up to 10% off its float64 ones at
    some inputs, with plain autograd as with the memory-saving norm), which would hide a wrong lowering."""
    torch.manual_seed(0)
    body = create_model("tresnet_m", 5).body
    net = nn.Sequential(body.SpaceToDepth, body.conv1, body.layer2[0], nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(128, 5))
    net = positive_vectors(net.train().double().to(memory_format=torch.channels_last))
    with torch.no_grad():
        for module in net.modules():  # InPlaceABN's sign rule: a weight of exactly 0, and a negative one
            if isinstance(module, ABN):
                module.weight[:2] = torch.tensor([0.0, -0.7])
    x, y = _batch(5)
    (eager_grads, eager_stats), (compiled_grads, compiled_stats) = _eager_then_compiled(
        net, x.double().contiguous(memory_format=torch.channels_last), y.double())
    for name, grad in eager_grads.items():
        assert (compiled_grads[name] - grad).abs().max().item() <= 1e-10 * grad.abs().max().item(), name
    for name, stat in eager_stats.items():  # the running statistics are updated as in eager
        assert (compiled_stats[name] - stat).abs().max().item() <= 1e-10 * stat.abs().max().item(), name
