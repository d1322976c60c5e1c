"""Training fidelity: every parameter's gradient against an independent statement of InPlaceABN's backward.

The reference below is written from the formulas of the ``inplace_abn`` extension (forward: batch statistics,
scale ``|w| + eps``, leaky ReLU; backward: ``dbias = sum(dy)``, ``dweight = sum(xhat * dy)`` negated only where
``w < 0``, and the usual batch-norm input gradient). Unlike the model's own layer, it keeps the *input* for
backward and recomputes nothing from the output, so the two share no code path.
"""
import copy

import pytest
import torch
import torch.nn as nn

from asl.models import create_model
from asl.models.layers import ABN

EPS = 1e-5


class ReferenceInPlaceABN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, slope):
        dims = [0, 2, 3]
        mean = x.mean(dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dims, keepdim=True)
        invstd = 1.0 / torch.sqrt(var + EPS)
        xhat = (x - mean) * invstd
        scale = (weight.abs() + EPS).view(1, -1, 1, 1)
        z = xhat * scale + bias.view(1, -1, 1, 1)
        y = torch.where(z >= 0, z, z * slope) if slope is not None else z
        ctx.save_for_backward(xhat, z, weight, invstd)
        ctx.slope = slope
        return y

    @staticmethod
    def backward(ctx, dy):
        xhat, z, weight, invstd = ctx.saved_tensors
        if ctx.slope is not None:
            dy = torch.where(z >= 0, dy, dy * ctx.slope)
        m = dy.shape[0] * dy.shape[2] * dy.shape[3]
        sum_dy = dy.sum([0, 2, 3])
        sum_xhat_dy = (dy * xhat).sum([0, 2, 3])
        sign = torch.where(weight < 0, -1.0, 1.0).to(weight.dtype)
        grad_weight = sum_xhat_dy * sign
        grad_bias = sum_dy
        scale = (weight.abs() + EPS).view(1, -1, 1, 1)
        grad_x = scale * invstd * (dy - sum_dy.view(1, -1, 1, 1) / m - xhat * sum_xhat_dy.view(1, -1, 1, 1) / m)
        return grad_x, grad_weight, grad_bias, None


class ReferenceNorm(nn.Module):
    """Stands in for one of the model's ABN layers, sharing its parameters."""

    def __init__(self, abn: ABN):
        super().__init__()
        self.abn = abn

    def forward(self, x):
        slope = self.abn.activation_param if self.abn.activation == "leaky_relu" else None
        return ReferenceInPlaceABN.apply(x, self.abn.weight, self.abn.bias, slope)


def _swap_norms_for_reference(model: nn.Module) -> int:
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, ABN):
                setattr(module, name, ReferenceNorm(child))
                swapped += 1
    return swapped


def _model_with_mixed_norm_weights(seed: int, memory_efficient: bool = True) -> nn.Module:
    """TResNet-M in float64 with random norm weights of both signs, plus its zero-initialised ones, plus a few
    more set to exactly 0, so the sign rule is exercised on every side."""
    torch.manual_seed(seed)
    model = create_model("tresnet_m", 7, memory_efficient=memory_efficient).double().train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ABN):
                if bool((m.weight == 0).all()):
                    continue  # keep the zero-initialised residual norms at exactly 0
                w = (torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.2)
                w *= torch.where(torch.rand(m.num_features, generator=g) < 0.3, -1.0, 1.0).double()
                w[torch.rand(m.num_features, generator=g) < 0.1] = 0.0
                m.weight.copy_(w)
                m.bias.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) * 0.2 - 0.1)
    return model


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    model.zero_grad(set_to_none=True)
    logits = model(x)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum")
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("memory_efficient, channels_last", [(True, False), (False, False), (True, True)])
def test_every_gradient_equals_inplace_abn_reference_float64(memory_efficient, channels_last):
    model = _model_with_mixed_norm_weights(0, memory_efficient)
    if channels_last:  # train.py's default layout
        model = model.to(memory_format=torch.channels_last)
    reference = copy.deepcopy(model)
    assert _swap_norms_for_reference(reference) == 60  # stem 1, layers 6 + 9 + 34 + 10
    zero_norms = [n for n, p in model.named_parameters() if n.endswith("1.weight") and bool((p == 0).any())]
    assert len(zero_norms) > 21
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(2, 7, generator=torch.Generator().manual_seed(4)) < 0.4).double()
    got, expected = _grads(model, x, y), _grads(reference, x, y)
    expected = {name.replace(".abn.", "."): g for name, g in expected.items()}
    assert set(got) == set(expected)
    for name, g in got.items():
        e = expected[name]
        scale = e.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6 * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("memory_efficient", [True, False])
