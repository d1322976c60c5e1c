"""TResNet against independent references: timm's TResNet and timm's own checkpoint conversion."""
import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")
from timm.models.tresnet import checkpoint_filter_fn  # noqa: E402

from asl.checkpoint import CheckpointError  # noqa: E402
from asl.models import (MODEL_NAMES, convert_timm_tresnet, create_model, detect_architecture,  # noqa: E402
                        load_pretrained_backbone, prepare_for_inference)
from asl.models.layers import ABN, AntiAliasDownsample, SpaceToDepth  # noqa: E402


def _randomize_norms(model, positive=True):
    """Random BN statistics and scales, so that a wrong norm formula cannot hide behind weight=1, stats=0/1."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, ABN)):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
                scale = torch.rand(m.num_features, generator=g) + 0.5
                if not positive:
                    scale = scale * torch.where(torch.rand(m.num_features, generator=g) < 0.5, -1.0, 1.0)
                m.weight.copy_(scale)


@pytest.mark.parametrize("name", ["tresnet_m", "tresnet_l"])
def test_timm_tresnet_converted_gives_same_logits(name):
    torch.manual_seed(0)
    ref = timm.create_model(name, num_classes=5).eval()
    _randomize_norms(ref)
    ours = create_model(name, 5).eval()
    ours.load_state_dict(convert_timm_tresnet(ref.state_dict()), strict=True)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_official_layout_is_what_timm_converts_from():
    """timm's checkpoint_filter_fn maps the official layout to timm's: applying it to our state dict must give
    exactly timm's keys, and the |w|+1e-5 scales must make timm compute our logits (negative scales included)."""
    torch.manual_seed(0)
    ours = create_model("tresnet_m", 4).eval()
    _randomize_norms(ours, positive=False)
    ref = timm.create_model("tresnet_m", num_classes=4).eval()
    converted = checkpoint_filter_fn(ours.state_dict(), ref)
    timm_keys = {k for k in ref.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(converted) == timm_keys
    ref.load_state_dict(converted, strict=False)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_state_dict_has_official_keys_only():
    sd = create_model("tresnet_m", 80).state_dict()
    assert not any(k.endswith("num_batches_tracked") or "filt" in k for k in sd)
    # keys as in MS_COCO_TRresNet_M_224_81.8.pth
    for key in ["body.conv1.0.weight", "body.conv1.1.running_var", "body.layer2.0.conv1.0.0.weight",
                "body.layer2.0.conv1.0.1.weight", "body.layer2.0.downsample.1.0.weight",
                "body.layer3.0.conv2.0.1.bias", "body.layer3.1.se.fc1.weight", "body.layer4.2.conv3.1.running_mean",
                "head.fc.weight", "head.fc.bias"]:
        assert key in sd, key
    assert sd["body.conv1.0.weight"].shape == (64, 48, 3, 3)
    assert sd["head.fc.weight"].shape == (80, 2048)
    assert not any(".se." in k for k in sd if k.startswith("body.layer4"))


def test_widths_and_bottleneck_head():
    large = create_model("tresnet_l", 9605, bottleneck_head=True)
    sd = large.state_dict()
    assert large.num_features == 2432
    assert sd["head.fc.embedding_generator.0.weight"].shape == (512, 2432)
    assert sd["head.fc.FC.weight"].shape == (9605, 512)
    assert not any(k.startswith("head.fc.embedding_generator.1") for k in sd)
    assert detect_architecture(sd) == {"model_name": "tresnet_l", "bottleneck_head": True, "num_classes": 9605}
    xl = create_model("tresnet_xl", 20)
    assert xl.num_features == 2656 and xl.state_dict()["body.conv1.0.weight"].shape[0] == 83
    assert detect_architecture(xl.state_dict())["model_name"] == "tresnet_xl"
    assert sum(1 for k in xl.state_dict() if k.endswith("conv3.0.weight") and "layer3" in k) == 24


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        create_model("tresnet_q", 3)
    for name in MODEL_NAMES:
        assert name in str(err.value)


def test_space_to_depth_channel_order():
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).view(1, 2, 8, 8)
    y = SpaceToDepth()(x)
    assert y.shape == (1, 32, 2, 2)
    # output channel (dy*4 + dx)*C + c at (i, j) holds input[c, 4i+dy, 4j+dx]
    for dy, dx, c, i, j in [(0, 0, 0, 0, 0), (1, 2, 1, 1, 0), (3, 3, 1, 1, 1), (2, 1, 0, 0, 1)]:
        assert y[0, (dy * 4 + dx) * 2 + c, i, j] == x[0, c, 4 * i + dy, 4 * j + dx]


def test_blur_downsample_by_hand():
    layer = AntiAliasDownsample(channels=1)
    assert "filt" not in layer.state_dict()
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")[0, 0]
    k = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=torch.float32) / 16
    expected = torch.tensor([[(padded[r:r + 3, c:c + 3] * k).sum() for c in (0, 2)] for r in (0, 2)])
    torch.testing.assert_close(layer(x)[0, 0], expected)
    assert layer.to(torch.float64)(x.double()).dtype == torch.float64


