"""ASL losses against formulas written out here (paper and original-code forms), BCE/CE, and finite differences."""

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

from asl.losses import ASLSingleLabel, AsymmetricLoss, AsymmetricLossOptimized

MULTI_LABEL = [AsymmetricLoss, AsymmetricLossOptimized]


# --------------------------------------------------------------------------------------- independent references

def reference_code_form(x, y, gamma_neg, gamma_pos, clip, eps, constant_weight):
    """Element-wise ASL as the original code defines it (pt-interpolation; valid for soft targets too)."""
    p = torch.sigmoid(x)
    q = 1.0 - p
    if clip is not None and clip > 0:
        q = torch.clamp(q + clip, max=1.0)
    ce = y * torch.log(torch.clamp(p, min=eps)) + (1.0 - y) * torch.log(torch.clamp(q, min=eps))
    if gamma_neg > 0 or gamma_pos > 0:
        pt = p * y + q * (1.0 - y)
        weight = (1.0 - pt) ** (gamma_pos * y + gamma_neg * (1.0 - y))
        if constant_weight:
            weight = weight.detach()
        ce = ce * weight
    return -ce


def reference_paper_form(x, y, gamma_neg, gamma_pos, clip, eps, constant_weight):
    """Element-wise ASL as the paper writes it, for hard targets: L+ = (1-p)^g+ log p, L- = p_m^g- log(1-p_m)."""
    p = torch.sigmoid(x)
    p_m = torch.clamp(p - clip, min=0.0) if clip else p
    w_pos = (1.0 - p) ** gamma_pos
    w_neg = p_m ** gamma_neg
    if constant_weight:
        w_pos, w_neg = w_pos.detach(), w_neg.detach()
    l_pos = w_pos * torch.log(torch.clamp(p, min=eps))
    l_neg = w_neg * torch.log(torch.clamp(1.0 - p_m, min=eps))
    return -(y * l_pos + (1.0 - y) * l_neg)


def value_and_grad(fn, x, y):
    x = x.detach().clone().requires_grad_(True)
    value = fn(x, y)
    (grad,) = torch.autograd.grad(value.sum(), x)
    return value.detach(), grad


def make_batch(seed, n=6, c=5, soft=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=dtype) * 3
    if soft:
        y = torch.rand(n, c, generator=g, dtype=dtype)
    else:
        y = (torch.rand(n, c, generator=g) < 0.4).to(dtype)
    return x, y


SETTINGS = [  # (gamma_neg, gamma_pos, clip)
    (4, 1, 0.05),  # constructor defaults
    (4, 0, 0.05),  # the paper's training recipe
    (2, 2, 0.0),   # symmetric focal loss
    (3, 0.5, 0.2),
    (0, 1, None),
]


# ------------------------------------------------------------------------------------------- multi-label tests

