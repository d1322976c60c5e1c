"""PartialSelectiveLoss (CSL, CVPR 2022) against the official formulation written out here entry by entry."""
import itertools

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from asl.errors import UsageError
from asl.losses import PARTIAL_LOSS_MODES, PartialSelectiveLoss

MODES = list(PARTIAL_LOSS_MODES)


# --------------------------------------------------------------------------------------- the independent statement

def stated_label_weights(label, q, mode, topk, prior, threshold):
    """The mode's weight r of each entry (1 unless the mode says otherwise)."""
    n, c = len(label), len(label[0])
    r = [[1.0] * c for _ in range(n)]
    if mode == "ignore":
        r = [[0.0 if label[i][j] == -1 else 1.0 for j in range(c)] for i in range(n)]
    elif mode == "ignore_normalize_classes":
        for i in range(n):
            annotated = sum(1 for j in range(c) if label[i][j] != -1)
            g = float(np.float32(1) / np.float32(1 + annotated) + np.float32(1))  # the official's float32 weight
            r[i] = [0.0 if label[i][j] == -1 else g for j in range(c)]
    elif mode == "selective":
        if prior is not None and threshold:
            for i, j in itertools.product(range(n), range(c)):
                if label[i][j] == -1 and np.float32(prior[j]) > np.float32(threshold):
                    r[i][j] = 0.0
        unknown = sorted((q[i][j].item(), i, j) for i in range(n) for j in range(c) if label[i][j] == -1)
        for _, i, j in unknown[:topk * n]:  # the most likely positives among all unknown labels of the batch
            r[i][j] = 0.0
    return r


def stated_loss(x, t, *, mode, gamma_pos=0.0, gamma_neg=1.0, gamma_unann=2.0, alpha_pos=1.0, alpha_neg=1.0,
                alpha_unann=1.0, clip=0.0, topk=5, prior=None, threshold=0.05):
    """The CSL loss as the paper and the official code state it, one entry at a time, in float64.

    p = sigmoid(x); q = min(1 - p + clip, 1). Positives: alpha_pos (1-p)^gamma_pos log p; annotated negatives:
    alpha_neg (1-q)^gamma_neg log q; unknown: alpha_unann (1-q)^gamma_unann log q. Probabilities below 1e-8 are
    raised to 1e-8 inside the logs. The focusing factors and the mode's weight r are constants. Loss = -sum r * term.
    """
    n, c = t.shape
    one = torch.ones((), dtype=torch.float64)
    p = [[torch.sigmoid(x[i, j]) for j in range(c)] for i in range(n)]
    q = [[None] * c for _ in range(n)]
    for i, j in itertools.product(range(n), range(c)):
        qij = 1 - p[i][j]
        if clip:
            qij = qij + clip
            if qij.item() > 1:
                qij = one  # beyond the margin: the constant 1, no gradient
        q[i][j] = qij

    label = [[float(t[i, j]) for j in range(c)] for i in range(n)]
    r = stated_label_weights(label, q, mode, topk, prior, threshold)

    total = torch.zeros((), dtype=torch.float64)
    for i, j in itertools.product(range(n), range(c)):
        pij, qij, y = p[i][j], q[i][j], label[i][j]
        if y == 1:
            term = alpha_pos * (1 - pij.item()) ** gamma_pos * torch.log(pij if pij.item() >= 1e-8 else 1e-8 * one)
        elif y in (0, -1):
            gamma, alpha = (gamma_neg, alpha_neg) if y == 0 else (gamma_unann, alpha_unann)
            term = alpha * (1 - qij.item()) ** gamma * torch.log(qij if qij.item() >= 1e-8 else 1e-8 * one)
        else:
            continue
        total = total + r[i][j] * term
    return -total


def value_and_grad(fn, x, t):
    x = x.detach().clone().requires_grad_(True)
    value = fn(x, t)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


def make_batch(seed, n=6, c=7, unknown=0.35, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=dtype) * scale
    t = (torch.rand(n, c, generator=g) < 0.3).to(dtype)
    t[torch.rand(n, c, generator=g) < unknown] = -1
    return x, t


PRIOR = [0.01, 0.2, 0.04, 0.3, 0.06, 0.0, 0.12]  # classes 1, 3, 4 and 6 exceed 0.05


