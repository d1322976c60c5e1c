"""PackedConv2d (weights reordered once for oneDNN) against float64 ``F.conv2d`` on the same weights, and the cases
where it must be exactly ``F.conv2d``."""
import copy
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from asl.models import create_model, prepare_for_inference
from asl.models.packed import PackedConv2d, packing_available, packing_eligible

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch has no oneDNN")


def _relative_error(got, expected) -> float:
    return ((got.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def _reference(layer: PackedConv2d, x: torch.Tensor) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.double()
    return F.conv2d(x.double(), layer.weight.double(), bias, layer.stride, layer.padding, layer.dilation)


@pytest.mark.parametrize("kwargs", [
    dict(in_channels=64, out_channels=32, kernel_size=1),
    dict(in_channels=16, out_channels=24, kernel_size=3, padding=1, bias=False),
    dict(in_channels=8, out_channels=16, kernel_size=3, stride=2, padding=(2, 1), dilation=2),
    dict(in_channels=12, out_channels=8, kernel_size=(1, 3), padding=(0, 1)),
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_same_function_as_the_convolution(kwargs, channels_last):
    torch.manual_seed(0)
    layer = PackedConv2d(nn.Conv2d(**kwargs))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with torch.no_grad():
        for shape in ((3, kwargs["in_channels"], 11, 9), (1, kwargs["in_channels"], 5, 7)):  # packed for the first
            x = torch.randn(*shape).contiguous(memory_format=fmt)
            assert _relative_error(layer(x), _reference(layer, x)) < 1e-5


def test_follows_weight_changes_copies_and_pickles():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 16, 1)
    layer = PackedConv2d(conv)
    x = torch.randn(2, 32, 6, 6)
    with torch.no_grad():
        layer(x)
        layer.load_state_dict({"weight": torch.randn(16, 32, 1, 1), "bias": torch.randn(16)})
        assert _relative_error(layer(x), _reference(layer, x)) < 1e-5
        for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            assert _relative_error(other(x), _reference(layer, x)) < 1e-5
    assert set(layer.state_dict()) == {"weight", "bias"}


def test_gradients_other_dtypes_and_unbatched_inputs_take_the_plain_convolution():
    torch.manual_seed(0)
    layer = PackedConv2d(nn.Conv2d(4, 6, 3, padding=1))
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    layer(x).square().sum().backward()
    ref_x = x.detach().clone().requires_grad_(True)
    F.conv2d(ref_x, layer.weight, layer.bias, padding=1).square().sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    with torch.no_grad():
        double = copy.deepcopy(layer).double()
        assert torch.equal(double(x.detach().double()),
                           F.conv2d(x.detach().double(), double.weight, double.bias, padding=1))
        unbatched = x.detach()[0]
        assert torch.equal(layer(unbatched), F.conv2d(unbatched, layer.weight, layer.bias, padding=1))


def test_eligibility_and_use_in_prepared_tresnet():
    assert packing_eligible(nn.Conv2d(3, 8, 1))
    assert not packing_eligible(nn.Conv2d(8, 8, 3, groups=8))
    assert not packing_eligible(nn.Conv2d(8, 8, 3, padding="same"))
    assert not packing_eligible(nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"))
    torch.manual_seed(0)
    model = create_model("tresnet_m", 5).eval()
    fast = prepare_for_inference(model)
    plain = prepare_for_inference(model, packed=False)
    # Every ungrouped convolution Winograd does not take: the 1x1 ones (main path, downsample, SE).
    assert sum(isinstance(m, PackedConv2d) for m in fast.modules()) > 0
    assert not any(isinstance(m, PackedConv2d) for m in plain.modules())
    assert all(m.kernel_size == (1, 1) for m in fast.modules() if isinstance(m, PackedConv2d))
    assert fast.state_dict().keys() == plain.state_dict().keys()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert _relative_error(fast(x), model.double()(x.double())) < 1e-4
