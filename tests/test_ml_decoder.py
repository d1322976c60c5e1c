"""ML-Decoder (the ASL authors' successor head) and TResNet-L v2 (ML-Decoder's "TResNet-L") against independent
references: the head's maths written out here from the official layer's definition, timm's tresnet_v2_l, the
official checkpoints' key layout, onnxruntime, and a training run on generated data."""
import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")
from timm.models.tresnet import checkpoint_filter_fn  # noqa: E402

from asl.cli import run_main  # noqa: E402
from asl.errors import ModelError  # noqa: E402
from asl.models import (convert_timm_tresnet, create_model, detect_architecture, detect_head,  # noqa: E402
                        prepare_for_inference)
from asl.models.ml_decoder import MLDecoder  # noqa: E402
from test_models import _randomize_norms  # noqa: E402  (random norm statistics and scales, shared)

HEADS, FEEDFORWARD = 8, 2048  # the official layer: 8 attention heads, feed-forward width 2048


def _sizes(num_classes, num_of_groups, embedding):
    """The official sizes: G = 100 if num_of_groups < 0 else num_of_groups, at most C; K = int(C / G + 0.999)."""
    groups = min(100 if num_of_groups < 0 else num_of_groups, num_classes)
    return groups, embedding, int(num_classes / groups + 0.999)