@pytest.mark.parametrize("cls", MULTI_LABEL)
@pytest.mark.parametrize("gamma_neg,gamma_pos,clip", SETTINGS)
@pytest.mark.parametrize("constant_weight", [True, False])
@pytest.mark.parametrize("soft", [False, True])
def test_value_and_gradient_match_reference(cls, gamma_neg, gamma_pos, clip, constant_weight, soft):
    x, y = make_batch(seed=gamma_neg * 10 + int(soft), soft=soft)
    loss = cls(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip,
               disable_torch_grad_focal_loss=constant_weight)
    got_v, got_g = value_and_grad(loss, x, y)
    ref_v, ref_g = value_and_grad(
        lambda a, b: reference_code_form(a, b, gamma_neg, gamma_pos, clip, 1e-8, constant_weight).sum(), x, y)
    assert got_v.shape == ()
    torch.testing.assert_close(got_v, ref_v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_g, ref_g, rtol=1e-10, atol=1e-12)
    if not soft:  # hard targets: the paper's formula is the same function
        pap_v, pap_g = value_and_grad(
            lambda a, b: reference_paper_form(a, b, gamma_neg, gamma_pos, clip, 1e-8, constant_weight).sum(), x, y)
        torch.testing.assert_close(got_v, pap_v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_g, pap_g, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("cls", MULTI_LABEL)
def test_float32_matches_reference(cls):
    x, y = make_batch(seed=3, n=16, c=10, dtype=torch.float32)
    got_v, got_g = value_and_grad(cls(disable_torch_grad_focal_loss=True), x, y)
    ref_v, ref_g = value_and_grad(lambda a, b: reference_code_form(a, b, 4, 1, 0.05, 1e-8, True).sum(), x, y)
    assert got_v.dtype == torch.float32
    torch.testing.assert_close(got_v, ref_v)
    torch.testing.assert_close(got_g, ref_g)


def test_defaults_are_the_originals():
    for cls, constant in [(AsymmetricLoss, True), (AsymmetricLossOptimized, False)]:
        loss = cls()
        assert (loss.gamma_neg, loss.gamma_pos, loss.clip, loss.eps) == (4, 1, 0.05, 1e-8)
        assert loss.disable_torch_grad_focal_loss is constant
        assert loss.reduction == "sum"
    single = ASLSingleLabel()
    assert (single.gamma_pos, single.gamma_neg, single.eps, single.reduction) == (0, 4, 0.1, "mean")


def test_positional_arguments_follow_the_original_order():
    loss = AsymmetricLoss(3, 2, 0.1, 1e-6, False)
    assert (loss.gamma_neg, loss.gamma_pos, loss.clip, loss.eps, loss.disable_torch_grad_focal_loss) == \
        (3, 2, 0.1, 1e-6, False)


def test_full_gradient_passes_gradcheck():
    # With the focal weight differentiated too, the analytic gradient must match finite differences.
    x, y = make_batch(seed=7, n=3, c=4, soft=True)
    loss = AsymmetricLoss(gamma_neg=3, gamma_pos=1, clip=0.05, disable_torch_grad_focal_loss=False)
    assert torch.autograd.gradcheck(lambda a: loss(a, y), (x.clone().requires_grad_(True),))


def test_constant_weight_gradient_is_weight_times_ce_gradient():
    # d/dx of -sum(w * CE) with w constant: w times the gradient of the clipped cross-entropy alone.
    x, y = make_batch(seed=8)
    asl = AsymmetricLoss(gamma_neg=4, gamma_pos=1, clip=0.05, disable_torch_grad_focal_loss=True)
    ce_only = AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0.05)
    _, g = value_and_grad(asl, x, y)
    _, g_ce = value_and_grad(ce_only, x, y)
    p = torch.sigmoid(x)
    q = torch.clamp(1 - p + 0.05, max=1)
    w = (1 - (p * y + q * (1 - y))) ** (1 * y + 4 * (1 - y))
    torch.testing.assert_close(g, w * g_ce, rtol=1e-10, atol=1e-12)


def test_no_focusing_no_clip_is_binary_cross_entropy():
    x, y = make_batch(seed=5, soft=True)
    loss = AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0)
    got_v, got_g = value_and_grad(loss, x, y)
    ref_v, ref_g = value_and_grad(
        lambda a, b: F.binary_cross_entropy_with_logits(a, b, reduction="sum"), x, y)
    torch.testing.assert_close(got_v, ref_v)
    torch.testing.assert_close(got_g, ref_g)


def test_hand_computed_value():
    # One positive with logit 0 (p = 0.5) and one negative with logit 0 under the defaults gamma_pos=1,
    # gamma_neg=4, clip=0.05:
    #   positive: -(1 - 0.5)^1 * log(0.5)            = 0.5 * ln 2
    #   negative: p_m = 0.45, -(0.45)^4 * log(0.55)  = 0.04100625 * -ln 0.55
    x = torch.zeros(1, 2, dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    expected = 0.5 * 0.6931471805599453 + 0.04100625 * 0.5978370007556204
    assert AsymmetricLoss()(x, y).item() == pytest.approx(expected, rel=1e-12)


def test_eps_clamps_the_logarithm():
    # A confidently wrong positive (logit -50): log(max(p, eps)) = log(1e-8), so the loss is finite.
    x = torch.tensor([[-50.0]], dtype=torch.float64)
    y = torch.ones(1, 1, dtype=torch.float64)
    value = AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=0)(x, y)
    assert value.item() == pytest.approx(-torch.log(torch.tensor(1e-8, dtype=torch.float64)).item())


@pytest.mark.parametrize("cls", MULTI_LABEL)
def test_reductions(cls):
    x, y = make_batch(seed=11, soft=True)
    ref = reference_code_form(x, y, 4, 1, 0.05, 1e-8, True)
    torch.testing.assert_close(cls(reduction="none")(x, y), ref)
    torch.testing.assert_close(cls(reduction="mean")(x, y), ref.mean())
    torch.testing.assert_close(cls(reduction="sum")(x, y), ref.sum())
    with pytest.raises(ValueError, match="reduction"):
        cls(reduction="avg")