def test_from_scratch_zero_initialised_norms_get_gradients(memory_efficient):
    torch.manual_seed(0)
    model = create_model("tresnet_m", 80, memory_efficient=memory_efficient).train()
    zero = {n: p for n, p in model.named_parameters()
            if n.endswith(".weight") and p.dim() == 1 and bool((p == 0).all())}
    assert len(zero) == 3 + 4 + 11 + 3  # the last norm of every residual block of TResNet-M
    assert "body.layer1.0.conv2.1.weight" in zero
    x = torch.rand(2, 3, 64, 64)
    target = torch.zeros(2, 80)
    target[:, :3] = 1
    nn.functional.binary_cross_entropy_with_logits(model(x), target, reduction="sum").backward()
    for name, p in zero.items():
        assert p.grad is not None and bool((p.grad != 0).any()), name
    # One Adam step opens them: the residual branches are no longer stuck at scale 1e-5.
    torch.optim.Adam(model.parameters(), lr=1e-4).step()
    assert all(bool((p != 0).any()) for p in zero.values())


def test_training_forward_is_timm_bit_for_bit_and_updates_the_same_statistics():
    """The memory-saving layer runs the same kernels as timm's plain BatchNorm + activation in training mode:
    the same logits and the same running statistics, bit for bit (timm gets our weights through its own
    conversion of the official layout, which computes |w| + 1e-5 as we do)."""
    timm = pytest.importorskip("timm")
    from timm.models.tresnet import checkpoint_filter_fn

    ours = _model_with_mixed_norm_weights(0).float().train()
    ref = timm.create_model("tresnet_m", num_classes=7).train()
    ref.load_state_dict(checkpoint_filter_fn(ours.state_dict(), ref), strict=False)
    x = torch.rand(2, 3, 64, 64)
    expected, got = ref(x), ours(x)
    assert torch.equal(got, expected)
    ref_means = sorted((k, v) for k, v in ref.state_dict().items() if k.endswith("running_mean"))
    our_means = [v for k, v in ours.state_dict().items() if k.endswith("running_mean")]
    assert len(ref_means) == len(our_means) == 60
    ref_sums = sorted(float(v.double().sum()) for _, v in ref_means)
    our_sums = sorted(float(v.double().sum()) for v in our_means)
    assert ref_sums == our_sums


def test_blur_backward_keeps_nothing_and_matches_numerical_gradient():
    from asl.models.layers import AntiAliasDownsample

    blur = AntiAliasDownsample(3).double()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(blur, (x,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        blur(x)
    assert saved == [blur.filt.shape]  # the constant filter only, no activation


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", ["leaky_relu", "identity"])
def test_norm_layer_matches_numerical_gradient(training, activation):
    """Finite differences of the memory-saving layer, with weights of both signs (away from the kink of |w| at 0,
    where finite differences are meaningless; the zero rule is checked against the reference above)."""
    from asl.models.layers import _ABNFunction

    slope = 0.3 if activation == "leaky_relu" else None
    running_mean = torch.rand(3, dtype=torch.float64)
    running_var = torch.rand(3, dtype=torch.float64) + 0.5

    def layer(x, weight, bias):
        return _ABNFunction.apply(x, weight, bias, running_mean.clone(), running_var.clone(), training, 0.1, EPS,
                                  slope)

    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([0.5, -0.7, 1.3], dtype=torch.float64, requires_grad=True)
    bias = torch.rand(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x, weight, bias))


def test_memory_efficient_training_keeps_at_most_0_8_of_timm_activations():
    """Deterministic byte count of what autograd keeps (not a timing): InPlaceABN's saving, reproduced."""
    timm = pytest.importorskip("timm")

    def activation_bytes(model, x):
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return sum(n for ptr, n in seen.items() if ptr not in params)

    torch.manual_seed(0)
    x = torch.rand(2, 3, 128, 128)
    reference = activation_bytes(timm.create_model("tresnet_m", num_classes=80).train(), x)
    plain = activation_bytes(create_model("tresnet_m", 80, memory_efficient=False).train(), x)
    ours = activation_bytes(create_model("tresnet_m", 80).train(), x)
    assert plain <= reference
    assert ours <= 0.8 * reference, ours / reference