# ------------------------------------------------------------------------------------------------------ values

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("clip", [0.0, 0.05])
@pytest.mark.parametrize("prior", [None, PRIOR])
@pytest.mark.parametrize("topk", [1, 5])
def test_value_and_gradient_match_the_statement(mode, clip, prior, topk):
    x, t = make_batch(seed=MODES.index(mode) * 7 + topk)
    loss = PartialSelectiveLoss(partial_loss_mode=mode, clip=clip, prior=prior, likelihood_topk=topk)
    got_v, got_g = value_and_grad(loss, x, t)
    ref_v, ref_g = value_and_grad(
        lambda a, b: stated_loss(a, b, mode=mode, clip=clip, prior=prior, topk=topk), x, t)
    assert got_v.dtype == torch.float64 and got_v.shape == ()
    torch.testing.assert_close(got_v, ref_v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_g, ref_g, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_other_gammas_alphas_and_saturated_logits(mode):
    settings = dict(gamma_pos=1.5, gamma_neg=3, gamma_unann=0.5, alpha_pos=2, alpha_neg=0.7, alpha_unann=0.3)
    x, t = make_batch(seed=11, n=5, c=7)
    x[0, :3] = torch.tensor([40.0, -40.0, 25.0], dtype=x.dtype)  # logs clamped at 1e-8 somewhere
    t[0, :3] = torch.tensor([0.0, 1.0, -1.0], dtype=t.dtype)
    loss = PartialSelectiveLoss(partial_loss_mode=mode, clip=0.1, prior=PRIOR, likelihood_topk=1, **settings)
    got_v, got_g = value_and_grad(loss, x, t)
    ref_v, ref_g = value_and_grad(lambda a, b: stated_loss(
        a, b, mode=mode, clip=0.1, prior=PRIOR, topk=1, **settings), x, t)
    torch.testing.assert_close(got_v, ref_v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_g, ref_g, rtol=1e-6, atol=1e-6)


def test_no_focusing_and_a_threshold_of_zero_turns_the_prior_off():
    x, t = make_batch(seed=5)
    loss = PartialSelectiveLoss(partial_loss_mode="selective", gamma_pos=0, gamma_neg=0, gamma_unann=0,
                                prior=PRIOR, prior_threshold=0, likelihood_topk=1)
    got_v, got_g = value_and_grad(loss, x, t)
    ref_v, ref_g = value_and_grad(lambda a, b: stated_loss(
        a, b, mode="selective", gamma_pos=0, gamma_neg=0, gamma_unann=0, prior=None, topk=1), x, t)
    torch.testing.assert_close(got_v, ref_v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_g, ref_g, rtol=1e-6, atol=1e-6)


def test_selective_counts_exactly_topk_per_image_of_the_unknown_labels():
    # Every label unknown, no clip, no focusing: the loss is the sum of -log(1-p) over the kept labels, and the
    # k*N ignored ones are those with the highest p.
    x = torch.randn(4, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = -torch.ones_like(x)
    loss = PartialSelectiveLoss(partial_loss_mode="selective", gamma_unann=0, likelihood_topk=3)
    kept = torch.sort(torch.sigmoid(x).reshape(-1)).values[:-12]
    torch.testing.assert_close(loss(x, t), -torch.log(1 - kept).sum(), rtol=1e-12, atol=1e-12)


def test_float32_and_half_inputs():
    x, t = make_batch(seed=2, n=8, c=7)
    ref = stated_loss(x, t, mode="selective", clip=0.05, prior=PRIOR, topk=1)
    loss = PartialSelectiveLoss(partial_loss_mode="selective", clip=0.05, prior=PRIOR, likelihood_topk=1)
    got32 = loss(x.float(), t.float())
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), ref, rtol=1e-5, atol=1e-5)
    got16 = loss(x.half(), t.half())
    assert got16.dtype == torch.float32  # computed in float32, as the official on model(x).float()
    ref16 = stated_loss(x.half().double(), t, mode="selective", clip=0.05, prior=PRIOR, topk=1)
    torch.testing.assert_close(got16.double(), ref16, rtol=1e-5, atol=1e-5)


def test_targets_of_other_values_count_for_nothing_and_inputs_are_untouched():
    x, t = make_batch(seed=9)
    t2 = t.clone()
    t2[0, 0] = 0.5
    x_copy, t_copy = x.clone(), t2.clone()
    loss = PartialSelectiveLoss(partial_loss_mode="negative")
    assert torch.allclose(loss(x, t2), stated_loss(x, t2, mode="negative"), rtol=1e-9)
    assert torch.equal(x, x_copy) and torch.equal(t2, t_copy)


# ------------------------------------------------------------------------------------------------- no host sync

class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        if str(func.overloadpacket) == "aten.index_put_" or str(func.overloadpacket) == "aten.index":
            indices = args[1] if len(args) > 1 else []
            assert not any(i is not None and i.dtype == torch.bool for i in indices), "boolean indexing"
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", MODES)
def test_no_data_dependent_shapes_and_no_reads_to_the_host(mode):
    x, t = make_batch(seed=1, n=8, c=20, dtype=torch.float32)
    x.requires_grad_(True)
    loss = PartialSelectiveLoss(partial_loss_mode=mode, clip=0.05, prior=[0.1] * 20)
    with _RecordOps() as rec:
        loss(x, t).backward()
    banned = {"aten.nonzero", "aten.masked_select", "aten._local_scalar_dense", "aten.unique", "aten.item",
              "aten.argwhere", "aten.nonzero_static"}
    assert not banned & set(rec.ops), banned & set(rec.ops)