@pytest.mark.parametrize("cls", MULTI_LABEL)
def test_mask_excludes_entries_from_value_and_gradient(cls):
    x, y = make_batch(seed=12)
    g = torch.Generator().manual_seed(0)
    annotated = torch.rand(y.shape, generator=g) < 0.6
    y_open_images = torch.where(annotated, y, torch.full_like(y, -1.0))  # -1 = not annotated
    loss = cls(gamma_neg=4, gamma_pos=0, clip=0.05, disable_torch_grad_focal_loss=True)

    got_v, got_g = value_and_grad(lambda a, b: loss(a, b, mask=annotated), x, y_open_images)
    ref_elem = lambda a, b: reference_code_form(a, b, 4, 0, 0.05, 1e-8, True)  # noqa: E731
    ref_v, ref_g = value_and_grad(lambda a, b: ref_elem(a[annotated], b[annotated]).sum(), x, y)
    assert torch.isfinite(got_v) and torch.isfinite(got_g).all()
    torch.testing.assert_close(got_v, ref_v)
    torch.testing.assert_close(got_g, ref_g)
    assert (got_g[~annotated] == 0).all()

    mean = cls(reduction="mean")(x, y_open_images, mask=annotated)
    ref_mean = reference_code_form(x[annotated], y[annotated], 4, 1, 0.05, 1e-8, True).mean()
    torch.testing.assert_close(mean, ref_mean)

    everything = torch.ones_like(annotated)
    torch.testing.assert_close(loss(x, y, mask=everything), loss(x, y))
    nothing = torch.zeros_like(annotated)
    assert cls(reduction="mean")(x, y, mask=nothing).item() == 0.0


@pytest.mark.parametrize("cls", MULTI_LABEL)
def test_float_mask_weights_entries(cls):
    x, y = make_batch(seed=13)
    weights = torch.rand(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    ref = (reference_code_form(x, y, 4, 1, 0.05, 1e-8, True) * weights).sum()
    torch.testing.assert_close(cls()(x, y, mask=weights), ref)


@pytest.mark.parametrize("cls", MULTI_LABEL)
@pytest.mark.parametrize("constant_weight", [True, False])
def test_does_not_enable_grad_inside_no_grad(cls, constant_weight):
    x, y = make_batch(seed=1)
    x.requires_grad_(True)
    with torch.no_grad():
        value = cls(disable_torch_grad_focal_loss=constant_weight)(x, y)
        assert not torch.is_grad_enabled()
    assert not value.requires_grad
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("loss", [AsymmetricLoss(), AsymmetricLossOptimized(), ASLSingleLabel()])
def test_module_keeps_no_tensors_between_calls(loss):
    before = dict(vars(loss))
    x = torch.randn(4, 3, requires_grad=True)
    if isinstance(loss, ASLSingleLabel):
        y = torch.tensor([0, 2, 1, 2])
    else:
        y = (torch.rand(4, 3) > 0.5).float()
    loss(x, y).backward()
    assert vars(loss).keys() == before.keys()
    for name, value in vars(loss).items():
        assert not isinstance(value, torch.Tensor), name
    assert list(loss.parameters()) == [] and list(loss.buffers()) == []


@pytest.mark.parametrize("cls", MULTI_LABEL)
def test_fp32_under_bfloat16_autocast(cls):
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 5)
    inputs = torch.randn(6, 8)
    y = (torch.rand(6, 5) > 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(inputs)
        assert logits.dtype == torch.bfloat16
        value = cls()(logits, y)
    assert value.dtype == torch.float32
    ref = reference_code_form(logits.float(), y, 4, 1, 0.05, 1e-8, True).sum()
    torch.testing.assert_close(value, ref)


def test_half_inputs_are_promoted_and_integer_targets_accepted():
    x, y = make_batch(seed=4, dtype=torch.float32)
    value = AsymmetricLoss()(x.half(), y.long())
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, reference_code_form(x.half().float(), y, 4, 1, 0.05, 1e-8, True).sum())


@pytest.mark.parametrize("cls", MULTI_LABEL)
def test_shape_mismatch_raises(cls):
    with pytest.raises(ValueError, match=r"same shape.*\(4, 3\).*\(4, 2\)"):
        cls()(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="mask"):
        cls()(torch.zeros(4, 3), torch.zeros(4, 3), mask=torch.ones(4))


# ------------------------------------------------------------------------------------------ single-label tests

