"""The two private aten ops of the memory-saving norm (asl.models.aten_ops) against formulas written out here."""
import pytest
import torch
import torch.nn.functional as F

from asl.models.aten_ops import batch_norm_backward, batch_norm_with_invstd


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_with_invstd_is_f_batch_norm_plus_the_batch_statistics(channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, 7, generator=g) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(6, generator=g) + 0.5, torch.randn(6, generator=g)
    stats = [torch.randn(6, generator=g), torch.rand(6, generator=g) + 0.5]
    ours_stats, reference_stats = [s.clone() for s in stats], [s.clone() for s in stats]

    out, invstd = batch_norm_with_invstd(x, weight, bias, *ours_stats, True, 0.1, 1e-5)
    expected = F.batch_norm(x, *reference_stats, weight, bias, True, 0.1, 1e-5)
    assert torch.equal(out, expected)  # the very kernel F.batch_norm runs
    assert all(torch.equal(a, b) for a, b in zip(ours_stats, reference_stats))
    var = x.double().var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(invstd.double(), 1 / torch.sqrt(var + 1e-5), rtol=1e-6, atol=0)


def test_batch_norm_backward_is_the_written_out_gradient():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    weight = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    dims, view = (0, 2, 3), (1, -1, 1, 1)
    mean = x.mean(dims)
    invstd = 1 / torch.sqrt(x.var(dims, unbiased=False) + 1e-5)

    grad_x, sum_xhat_dy, sum_dy = batch_norm_backward(dy, x, weight, mean, invstd, True)
    xhat = (x - mean.view(view)) * invstd.view(view)
    count = x.numel() / x.shape[1]
    expected_x = (weight * invstd).view(view) * (dy - dy.sum(dims).view(view) / count
                                                 - xhat * (dy * xhat).sum(dims).view(view) / count)
    torch.testing.assert_close(grad_x, expected_x, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sum_xhat_dy, (dy * xhat).sum(dims), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sum_dy, dy.sum(dims), rtol=1e-10, atol=1e-12)
    assert batch_norm_backward(dy, x, weight, mean, invstd, False)[0] is None


def test_leaky_relu_backward_scales_where_the_output_is_not_positive():
    result = torch.tensor([-2.0, -0.0, 0.0, 1e-30, 3.0])
    grad = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    from asl.models.aten_ops import leaky_relu_backward

    assert torch.equal(leaky_relu_backward(grad, result, 0.01), torch.tensor([0.01, 0.02, 0.03, 4.0, 5.0]))
    assert torch.equal(leaky_relu_backward(result, result, 100.0), torch.tensor([-200.0, -0.0, 0.0, 1e-30, 3.0]))