def _randomize_head(model, seed=3):
    """Every head tensor random (norm scales around 1, biases non-zero), so that no term of the formula can hide
    behind an initial value of 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".decoder." not in f".{name}":
                continue
            if "norm" in name and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def reference_head(features, state, num_classes, prefix="head.decoder."):
    """The official ML-Decoder in eval, written out in float64 from the state dict alone.

    Tokens -> Linear -> ReLU; queries expanded over the batch; tgt + tgt (the eval form of tgt + dropout(tgt)),
    norm1; 8-head cross-attention (softmax(q k^T / sqrt(d)) v, then the output projection), residual, norm2;
    Linear(D, 2048) -> ReLU -> Linear(2048, D), residual, norm3; out[b, g, :] = h[b, g, :] @ P[g]; flatten; the
    first C; plus the bias.
    """
    def p(key):
        return state[prefix + key].double()

    def norm(x, i):
        return F.layer_norm(x, x.shape[-1:], p(f"layers.0.norm{i}.weight"), p(f"layers.0.norm{i}.bias"), 1e-5)

    tokens = features.double().flatten(2).transpose(1, 2) if features.dim() == 4 else features.double()
    memory = torch.clamp(tokens @ p("embed_standart.weight").T + p("embed_standart.bias"), min=0)
    batch, length = memory.shape[:2]
    queries = p("query_embed.weight")
    groups, dim = queries.shape
    tgt = norm(queries.expand(batch, groups, dim) * 2, 1)
    w_q, w_k, w_v = p("layers.0.multihead_attn.in_proj_weight").chunk(3)
    b_q, b_k, b_v = p("layers.0.multihead_attn.in_proj_bias").chunk(3)
    d = dim // HEADS
    q = (tgt @ w_q.T + b_q).view(batch, groups, HEADS, d).transpose(1, 2)
    k = (memory @ w_k.T + b_k).view(batch, length, HEADS, d).transpose(1, 2)
    v = (memory @ w_v.T + b_v).view(batch, length, HEADS, d).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    attended = (weights @ v).transpose(1, 2).reshape(batch, groups, dim)
    attended = attended @ p("layers.0.multihead_attn.out_proj.weight").T + p("layers.0.multihead_attn.out_proj.bias")
    tgt = norm(tgt + attended, 2)
    hidden = torch.clamp(tgt @ p("layers.0.linear1.weight").T + p("layers.0.linear1.bias"), min=0)
    tgt = norm(tgt + hidden @ p("layers.0.linear2.weight").T + p("layers.0.linear2.bias"), 3)
    pooling = p("duplicate_pooling")
    per_group = torch.stack([tgt[:, g, :] @ pooling[g] for g in range(groups)], dim=1)
    return per_group.reshape(batch, -1)[:, :num_classes] + p("duplicate_pooling_bias")


# ------------------------------------------------------------------------------------------- the head's maths

@pytest.mark.parametrize("num_classes,num_of_groups,embedding", [
    (80, -1, 768),    # G = 80 (100 capped at C), K = 1: COCO's "full decoding"
    (250, -1, 768),   # G = 100, K = 3
    (250, 80, 512),   # G = 80, K = 4
    (80, 20, 512),    # G = 20, K = 4
])
def test_the_head_sizes_and_logits_are_the_official_formulas(num_classes, num_of_groups, embedding):
    """The sizes alone, on TResNet-M's feature width (2048) and a 2 x 2 map: the head's maths does not depend on
    the backbone, whose wiring is checked on whole networks below."""
    head = MLDecoder(num_classes, 2048, num_of_groups, embedding).eval()
    _randomize_head(head)
    groups, dim, factor = _sizes(num_classes, num_of_groups, embedding)
    assert head.state_dict()["decoder.query_embed.weight"].shape == (groups, dim)
    assert head.state_dict()["decoder.duplicate_pooling"].shape == (groups, dim, factor)
    features = torch.rand(2, 2048, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        got = head.double()(features)
    expected = reference_head(features, head.state_dict(), num_classes, prefix="decoder.")
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())


@pytest.mark.parametrize("name,num_classes,num_of_groups,embedding", [
    ("tresnet_m", 250, 20, 768),   # G = 20, K = 13
    ("tresnet_l", 80, 20, 768),
    ("tresnet_v2_l", 250, 100, 512),
])
def test_eval_logits_are_the_official_formulas(name, num_classes, num_of_groups, embedding):
    torch.manual_seed(0)
    model = create_model(name, num_classes, head="ml-decoder", num_of_groups=num_of_groups,
                         decoder_embedding=embedding).eval()
    _randomize_head(model)
    groups, dim, factor = _sizes(num_classes, num_of_groups, embedding)
    state = model.state_dict()
    assert state["head.decoder.query_embed.weight"].shape == (groups, dim)
    assert state["head.decoder.duplicate_pooling"].shape == (groups, dim, factor)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    model = model.double()
    with torch.no_grad():
        features = model.body(x.double())  # (2, C_in, 2, 2): the head reads the unpooled map
        got = model(x.double())
        expected = reference_head(features, {k: v for k, v in model.state_dict().items()}, num_classes)
    assert features.shape[-2:] == (2, 2) and got.shape == (2, num_classes)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * expected.abs().max().item())


@pytest.mark.parametrize("tokens_shape", [(3, 40, 5, 7), (2, 13, 40)])
def test_the_head_alone_on_many_tokens(tokens_shape):
    """More tokens than TResNet gives at 64 px, so the softmax over the tokens is really exercised; a (N, L, C)
    token input (a ViT's) is read as it is."""
    head = MLDecoder(23, 40, num_of_groups=6, decoder_embedding=32).eval().double()
    _randomize_head(head, seed=5)
    x = torch.randn(*tokens_shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        got = head(x)
    expected = reference_head(x, head.state_dict(), 23, prefix="decoder.")
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10 * expected.abs().max().item())


def test_timm_backbone_with_the_head():
    """timm's pool and classifier are gone, the head reads timm's unpooled map (after the wrapper's mean/std)."""
    torch.manual_seed(0)
    model = create_model("timm/resnet10t", 30, head="ml-decoder", num_of_groups=7, decoder_embedding=64).eval()
    _randomize_head(model)
    state = model.state_dict()
    assert not any(k.startswith("net.fc.") for k in state)
    assert {k for k in state if k.startswith("head.")} == set(_expected_head_shapes(30, 512, 7, 64, 5))
    x = torch.rand(2, 3, 64, 64)
    donor = timm.create_model("resnet10t", num_classes=0, global_pool="")
    donor.load_state_dict({k[len("net."):]: v for k, v in state.items() if k.startswith("net.")})
    with torch.no_grad():
        normalized = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / \
            torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        features = donor.eval()(normalized)
        got = model(x)
    assert features.shape == (2, 512, 2, 2)
    expected = reference_head(features, state, 30).float()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_timm_backbone_with_a_layer_between_pool_and_classifier():
    """MobileNetV3's classifier reads a 1024-wide conv_head output, not its 576 features: the head is sized on what
    the network returns once its classifier is removed."""
    model = create_model("timm/mobilenetv3_small_100", 4, head="ml-decoder", decoder_embedding=32).eval()
    with torch.no_grad():
        assert model.net(torch.rand(1, 3, 64, 64)).shape[1] == 1024
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 4)
    assert model.state_dict()["head.decoder.embed_standart.weight"].shape == (32, 1024)