# ------------------------------------------------------------------------------------------------------- the prior

def write_authors_layout(path, values, names=None):
    """The layout of the authors' outputs/priors/prior_fpc_1000.csv: a header, one row a class, then a stray
    line holding a single field."""
    names = names or [f"class {i}" for i in range(len(values))]
    rows = ["Classes,avg_pred"] + [f"{n},{v}" for n, v in zip(names, values)] + ["1542867"]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def test_the_authors_file_layout_loads_80_classes_and_acts_as_the_same_numbers(tmp_path):
    rng = np.random.default_rng(0)
    values = [float(v) for v in rng.uniform(0, 0.15, 80).astype(np.float32)]
    path = write_authors_layout(tmp_path / "prior_fpc_1000.csv", values)
    from_file = PartialSelectiveLoss(partial_loss_mode="selective", prior=str(path))
    assert from_file.prior.shape == (80,)
    assert from_file.prior.tolist() == pytest.approx(values, rel=0, abs=0)
    x, t = make_batch(seed=4, n=4, c=80)
    ref = stated_loss(x, t, mode="selective", prior=values, topk=5)
    torch.testing.assert_close(from_file(x, t), ref, rtol=1e-6, atol=1e-6)
    from pathlib import Path
    assert PartialSelectiveLoss(partial_loss_mode="selective", prior=Path(path)).prior.shape == (80,)


def test_quoted_names_and_blank_lines(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('Classes,avg_pred\n"hot dog, grilled",0.5\n\nzebra,0.01\n', encoding="utf-8")
    assert PartialSelectiveLoss(prior=path).prior.tolist() == pytest.approx([0.5, 0.01])


def test_a_prior_of_the_wrong_length_is_refused_with_both_counts(tmp_path):
    path = write_authors_layout(tmp_path / "prior.csv", [0.1] * 81)
    loss = PartialSelectiveLoss(partial_loss_mode="selective", prior=path)
    x, t = make_batch(seed=0, n=2, c=80)
    with pytest.raises(UsageError, match="81 classes.* 80") as info:
        loss(x, t)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UsageError, match="3 classes.* 5"):
        PartialSelectiveLoss(prior=[0.1, 0.2, 0.3]).check_num_classes(5)


@pytest.mark.parametrize("content, match", [(None, "cannot read"), (b"\xff\xfe\x00bad", "cannot read"),
                                            (b"Classes,avg_pred\ncat,high\n", "not a number"),
                                            (b"Classes,avg_pred\n", "no 'class,avg_pred' rows")])
def test_unreadable_prior_files_are_one_line(tmp_path, content, match):
    path = tmp_path / "prior.csv"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UsageError, match=match) as info:
        PartialSelectiveLoss(partial_loss_mode="selective", prior=path)
    assert "\n" not in str(info.value)


def test_the_prior_moves_with_the_module_and_is_not_in_the_state_dict():
    loss = PartialSelectiveLoss(prior=PRIOR).to(torch.float64)
    assert loss.prior.dtype == torch.float64
    assert "prior" not in loss.state_dict()


# ---------------------------------------------------------------------------------------------------- arguments

def test_defaults_are_the_official_training_scripts():
    loss = PartialSelectiveLoss()
    assert (loss.gamma_pos, loss.gamma_neg, loss.gamma_unann) == (0, 1, 2)
    assert (loss.alpha_pos, loss.alpha_neg, loss.alpha_unann) == (1, 1, 1)
    assert (loss.clip, loss.partial_loss_mode, loss.likelihood_topk, loss.prior_threshold) == (0, "negative", 5, 0.05)
    assert loss.prior is None
    with pytest.raises(TypeError):
        PartialSelectiveLoss(0, 1)  # keyword-only


@pytest.mark.parametrize("kwargs, match", [({"partial_loss_mode": "selectiv"}, "partial_loss_mode"),
                                           ({"likelihood_topk": -1}, "likelihood_topk"),
                                           ({"likelihood_topk": 2.5}, "likelihood_topk")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(UsageError, match=match):
        PartialSelectiveLoss(**kwargs)


def test_unknown_labels_tied_at_the_kth_likelihood_are_taken_in_row_major_order():
    x = torch.full((3, 4), 2.0, dtype=torch.float64)
    x[0, 0] = 5.0  # the most likely unknown label
    t = -torch.ones_like(x)
    t[1, 1] = 1
    loss = PartialSelectiveLoss(partial_loss_mode="selective", gamma_unann=0, likelihood_topk=1)  # k = 3
    _, grad = value_and_grad(loss, x, t)
    ignored = (grad == 0).nonzero().tolist()
    assert ignored == [[0, 0], [0, 1], [0, 2]]
    ref_v, ref_g = value_and_grad(lambda a, b: stated_loss(a, b, mode="selective", gamma_unann=0, topk=1), x, t)
    torch.testing.assert_close(grad, ref_g, rtol=1e-9, atol=1e-12)
