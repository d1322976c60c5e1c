"""Winograd F(4x4, 3x3) and F(5x5, 3x3) against the definition of convolution: the 1-D identity written out by hand,
and the 2-D layer against float64 direct convolution; plus the cases where it must step aside bit-exactly.

Tolerances: F(4x4, 3x3) in fp32 measured at most 3.6e-6 of the largest output on 120 random small layers, and
about 9e-6 on 128- to 512-channel layers, F(5x5, 3x3) about 1e-5; a wrong transform is off by tenths."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from asl.apps.infer import build_parser as infer_parser
from asl.apps.validate import build_parser as validate_parser
from asl.models import create_model, prepare_for_inference
from asl.models.winograd import CHUNK_TILES, WinogradConv2d, tile_for, winograd_eligible, winograd_matrices


@pytest.mark.parametrize("tile", [4, 5])
def test_one_dimensional_identity_is_valid_correlation(tile):
    bt, g_mat, at = winograd_matrices(tile, torch.float64)
    assert bt.shape == (tile + 2, tile + 2) and g_mat.shape == (tile + 2, 3) and at.shape == (tile, tile + 2)
    assert torch.equal(bt, bt.round())  # the input transform is exact in fp32
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        d = torch.randn(tile + 2, generator=gen, dtype=torch.float64)
        g = torch.randn(3, generator=gen, dtype=torch.float64)
        expected = torch.stack([d[i] * g[0] + d[i + 1] * g[1] + d[i + 2] * g[2] for i in range(tile)])
        torch.testing.assert_close(at @ ((g_mat @ g) * (bt @ d)), expected, rtol=0, atol=1e-12)


def test_tile_size_is_5_only_where_it_saves_a_fifth_of_the_products():
    # 14x14: 16 tiles of 6x6 (576 products) against 9 of 7x7 (441, 77%); 28x28: 49 x 36 = 36 x 49, a tie;
    # 112x112: 784 x 36 against 529 x 49 (92%); 7x7: 4 x 36 against 4 x 49; 13x9: 4 x 3 x 36 against 3 x 2 x 49.
    assert [tile_for(s, s) for s in (7, 14, 28, 56, 112)] == [4, 5, 4, 4, 4]
    assert tile_for(13, 9) == 5 and tile_for(1, 1) == 4


def _relative_error(got, expected) -> float:
    """Largest deviation, relative to the largest expected magnitude."""
    return ((got.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def _direct_float64(x, conv):
    bias = None if conv.bias is None else conv.bias.double()
    return F.conv2d(x.double(), conv.weight.double(), bias, padding=1)


# Beside odd and tiny sizes, both kinds of chunk: 3 images of 196 tiles (two images, then one), and one image of
# 625 tiles (rows of tiles, the last chunk shorter).
@pytest.mark.parametrize("n,c,k,h,w", [(2, 5, 7, 8, 8), (1, 3, 4, 1, 1), (3, 6, 5, 7, 7), (2, 4, 9, 13, 9),
                                       (1, 8, 8, 14, 14), (2, 3, 2, 2, 5), (3, 4, 3, 56, 56), (1, 3, 4, 100, 97)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_layer_equals_direct_convolution(monkeypatch, n, c, k, h, w, bias, channels_last):
    torch.manual_seed(n * 100 + h * 10 + w)
    conv = nn.Conv2d(c, k, 3, padding=1, bias=bias)
    layer = WinogradConv2d(conv)
    x = torch.randn(n, c, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = _direct_float64(x, conv)

    def direct_conv_used(*args, **kwargs):
        raise AssertionError("fell back to the direct convolution")

    monkeypatch.setattr(F, "conv2d", direct_conv_used)
    with torch.no_grad():
        got = layer(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert _relative_error(got, expected) < 2e-5


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace is deprecated, and still how ONNX traces
def test_steps_aside_exactly_where_it_does_not_apply():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    layer = WinogradConv2d(conv)
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        assert torch.equal(layer.double()(x.double()), F.conv2d(x.double(), conv.weight.double(),
                                                                 conv.bias.double(), padding=1))
        layer.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(layer(x), F.conv2d(x, conv.weight, conv.bias, padding=1))
        traced = torch.jit.trace(layer, x)
    assert "bmm" not in str(traced.graph) and "conv" in str(traced.graph)


def test_reloaded_weights_are_used():
    torch.manual_seed(0)
    layer = WinogradConv2d(nn.Conv2d(4, 4, 3, padding=1))
    other = nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 8, 8)
    layer.load_state_dict(other.state_dict())
    with torch.no_grad():
        got = layer(x)
    expected = _direct_float64(x, other)
    assert _relative_error(got, expected) < 2e-5
    layer.half().float()  # new weight tensors, rounded to float16
    with torch.no_grad():
        got = layer(x)
    expected = F.conv2d(x.double(), layer.weight.double(), layer.bias.double(), padding=1)
    assert _relative_error(got, expected) < 2e-5


def test_chunks_are_what_the_tests_above_cover():
    assert 2 * 196 <= CHUNK_TILES < 3 * 196 and 625 > CHUNK_TILES


def test_eligibility():
    assert winograd_eligible(nn.Conv2d(128, 256, 3, padding=1))
    assert winograd_eligible(nn.Conv2d(48, 64, 3, padding=1))
    assert not winograd_eligible(nn.Conv2d(32, 256, 3, padding=1))  # narrow: the transforms cost more than they save
    assert not winograd_eligible(nn.Conv2d(128, 128, 3, padding=1, stride=2))
    assert not winograd_eligible(nn.Conv2d(128, 128, 1))
    assert not winograd_eligible(nn.Conv2d(128, 128, 3, padding=1, groups=2))
    assert not winograd_eligible(nn.Conv2d(128, 128, 3, padding=2, dilation=2))
    with pytest.raises(ValueError):
        WinogradConv2d(nn.Conv2d(4, 4, 3, padding=1, stride=2))


def test_prepared_tresnet_uses_it_and_keeps_the_function():
    torch.manual_seed(0)
    model = create_model("tresnet_m", 5).eval()
    fast = prepare_for_inference(model)
    direct = prepare_for_inference(model, winograd=False)
    # TResNet-M: the stem's 3x3 conv (48 -> 64), both of each block of layer1 and layer2, one per block of layer3
    # and layer4.
    assert sum(isinstance(m, WinogradConv2d) for m in fast.modules()) == 1 + 6 + 8 + 11 + 3
    assert not any(isinstance(m, WinogradConv2d) for m in direct.modules())
    assert fast.state_dict().keys() == direct.state_dict().keys()
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        expected, got = model.double()(x.double()), fast(x)
    assert _relative_error(got, expected) < 1e-4


def test_flag_in_validate_and_infer():
    v = ["data", "--model-path", "m.pth"]
    assert validate_parser().parse_args(v).winograd is True
    assert validate_parser().parse_args(v + ["--no-winograd"]).winograd is False
    i = ["--model-path", "m.pth", "--pic-path", "x.jpg", "--no-winograd"]
    assert infer_parser().parse_args(i).winograd is False


def test_gradients_are_the_convolution_s():
    # Training through a prepared model is not its purpose, but where autograd is on the layer must be exact.
    torch.manual_seed(0)
    layer = WinogradConv2d(nn.Conv2d(3, 4, 3, padding=1))
    layer.weight.requires_grad_(True)
    x = torch.randn(2, 3, 6, 6)
    xf = x.clone().requires_grad_(True)
    layer(xf).square().sum().backward()
    ref_x = x.detach().float().requires_grad_(True)
    ref_w = layer.weight.detach().clone().requires_grad_(True)
    F.conv2d(ref_x, ref_w, layer.bias, padding=1).square().sum().backward()
    torch.testing.assert_close(xf.grad, ref_x.grad)
    torch.testing.assert_close(layer.weight.grad, ref_w.grad)


def test_threads_and_copies():
    import copy
    import pickle
    import threading

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 128, 3, padding=1)).eval()
    fast = prepare_for_inference(model, channels_last=False)
    assert isinstance(fast.module[0], WinogradConv2d) and isinstance(fast.module[2], WinogradConv2d)
    inputs = [torch.randn(2, 128, 10 + 4 * i, 9) for i in range(4)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    results = {}

    def run(i):
        with torch.no_grad():
            for _ in range(3):
                results[i] = fast(inputs[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with torch.no_grad():
        copies = [other(inputs[0]) for other in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast)))]
    for got, want in zip([results[i] for i in range(4)] + copies, expected + [expected[0]] * 2):
        assert _relative_error(got, want) < 1e-4