def test_prepare_for_inference_same_function_and_original_untouched():
    torch.manual_seed(0)
    model = create_model("tresnet_m", 6).eval()
    _randomize_norms(model, positive=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(3, 3, 64, 64)
    fast = prepare_for_inference(model)
    with torch.no_grad():
        expected, got = model(x), fast(x)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_prepared_model_gives_timms_logits():
    """The folded model against timm's TResNet in eval mode on the same weights: within 1e-5 of the largest logit,
    in either memory layout; on the CPU the default layout is NCHW."""
    torch.manual_seed(0)
    ref = timm.create_model("tresnet_m", num_classes=7).eval()
    _randomize_norms(ref)
    ours = create_model("tresnet_m", 7)
    ours.load_state_dict(convert_timm_tresnet(ref.state_dict()), strict=True)
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        expected = ref(x)
    for channels_last in (None, False, True):
        prepared = prepare_for_inference(ours, channels_last=channels_last)
        conv = next(m for m in prepared.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] == 3)
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == bool(channels_last)
        assert not any(isinstance(m, ABN) for m in prepared.modules())
        with torch.no_grad():
            got = prepared(x)
        assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5, channels_last


def test_autocast_cpu_bfloat16_runs():
    model = create_model("tresnet_m", 4).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.shape == (1, 4) and torch.isfinite(out.float()).all()


def test_training_step_updates_running_stats():
    model = create_model("tresnet_m", 2).train()
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    assert not torch.equal(model.body.conv1[1].running_mean, torch.zeros(64))
    assert model.body.conv1[0].weight.grad is not None


def test_pretrained_backbone_skips_head_and_accepts_timm_layout(tmp_path):
    torch.manual_seed(0)
    imagenet = timm.create_model("tresnet_m", num_classes=1000)
    path = tmp_path / "tresnet_m_timm.pth"
    torch.save(imagenet.state_dict(), path)
    model = create_model("tresnet_m", 7, pretrained=str(path))
    expected = convert_timm_tresnet(imagenet.state_dict())["body.layer3.2.conv2.0.weight"]
    assert torch.equal(model.state_dict()["body.layer3.2.conv2.0.weight"], expected)
    assert model.head.fc.weight.shape == (7, 2048)


def test_pretrained_backbone_mismatch_is_one_clear_error():
    model = create_model("tresnet_m", 7)
    wrong = create_model("tresnet_l", 7).state_dict()
    with pytest.raises(CheckpointError, match=r"does not fit .*shape mismatch body\.conv1\.0\.weight: ckpt \(76, 48"):
        load_pretrained_backbone(model, wrong)


def test_timm_backbone_by_name(tmp_path):
    torch.manual_seed(0)
    model = create_model("timm/resnet18", 5)
    out = model(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 5)
    donor = timm.create_model("resnet18", num_classes=1000)
    torch.save(donor.state_dict(), tmp_path / "r18.pth")
    started = create_model("timm/resnet18", 5, pretrained=str(tmp_path / "r18.pth"))
    assert torch.equal(started.net.conv1.weight, donor.conv1.weight)
    with pytest.raises(ValueError, match="unknown timm model"):
        create_model("timm/not_a_model_xyz", 5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_autocast():
    torch.manual_seed(0)
    model = create_model("tresnet_m", 4).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        gpu = model.to("cuda")
        torch.testing.assert_close(gpu(x.to("cuda")).cpu(), expected, rtol=1e-3, atol=1e-3)
        with torch.autocast("cuda", dtype=torch.float16):
            assert torch.isfinite(gpu(x.to("cuda")).float()).all()


def test_the_layout_follows_the_device_and_the_batch():
    from asl.models import default_channels_last

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not default_channels_last(cpu) and not default_channels_last(cpu, 1)
    assert default_channels_last(cpu, 8) and default_channels_last(cpu, 32)
    assert default_channels_last(cuda) and default_channels_last(cuda, 1)
    model = create_model("tresnet_m", 3)
    conv = next(m for m in prepare_for_inference(model, batch_size=32).modules() if isinstance(m, torch.nn.Conv2d)
                and m.weight.shape[-1] == 3)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("size", [(6, 6), (7, 5), (9, 10)])
def test_blur_gradient_is_autograds_through_pad_and_conv(size):
    """The blur's hand-written backward (transposed conv, then the reflect padding's adjoint) against autograd
    through F.pad + F.conv2d, in float64, even and odd sizes."""
    layer = AntiAliasDownsample(3).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn_like(layer(x))
    (ours,) = torch.autograd.grad(layer(x), x, grad_out)
    reference = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), layer.filt, stride=2, groups=3)
    (expected,) = torch.autograd.grad(reference, x, grad_out)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