# ------------------------------------------------------------------------------------------------ key layout

def _expected_head_shapes(num_classes, features, groups, dim, factor):
    """The official checkpoints' ML-Decoder keys: its layer's submodules (dropouts have no tensors), the token
    projection, the queries and the group fully-connected layer."""
    layer = "head.decoder.layers.0."
    shapes = {
        "head.decoder.embed_standart.weight": (dim, features), "head.decoder.embed_standart.bias": (dim,),
        "head.decoder.query_embed.weight": (groups, dim),
        layer + "multihead_attn.in_proj_weight": (3 * dim, dim), layer + "multihead_attn.in_proj_bias": (3 * dim,),
        layer + "multihead_attn.out_proj.weight": (dim, dim), layer + "multihead_attn.out_proj.bias": (dim,),
        layer + "linear1.weight": (FEEDFORWARD, dim), layer + "linear1.bias": (FEEDFORWARD,),
        layer + "linear2.weight": (dim, FEEDFORWARD), layer + "linear2.bias": (dim,),
        "head.decoder.duplicate_pooling": (groups, dim, factor), "head.decoder.duplicate_pooling_bias": (num_classes,),
    }
    for i in (1, 2, 3):
        shapes[f"{layer}norm{i}.weight"] = shapes[f"{layer}norm{i}.bias"] = (dim,)
    return shapes


@pytest.mark.parametrize("name,features", [("tresnet_m", 2048), ("tresnet_v2_l", 2048), ("tresnet_xl", 2656)])
def test_key_layout_is_the_official_one(name, features):
    model = create_model(name, 250, head="ml-decoder", num_of_groups=20, decoder_embedding=512)
    state = model.state_dict()
    head = {k: tuple(v.shape) for k, v in state.items() if k.startswith("head.")}
    assert head == _expected_head_shapes(250, features, 20, 512, 13)
    plain = create_model(name, 250).state_dict()
    # the backbone is untouched; the global pool had no tensors and the linear classifier is gone
    assert {k for k in state if not k.startswith("head.")} == {k for k in plain if not k.startswith("head.fc.")}
    assert detect_architecture(state) == {"model_name": name, "bottleneck_head": False, "head": "ml-decoder",
                                          "num_of_groups": 20, "decoder_embedding": 512, "num_classes": 250}


def test_open_images_sizes_and_initialisation():
    """The Open Images model's head (9605 classes, 200 groups: K = 49), initialised as the original: xavier-normal
    group weights, zero biases, and torch's own Linear initialisation (not TResNet's normal(0, 0.01))."""
    head = MLDecoder(9605, 2048, num_of_groups=200)
    pooling = head.decoder.duplicate_pooling
    assert pooling.shape == (200, 768, 49) and head.decoder.duplicate_pooling_bias.shape == (9605,)
    assert 200 * 49 >= 9605 > 200 * 48
    # xavier_normal_ on (G, D, K): fan_in = D * K, fan_out = G * K
    assert pooling.std().item() == pytest.approx(math.sqrt(2.0 / (768 * 49 + 200 * 49)), rel=0.02)
    assert torch.count_nonzero(head.decoder.duplicate_pooling_bias) == 0
    model = create_model("tresnet_m", 80, head="ml-decoder")
    embed = model.head.decoder.embed_standart.weight
    # torch's default: uniform within 1/sqrt(fan_in); normal(0, 0.01) would exceed that bound many times here
    assert embed.abs().max().item() <= 1 / math.sqrt(2048) and embed.std().item() > 0.012


def test_bad_heads_are_one_clear_error():
    with pytest.raises(ModelError, match="unknown head 'transformer'; known: ml-decoder"):
        create_model("tresnet_m", 5, head="transformer")
    with pytest.raises(ModelError, match="choose one"):
        create_model("tresnet_m", 5, head="ml-decoder", bottleneck_head=True)
    with pytest.raises(ModelError, match="multiple of the 8 attention heads"):
        create_model("tresnet_m", 5, head="ml-decoder", decoder_embedding=100)
    with pytest.raises(ModelError, match="num_of_groups"):
        create_model("tresnet_m", 5, head="ml-decoder", num_of_groups=0)
    with pytest.raises(ModelError, match="fewer groups"):  # int(C / G + 0.999) would give fewer outputs than C
        MLDecoder(2001, 16, num_of_groups=2000, decoder_embedding=8)
    with pytest.raises(ModelError, match="still pools"):
        MLDecoder(5, 16, decoder_embedding=8)(torch.rand(2, 16))