def reference_single_label(x, target, gamma_pos, gamma_neg, eps):
    """The single-label ASL written per class: (1-p)^g+ on the true class, p^g- elsewhere, label smoothing."""
    n, c = x.shape
    log_p = torch.log_softmax(x, dim=1)
    p = torch.softmax(x, dim=1)
    losses = []
    for i in range(n):
        total = 0.0
        for k in range(c):
            if k == target[i]:
                weight = (1 - p[i, k]) ** gamma_pos
                t = 1.0 - eps + eps / c
            else:
                weight = p[i, k] ** gamma_neg
                t = eps / c
            total = total - t * weight * log_p[i, k]
        losses.append(total)
    return torch.stack(losses)


@pytest.mark.parametrize("gamma_pos,gamma_neg,eps", [(0, 4, 0.1), (1, 2, 0.0), (0.5, 3, 0.2), (0, 0, 0.1)])
def test_single_label_matches_reference(gamma_pos, gamma_neg, eps):
    g = torch.Generator().manual_seed(int(10 * gamma_neg + 100 * eps))
    x = torch.randn(5, 4, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, 4, (5,), generator=g)
    loss = ASLSingleLabel(gamma_pos=gamma_pos, gamma_neg=gamma_neg, eps=eps)
    got_v, got_g = value_and_grad(loss, x, target)
    ref_v, ref_g = value_and_grad(
        lambda a, b: reference_single_label(a, b, gamma_pos, gamma_neg, eps).mean(), x, target)
    torch.testing.assert_close(got_v, ref_v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_g, ref_g, rtol=1e-8, atol=1e-12)
    per_sample = ASLSingleLabel(gamma_pos=gamma_pos, gamma_neg=gamma_neg, eps=eps, reduction="none")(x, target)
    torch.testing.assert_close(per_sample, reference_single_label(x, target, gamma_pos, gamma_neg, eps))
    torch.testing.assert_close(loss(x, target, reduction="sum"), per_sample.sum())


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_single_label_without_focusing_is_label_smoothed_cross_entropy(eps):
    torch.manual_seed(0)
    x = torch.randn(8, 6)
    target = torch.randint(0, 6, (8,))
    got_v, got_g = value_and_grad(ASLSingleLabel(gamma_pos=0, gamma_neg=0, eps=eps), x, target)
    ref_v, ref_g = value_and_grad(lambda a, b: F.cross_entropy(a, b, label_smoothing=eps), x, target)
    torch.testing.assert_close(got_v, ref_v)
    torch.testing.assert_close(got_g, ref_g)


def test_single_label_gradient_flows_through_weight():
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([1, 0, 3])
    loss = ASLSingleLabel(gamma_pos=1, gamma_neg=2, eps=0.1)
    assert torch.autograd.gradcheck(lambda a: loss(a, target), (x.clone().requires_grad_(True),))


def test_single_label_fp32_under_autocast_and_no_grad():
    torch.manual_seed(1)
    layer = torch.nn.Linear(8, 5)
    target = torch.randint(0, 5, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(torch.randn(6, 8))
        value = ASLSingleLabel()(logits, target)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, reference_single_label(logits.float(), target, 0, 4, 0.1).mean())
    with torch.no_grad():
        ASLSingleLabel()(logits, target)
        assert not torch.is_grad_enabled()