# ----------------------------------------------------------------------------------------- training behaviour

def test_dropout_acts_in_training_only():
    head = MLDecoder(10, 32, num_of_groups=4, decoder_embedding=64)
    _randomize_head(head)
    x = torch.randn(2, 32, 3, 3)
    head.eval()
    with torch.no_grad():
        first, second = head(x), head(x)
    assert torch.equal(first, second)
    head.train()
    with torch.no_grad():
        torch.manual_seed(0)
        noisy = head(x)
        torch.manual_seed(1)
        other = head(x)
    assert not torch.allclose(noisy, other) and not torch.allclose(noisy, first)
    # Dropout is the only difference between the modes: without it, training mode gives eval's outputs.
    for module in head.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(module, torch.nn.MultiheadAttention):
            module.dropout = 0.0
    with torch.no_grad():
        torch.testing.assert_close(head(x), first, rtol=1e-6, atol=1e-6)


def test_query_embed_is_never_trained():
    from asl.losses import AsymmetricLoss
    from asl.training.step import create_optimizer

    torch.manual_seed(0)
    model = create_model("tresnet_m", 12, head="ml-decoder", num_of_groups=5, decoder_embedding=64).train()
    queries = model.head.decoder.query_embed.weight
    assert not queries.requires_grad
    optimizer = create_optimizer(model, lr=1e-2)
    assert all(p is not queries for group in optimizer.param_groups for p in group["params"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    criterion = AsymmetricLoss(4, 0, 0.05, disable_torch_grad_focal_loss=True)
    x, y = torch.rand(2, 3, 64, 64), (torch.rand(2, 12) > 0.5).float()
    criterion(model(x).float(), y).backward()
    assert queries.grad is None
    optimizer.step()
    after = model.state_dict()
    assert torch.equal(after["head.decoder.query_embed.weight"], before["head.decoder.query_embed.weight"])
    for key in ("head.decoder.embed_standart.weight", "head.decoder.duplicate_pooling",
                "head.decoder.layers.0.multihead_attn.in_proj_weight", "body.conv1.0.weight"):
        assert not torch.equal(after[key], before[key]), key


def test_state_dict_round_trips_strictly_and_is_read_from_the_file(tmp_path):
    from asl.models.loading import load_model

    torch.manual_seed(0)
    model = create_model("tresnet_m", 50, head="ml-decoder", num_of_groups=20, decoder_embedding=64).eval()
    _randomize_head(model)
    _randomize_norms(model)
    state = model.state_dict()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    # The official file layout ({'model', 'idx_to_class'}): no name, no head flag, no class count given. The load
    # is strict (every key, every shape), and the outputs are bit-identical.
    path = tmp_path / "tresnet_m_COCO_64.pth"
    torch.save({"model": state, "idx_to_class": {i: f"c{i}" for i in range(50)}}, path)
    loaded = load_model(path, prepare=False)
    assert (loaded.model_name, loaded.head, loaded.num_of_groups, loaded.decoder_embedding, loaded.num_classes) == \
        ("tresnet_m", "ml-decoder", 20, 64, 50)
    assert set(loaded.model.state_dict()) == set(state)
    prepared = prepare_for_inference(loaded.model)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), expected, rtol=0, atol=0)
        got = prepared(x)
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-5


def test_timm_backbone_head_read_from_our_file(tmp_path):
    from asl.models.loading import load_model

    model = create_model("timm/resnet10t", 9, head="ml-decoder", num_of_groups=3, decoder_embedding=32).eval()
    path = tmp_path / "model.pth"
    torch.save({"model": model.state_dict(), "model_name": "timm/resnet10t", "num_classes": 9, "head": "ml-decoder"},
               path)
    loaded = load_model(path, prepare=False)
    assert (loaded.model_name, loaded.head, loaded.num_of_groups, loaded.decoder_embedding) == \
        ("timm/resnet10t", "ml-decoder", 3, 32)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)
    assert detect_head(create_model("timm/resnet10t", 9).state_dict()) is None


def test_pretrained_backbone_under_the_head(tmp_path):
    """An ImageNet file (timm's layout, with its 1000-class fc) starts the backbone; the head keeps its own
    weights."""
    torch.manual_seed(0)
    imagenet = timm.create_model("tresnet_m", num_classes=1000)
    torch.save(imagenet.state_dict(), tmp_path / "in1k.pth")
    model = create_model("tresnet_m", 7, head="ml-decoder", decoder_embedding=64, pretrained=str(tmp_path / "in1k.pth"))
    expected = convert_timm_tresnet(imagenet.state_dict())["body.layer3.2.conv2.0.weight"]
    assert torch.equal(model.state_dict()["body.layer3.2.conv2.0.weight"], expected)
    donor = timm.create_model("resnet10t", num_classes=1000)
    torch.save(donor.state_dict(), tmp_path / "r10.pth")
    started = create_model("timm/resnet10t", 7, head="ml-decoder", decoder_embedding=64,
                           pretrained=str(tmp_path / "r10.pth"))
    assert torch.equal(started.net.conv1[0].weight, donor.conv1[0].weight)


@pytest.mark.parametrize("file_name,size", [
    ("tresnet_m_COCO_224_84_2.pth", 224), ("tresnet_l_COCO__448_90_0.pth", 448), ("tresnet_xl_COCO_640_91_4.pth", 640),
    ("tresnet_m_open_images_200_groups_86_8.pth", None),  # 200 is its query count, not its 224 px
])
def test_input_size_from_the_official_ml_decoder_file_names(file_name, size):
    from asl.models.loading import stored_image_size

    got, source = stored_image_size({}, f"/zoo/{file_name}")
    if size is None:
        assert "does not say" in source
    else:
        assert (got, source) == (size, "from the file name")


# ------------------------------------------------------------------------------------------------ TResNet-L v2

def test_tresnet_v2_l_gives_timms_logits():
    torch.manual_seed(0)
    ref = timm.create_model("tresnet_v2_l", num_classes=5).eval()
    _randomize_norms(ref)
    ours = create_model("tresnet_v2_l", 5).eval()
    ours.load_state_dict(convert_timm_tresnet(ref.state_dict()), strict=True)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    assert detect_architecture(ref.state_dict()) == {"model_name": "tresnet_v2_l", "bottleneck_head": False,
                                                     "num_classes": 5}