def test_single_label_rejects_wrong_targets():
    loss = ASLSingleLabel()
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="one class index per sample"):
        loss(x, torch.zeros(4, 3))  # one-hot targets
    with pytest.raises(ValueError, match="one class index per sample"):
        loss(x, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        loss(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="reduction"):
        ASLSingleLabel(reduction="avg")


def test_reprs_show_the_settings():
    assert "gamma_neg=4" in repr(AsymmetricLoss()) and "reduction='sum'" in repr(AsymmetricLoss())
    assert "eps=0.1" in repr(ASLSingleLabel())


def test_settings_grid_is_deterministic():
    # Same inputs twice give bit-identical results (no state carried over between calls).
    x, y = make_batch(seed=21, soft=True)
    for cls, constant in itertools.product(MULTI_LABEL, [True, False]):
        loss = cls(disable_torch_grad_focal_loss=constant)
        assert torch.equal(loss(x, y), loss(x, y))


# ------------------------------------------------------------ clamp edges, reductions and masks against autograd

GRID_SETTINGS = [  # (gamma_neg, gamma_pos, clip)
    (4, 0, 0.05),  # the paper's recipe
    (4, 1, 0.05),  # constructor defaults
    (2, 2, 0),     # symmetric focal loss
    (0, 0, 0),     # plain binary cross-entropy
    (1, 0, None),
]
REDUCTIONS = ["sum", "mean", "none"]


def logit_grid(seed, n=12, c=40, dtype=torch.float64):
    """Logits up to |30| (the eps clamp is active on positives below about -18.4, and on negatives above 18.4 without
    a margin) and some exactly on the margin's edge, where 1 - p + 0.05 rounds to 1."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, c, generator=g, dtype=torch.float64) * 2 - 1) * 30
    x[0, :20] = torch.logit(torch.tensor(0.05, dtype=torch.float64)) + torch.linspace(-1e-6, 1e-6, 20,
                                                                                     dtype=torch.float64)
    x = x.to(dtype)
    assert (x > 18.5).any() and (x < -18.5).any()
    return x


def reduce_like_loss(elementwise, mask, reduction):
    if mask is not None:
        elementwise = elementwise * mask.to(elementwise.dtype)
    if reduction == "none":
        return elementwise
    total = elementwise.sum()
    if reduction == "sum":
        return total
    return total / (mask.sum() if mask is not None else elementwise.numel())


def loss_value_and_grad(fn, x, upstream):
    x = x.detach().clone().requires_grad_(True)
    value = fn(x)
    (grad,) = torch.autograd.grad(value, x, upstream)
    return value.detach(), grad


@pytest.mark.parametrize("gamma_neg,gamma_pos,clip", GRID_SETTINGS)
@pytest.mark.parametrize("constant_weight", [True, False])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("cls", MULTI_LABEL)
def test_masks_and_reductions_match_autograd_reference(cls, gamma_neg, gamma_pos, clip, constant_weight, soft,
                                                       masked):
    x = logit_grid(seed=gamma_neg + 10 * gamma_pos + 100 * int(soft))
    g = torch.Generator().manual_seed(1)
    y = torch.rand(x.shape, generator=g, dtype=x.dtype) if soft else (torch.rand(x.shape, generator=g) < 0.3).to(
        x.dtype)
    mask = None
    y_given = y
    if masked:
        mask = torch.rand(x.shape, generator=g) < 0.7
        y_given = torch.where(mask, y, torch.full_like(y, -1.0))  # -1 = not annotated
    for reduction in REDUCTIONS:
        loss = cls(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip,
                   disable_torch_grad_focal_loss=constant_weight, reduction=reduction)
        upstream = torch.randn(x.shape, generator=g, dtype=x.dtype) if reduction == "none" else torch.tensor(
            1.5, dtype=x.dtype)
        got_v, got_g = loss_value_and_grad(lambda a: loss(a, y_given, mask=mask), x, upstream)
        ref_v, ref_g = loss_value_and_grad(
            lambda a: reduce_like_loss(
                reference_code_form(a, y, gamma_neg, gamma_pos, clip, 1e-8, constant_weight), mask, reduction),
            x, upstream)
        assert got_v.dtype == torch.float64 and got_g.dtype == torch.float64
        torch.testing.assert_close(got_v, ref_v, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_g, ref_g, rtol=1e-10, atol=1e-12)
        if masked:
            assert (got_g[~mask] == 0).all()
            if reduction == "none":
                assert (got_v[~mask] == 0).all()


@pytest.mark.parametrize("gamma_neg,gamma_pos,clip", GRID_SETTINGS + [(0, 1, 0.05), (0, 0, 0.05)])
@pytest.mark.parametrize("constant_weight", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cls", MULTI_LABEL)
def test_margin_edge_follows_clamp(cls, gamma_neg, gamma_pos, clip, constant_weight, dtype):
    # Logits where 1 - p + clip is 1 exactly (and its neighbours): the clamp's gradient convention at its bound
    # decides the negatives' gradient there when gamma_neg is 0; the loss must follow torch.clamp's.
    centre = torch.logit(torch.tensor(0.05, dtype=torch.float64))
    x = (centre + torch.linspace(-1e-6, 1e-6, 401, dtype=torch.float64)).to(dtype).reshape(1, -1)
    if clip:
        assert ((1 - torch.sigmoid(x) + clip) == 1).any()
    y = torch.zeros_like(x)
    y[0, ::7] = 1
    loss = cls(gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip, disable_torch_grad_focal_loss=constant_weight)
    got_v, got_g = value_and_grad(loss, x, y)
    ref_v, ref_g = value_and_grad(
        lambda a, b: reference_code_form(a, b, gamma_neg, gamma_pos, clip, 1e-8, constant_weight).sum(), x, y)
    tight = dtype == torch.float64
    torch.testing.assert_close(got_v, ref_v, rtol=1e-12 if tight else 1e-5, atol=0)
    torch.testing.assert_close(got_g, ref_g, rtol=1e-10 if tight else 1e-5, atol=1e-12 if tight else 1e-7)


@pytest.mark.parametrize("constant_weight", [True, False])
def test_float32_recipe_within_1e5_of_reference(constant_weight):
    x = logit_grid(seed=5, n=32, c=100, dtype=torch.float32)
    y = (torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) < 0.1).float()
    loss = AsymmetricLoss(gamma_neg=4, gamma_pos=0, clip=0.05, disable_torch_grad_focal_loss=constant_weight)
    got_v, got_g = value_and_grad(loss, x, y)
    ref_v, ref_g = value_and_grad(lambda a, b: reference_code_form(a, b, 4, 0, 0.05, 1e-8, constant_weight).sum(),
                                  x, y)
    assert got_v.dtype == torch.float32
    torch.testing.assert_close(got_v, ref_v, rtol=1e-5, atol=0)
    torch.testing.assert_close(got_g, ref_g, rtol=1e-5, atol=1e-5 * ref_g.abs().max().item())


def test_optimized_weight_gradient_passes_gradcheck():
    # Hard targets, the gradient through the focal weight (the in-place variant's default): the true derivative.
    x, y = make_batch(seed=9, n=4, c=5)
    loss = AsymmetricLossOptimized(gamma_neg=4, gamma_pos=1, clip=0.05)
    assert torch.autograd.gradcheck(lambda a: loss(a, y), (x.clone().requires_grad_(True),))


@pytest.mark.parametrize("cls", MULTI_LABEL)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_grad_and_inference_mode_give_the_same_values(cls, reduction):
    x = logit_grid(seed=7)
    y = (torch.rand(x.shape, generator=torch.Generator().manual_seed(4)) < 0.3).to(x.dtype)
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) < 0.8
    loss = cls(reduction=reduction)
    x_leaf = x.clone().requires_grad_(True)
    with_grad = loss(x_leaf, y, mask=mask)
    assert torch.is_grad_enabled() and with_grad.requires_grad
    with torch.no_grad():
        without = loss(x_leaf, y, mask=mask)
        assert not torch.is_grad_enabled()
    with torch.inference_mode():
        inference = loss(x, y, mask=mask)
    assert torch.is_grad_enabled()
    assert not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(inference, with_grad.detach(), rtol=1e-12, atol=0)


def test_targets_that_require_grad_still_get_autograd_gradients():
    x, y = make_batch(seed=10, soft=True)
    y = y.clone().requires_grad_(True)
    x = x.clone().requires_grad_(True)
    AsymmetricLoss()(x, y).backward()
    x_ref, y_ref = x.detach().clone().requires_grad_(True), y.detach().clone().requires_grad_(True)
    reference_code_form(x_ref, y_ref, 4, 1, 0.05, 1e-8, True).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y.grad, y_ref.grad, rtol=1e-10, atol=1e-12)


def test_half_logits_get_a_half_gradient():
    x, y = make_batch(seed=11, dtype=torch.float32)
    x_half = x.half().requires_grad_(True)
    value = AsymmetricLoss(gamma_neg=4, gamma_pos=0, clip=0.05)(x_half, y)
    value.backward()
    assert value.dtype == torch.float32 and x_half.grad.dtype == torch.float16
    _, ref_g = value_and_grad(lambda a, b: reference_code_form(a, b, 4, 0, 0.05, 1e-8, True).sum(),
                              x_half.detach().float(), y)
    torch.testing.assert_close(x_half.grad, ref_g.half())


# ----------------------------------------------------------------------------------------- targets of -1, no mask

def test_targets_of_minus_one_without_a_mask_warn_on_the_first_call_only():
    x, y = make_batch(seed=1)
    y[0, 0] = -1
    loss = AsymmetricLoss()
    with pytest.warns(UserWarning, match="targets below 0 .* and no mask"):
        loss(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss(x, y)  # checked once per instance: no read of the targets on later steps
        AsymmetricLoss()(x, y, mask=y >= 0)
        clean = AsymmetricLossOptimized()
        clean(x, y.clamp(min=0))
        clean(x, y)  # only the first call is checked