def test_tresnet_v2_l_layout_is_what_timm_converts_from():
    """timm's checkpoint_filter_fn reads the official layout: from our state dict it must give exactly timm's keys
    and shapes (layer1.0.downsample.0: no pool before the stride-1 projection; the blur in conv2 of layer2.0)."""
    ours = create_model("tresnet_v2_l", 11)
    state = ours.state_dict()
    assert state["body.conv1.0.weight"].shape[0] == 64 and ours.num_features == 2048
    assert "body.layer1.0.downsample.0.0.weight" in state and "body.layer2.0.conv2.0.0.weight" in state
    assert [sum(1 for k in state if k.startswith(f"body.layer{i}.") and k.endswith("conv3.0.weight"))
            for i in (1, 2, 3, 4)] == [3, 4, 23, 3]
    ref = timm.create_model("tresnet_v2_l", num_classes=11)
    converted = checkpoint_filter_fn(state, ref)
    timm_shapes = {k: v.shape for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert {k: v.shape for k, v in converted.items()} == timm_shapes


def test_detection_tells_v2_l_from_m_by_its_blocks():
    """Both stems are 64 wide: the blocks decide."""
    m = create_model("tresnet_m", 3).state_dict()
    v2 = create_model("tresnet_v2_l", 3).state_dict()
    assert m["body.conv1.0.weight"].shape == v2["body.conv1.0.weight"].shape
    assert detect_architecture(m)["model_name"] == "tresnet_m"
    assert detect_architecture(v2)["model_name"] == "tresnet_v2_l"


# ------------------------------------------------------------------------------------------- command lines

def _run(main, argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_main(main, argv)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("flags,message", [
    (["--use-ml-decoder", "0", "--head", "ml-decoder"], "contradicts --head"),
    (["--num-of-groups", "5"], "--num-of-groups apply to the ML-Decoder head only"),
    (["--head", "ml-decoder", "--decoder-embedding", "100"], "multiple of the 8"),
    (["--head", "ml-decoder", "--bottleneck-head"], "choose one"),
    (["--head", "transformer"], "invalid choice"),
    (["--use-ml-decoder", "2"], "invalid choice"),
    (["--head", "ml-decoder", "--num-of-groups", "many"], "invalid int value"),
])
def test_train_head_flags_are_checked_first(tmp_path, flags, message):
    from asl.apps import train

    code, _, err = _run(train.main, [str(tmp_path / "nothing-here"), "--dataset", "synthetic", *flags,
                                     "--output-dir", str(tmp_path / "run")])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_use_ml_decoder_is_head_ml_decoder():
    from asl.apps import train

    for spelling in (["--use-ml-decoder", "1"], ["--head", "ml-decoder"], ["--use_ml_decoder", "1", "--head",
                                                                            "ml-decoder"]):
        options = train.parse_options(["data", "--dataset", "synthetic", *spelling, "--num_of_groups", "7"])
        assert (options.head, options.num_of_groups, options.decoder_embedding) == ("ml-decoder", 7, 768)
    assert train.parse_options(["data", "--dataset", "synthetic", "--use-ml-decoder", "0"]).head is None


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_trains_with_asl_above_chance_and_validate_reads_the_head(tmp_path, make_synthetic):
    """train.py with ML-Decoder (its own flag spelling; 3 groups of K = 2 for 6 classes) learns the generated
    shapes well above chance, and validate.py on model-highest.pth, with no head or model flag, prints the same
    mAP."""
    from asl.apps import train, validate

    data = make_synthetic(256, 64, 32)
    run = tmp_path / "run"
    code, text, err = _run(train.main, [
        str(data), "--dataset", "synthetic", "--model-name", "timm/resnet10t", "--use-ml-decoder", "1",
        "--num-of-groups", "3", "--decoder-embedding", "64", "--image-size", "32", "-b", "16", "-j", "0",
        "--epochs", "4", "--stop-epoch", "4", "--lr", "1e-3", "--device", "cpu", "--output-dir", str(run)])
    assert code == 0, err[-2000:]
    trained = float(text.rsplit("highest_mAP = ", 1)[1].split()[0].rstrip(","))
    # Chance: a random ranking's AP is about the class's frequency among the validation pictures.
    annotations = json.loads((data / "annotations" / "instances_val.json").read_text())
    labels = {(a["image_id"], a["category_id"]) for a in annotations["annotations"]}
    counts = np.bincount([c for _, c in labels], minlength=7)[1:]
    chance = 100 * counts.mean() / len(annotations["images"])
    assert trained > chance + 15, (trained, chance)
    checkpoint = torch.load(run / "model-highest.pth", map_location="cpu", weights_only=True)
    assert (checkpoint["head"], checkpoint["num_of_groups"], checkpoint["decoder_embedding"]) == ("ml-decoder", 3, 64)
    assert checkpoint["model"]["head.decoder.duplicate_pooling"].shape == (3, 64, 2)
    code, text, err = _run(validate.main, [str(data), "--dataset", "synthetic", "--model-path",
                                           str(run / "model-highest.pth"), "-b", "16", "-j", "0", "--device", "cpu"])
    assert code == 0, err[-2000:]
    assert float(text.strip().splitlines()[-1].split(":")[1]) == pytest.approx(trained, abs=0.05)


@pytest.mark.slow
def test_onnx_export_agrees_with_onnxruntime(tmp_path):
    """export.py reads the head from the file; nn.MultiheadAttention goes through opset 17; onnxruntime gives
    PyTorch's logits on 4 tokens, for another batch size than the one traced."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from asl.apps import export
    from asl.models.loading import load_model

    torch.manual_seed(0)
    model = create_model("tresnet_m", 50, head="ml-decoder", num_of_groups=20, decoder_embedding=64).eval()
    _randomize_head(model)
    checkpoint = tmp_path / "model.pth"
    torch.save({"model": model.state_dict(), "num_classes": 50}, checkpoint)
    onnx_path = tmp_path / "model.onnx"
    code, _, err = _run(export.main, ["--model-path", str(checkpoint), "--output", str(onnx_path),
                                      "--image-size", "64"])
    assert code == 0, err[-2000:]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = load_model(checkpoint, prepare=False).model(x).numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max() + 1e-6


@pytest.mark.slow
def test_the_head_traces_to_one_graph():
    """torch.compile (train.py --compile) sees the head as one graph, in training and in eval."""
    dynamo = pytest.importorskip("torch._dynamo")
    head = MLDecoder(10, 32, num_of_groups=4, decoder_embedding=64)
    x = torch.randn(2, 32, 3, 3)
    for mode in (head.train, head.eval):
        mode()
        dynamo.reset()
        explained = dynamo.explain(head)(x)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
