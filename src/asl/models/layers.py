"""Building blocks of TResNet, written so that the official checkpoints load unchanged.

The original code relies on the `inplace_abn` CUDA extension and on TorchScript classes that pin the
anti-alias filter to CUDA/fp16. Here every layer is plain PyTorch: it runs on any device and dtype, under
autocast, and keeps exactly the parameter and buffer names of the official state dicts.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ModelError
from .aten_ops import batch_norm_backward, batch_norm_with_invstd, leaky_relu_backward

__all__ = ["ABN", "conv_abn", "SpaceToDepth", "AntiAliasDownsample", "SEModule", "GlobalAvgPool", "BottleneckHead"]


class _SignedAbs(torch.autograd.Function):
    """``|w|`` whose derivative is ``-1`` where ``w < 0`` and ``+1`` elsewhere, zero included.

    original (inplace_abn backward): the weight gradient is negated only where ``weight < 0``. Autograd's ``abs``
    has derivative ``sign(0) = 0`` instead, which would freeze every norm weight that sits at exactly 0 (TResNet
    zero-initialises the last norm of each residual branch, so training from scratch would never open them).
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return weight.abs()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (weight,) = ctx.saved_tensors
        return torch.where(weight < 0, -grad, grad)


class _ABNFunction(torch.autograd.Function):
    """BatchNorm (scale ``|w| + eps``) + leaky ReLU/identity that keeps only its *output* for backward.

    This is InPlaceABN's memory trick in plain PyTorch. Backward recomputes the normalised input from the
    output: the leaky ReLU is inverted (its slope is positive), then the affine map (``|w| + eps`` is never 0,
    which is why InPlaceABN takes the absolute value). The output is usually kept by the next layer anyway, so
    the norm costs no extra activation memory, where BatchNorm + activation keep two tensors. The forward runs
    the very kernel ``F.batch_norm`` runs, so the outputs are bit-identical to the plain path.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training: bool, momentum: float, eps: float,
                slope: Optional[float]):
        scale = weight.abs() + eps
        out, save_invstd = batch_norm_with_invstd(x, scale, bias, running_mean, running_var, training, momentum, eps)
        if slope is not None:
            F.leaky_relu(out, slope, inplace=True)
        invstd = save_invstd if training else torch.rsqrt(running_var + eps)
        ctx.save_for_backward(out, weight, bias, invstd)
        ctx.training, ctx.eps, ctx.slope, ctx.x_dtype = training, eps, slope, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        y, weight, bias, invstd = ctx.saved_tensors
        grad_out = grad_out.contiguous(memory_format=_memory_format(y))
        if ctx.slope is not None:
            # Undo the activation on the output and on its gradient: where y <= 0, y was multiplied by the slope
            # (positive, so the sign tells the side).
            grad_out = leaky_relu_backward(grad_out, y, ctx.slope)
            y = leaky_relu_backward(y, y, 1.0 / ctx.slope)
        stats_dtype = invstd.dtype
        scale = weight.detach().to(stats_dtype).abs() + ctx.eps
        if ctx.training:
            # PyTorch's fused batch-norm backward, fed the *output* as its input: with mean = bias and
            # invstd = 1 / scale it recovers xhat = (y - bias) / scale, and the weight scale^2 * invstd turns its
            # input gradient into scale * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)), InPlaceABN's.
            grad_x, sum_xhat_dy, sum_dy = batch_norm_backward(
                grad_out, y, scale * scale * invstd, bias.detach().to(stats_dtype), scale.reciprocal(),
                ctx.needs_input_grad[0])
        else:
            view = (1, -1) + (1,) * (y.dim() - 2)
            dims = [0, *range(2, y.dim())]
            xhat = (y.to(stats_dtype) - bias.to(stats_dtype).view(view)) / scale.view(view)
            sum_dy = grad_out.to(stats_dtype).sum(dims)
            sum_xhat_dy = (xhat * grad_out.to(stats_dtype)).sum(dims)
            grad_x = grad_out * (scale * invstd).view(view).to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        if grad_x is not None:
            grad_x = grad_x.to(ctx.x_dtype)
        # original (inplace_abn): dweight = sum(xhat * dy), negated only where weight < 0 (0 counts as positive).
        grad_w = torch.where(weight < 0, -sum_xhat_dy, sum_xhat_dy).to(weight.dtype)
        return grad_x, grad_w, sum_dy.to(bias.dtype), None, None, None, None, None, None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class ABN(nn.Module):
    """BatchNorm + activation with InPlaceABN's parameterisation.

    InPlaceABN multiplies by ``|weight| + eps`` instead of ``weight`` (it must be able to invert the
    activation in place, which needs a positive scale). The official checkpoints store the raw ``weight``,
    so loading them into an ordinary ``BatchNorm2d`` would silently change the network: we reproduce the
    absolute value here. The state dict holds ``weight, bias, running_mean, running_var`` and, like the
    official files, no ``num_batches_tracked``.

    Gradients are InPlaceABN's, including its rule for a weight of exactly 0. With ``memory_efficient`` (the
    default, as InPlaceABN was the original's) training keeps only the output for backward; otherwise autograd
    differentiates the plain ops, which keeps the input too.
    """

    def __init__(self, num_features: int, activation: str = "leaky_relu", activation_param: float = 0.01,
                 eps: float = 1e-5, momentum: float = 0.1, memory_efficient: bool = True) -> None:
        super().__init__()
        if activation not in ("leaky_relu", "identity"):
            raise ValueError(f"unsupported activation {activation!r}; expected 'leaky_relu' or 'identity'")
        self.num_features = num_features
        self.activation = activation
        self.activation_param = float(activation_param)
        self.eps = eps
        self.momentum = momentum
        self.memory_efficient = memory_efficient
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def effective_scale(self) -> torch.Tensor:
        # original (inplace_abn): the affine scale is |w| + eps, in training and in eval alike.
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return _SignedAbs.apply(self.weight) + self.eps
        return self.weight.abs() + self.eps

    def _needs_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad or self.bias.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slope = self.activation_param if self.activation == "leaky_relu" else None
        if self.memory_efficient and self.training and self._needs_grad(x):
            return _ABNFunction.apply(x, self.weight, self.bias, self.running_mean, self.running_var,
                                      self.training, self.momentum, self.eps, slope)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.effective_scale(), self.bias,
                         self.training, self.momentum, self.eps)
        if slope is not None:
            x = F.leaky_relu(x, slope, inplace=True)
        return x

    def extra_repr(self) -> str:
        act = self.activation if self.activation == "identity" else f"leaky_relu({self.activation_param:g})"
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, activation={act}, "
                f"memory_efficient={self.memory_efficient}")


def conv_abn(in_channels: int, out_channels: int, stride: int = 1, kernel_size: int = 3,
             activation: str = "leaky_relu", activation_param: float = 1e-2) -> nn.Sequential:
    """Conv (no bias) followed by ABN; a Sequential so the keys are ``<name>.0.weight`` / ``<name>.1.*``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        ABN(out_channels, activation=activation, activation_param=activation_param),
    )


class SpaceToDepth(nn.Module):
    """Rearranges each 4x4 pixel block into channels: (N, C, H, W) -> (N, 16C, H/4, W/4).

    Channel order matters for the official stem weights: the block offsets vary slowest, the input
    channel fastest (index = (dy * 4 + dx) * C + c).
    """

    def __init__(self, block_size: int = 4) -> None:
        super().__init__()
        self.block_size = block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        b = self.block_size
        if h % b or w % b:
            raise ModelError(f"TResNet needs an input size divisible by {b}, got {h}x{w}")
        x = x.view(n, c, h // b, b, w // b, b)
        x = x.permute(0, 3, 5, 1, 2, 4).contiguous()
        return x.view(n, c * b * b, h // b, w // b)


class AntiAliasDownsample(nn.Module):
    """Fixed 3x3 binomial blur ([1,2,1] x [1,2,1] / 16), reflect padding, stride 2, one filter per channel.

    The filter is a non-persistent buffer: it follows ``.to(device, dtype)`` yet, as in the official files,
    never appears in the state dict. (The original kept it in a TorchScript class hard-wired to ``.cuda().half()``.)
    """

    def __init__(self, channels: int, stride: int = 2) -> None:
        super().__init__()
        self.channels = channels
        self.stride = stride
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = taps[:, None] * taps[None, :]
        kernel = kernel / kernel.sum()
        self.register_buffer("filt", kernel.expand(channels, 1, 3, 3).clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _Blur.apply(x, self.filt, self.stride)
        return _blur(x, self.filt, self.stride)


def _blur(x: torch.Tensor, filt: torch.Tensor, stride: int) -> torch.Tensor:
    x = F.pad(x, (1, 1, 1, 1), mode="reflect")
    return F.conv2d(x, filt.to(x.dtype), stride=stride, groups=x.shape[1])


class _Blur(torch.autograd.Function):
    """The fixed blur, keeping nothing for backward.

    Autograd would keep the padded input for the convolution's backward, an extra activation at each
    downsampling. The blur is linear with a constant filter, so its backward does not depend on the input: it is
    the transposed convolution of the output gradient, then the adjoint of the reflect padding (each border row
    and column of the padded gradient is added to the row or column it mirrored). Written out in plain ops, so that
    ``torch.compile`` traces it into the same graph.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, filt: torch.Tensor, stride: int) -> torch.Tensor:
        ctx.shape, ctx.dtype, ctx.stride = x.shape, x.dtype, stride
        ctx.save_for_backward(filt)
        return _blur(x, filt, stride)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (filt,) = ctx.saved_tensors
        height, width = ctx.shape[-2] + 2, ctx.shape[-1] + 2  # the padded input's size
        grad_out = grad_out.to(ctx.dtype)
        # output_padding makes the transposed convolution reach the padded size that the strided one cropped.
        extra = [size - ((out - 1) * ctx.stride + 3) for size, out in zip((height, width), grad_out.shape[-2:])]
        padded = F.conv_transpose2d(
            grad_out, filt.to(ctx.dtype), stride=ctx.stride, groups=grad_out.shape[1], output_padding=tuple(extra))
        return _reflect_pad_adjoint(padded), None, None


def _reflect_pad_adjoint(padded: torch.Tensor) -> torch.Tensor:
    """The gradient of ``F.pad(x, (1, 1, 1, 1), mode="reflect")`` with respect to ``x``, given the padded one's."""
    rows = padded[..., 1:-1, :].clone()
    rows[..., 1, :] += padded[..., 0, :]    # padded row 0 is a copy of x's row 1
    rows[..., -2, :] += padded[..., -1, :]  # the last padded row is a copy of x's second-to-last
    grad = rows[..., 1:-1].clone()
    grad[..., 1] += rows[..., 0]
    grad[..., -2] += rows[..., -1]
    return grad


class GlobalAvgPool(nn.Module):
    """Spatial mean; ``flatten`` gives (N, C), otherwise (N, C, 1, 1)."""

    def __init__(self, flatten: bool = True) -> None:
        super().__init__()
        self.flatten = flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.flatten(2).mean(-1)
        return pooled if self.flatten else pooled[:, :, None, None]


class SEModule(nn.Module):
    """Squeeze-and-excitation with 1x1 convs named ``fc1``/``fc2`` as in the official checkpoints."""

    def __init__(self, channels: int, reduction_channels: int) -> None:
        super().__init__()
        self.avg_pool = GlobalAvgPool(flatten=False)
        self.fc1 = nn.Conv2d(channels, reduction_channels, kernel_size=1, bias=True)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(reduction_channels, channels, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(self.relu(self.fc1(self.avg_pool(x))))
        return x * torch.sigmoid(gate)


class BottleneckHead(nn.Module):
    """The Open Images head: Linear(num_features, 512) then Linear(512, num_classes), no activation between.

    Key names follow the official file: ``embedding_generator.0.*`` and ``FC.*``.
    """

    def __init__(self, num_features: int, num_classes: int, bottleneck_features: int = 512) -> None:
        super().__init__()
        self.embedding_generator = nn.Sequential(nn.Linear(num_features, bottleneck_features))
        self.FC = nn.Linear(bottleneck_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.FC(self.embedding_generator(x))


def fold_conv_abn(conv: nn.Conv2d, abn: ABN) -> tuple[nn.Conv2d, Optional[nn.Module]]:
    """Fold an eval-mode ABN into the preceding conv; returns the new conv and the activation left over.

    The folded weight and bias are computed in float64 and rounded once, so that folding adds no rounding of its
    own beyond storing the result.
    """
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True)
    fused = fused.to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        wide = torch.float64
        scale = abn.effective_scale().to(wide) / torch.sqrt(abn.running_var.to(wide) + abn.eps)
        fused.weight.copy_(conv.weight.to(wide) * scale.reshape(-1, 1, 1, 1))
        conv_bias = conv.bias.to(wide) if conv.bias is not None else torch.zeros_like(scale)
        fused.bias.copy_((conv_bias - abn.running_mean.to(wide)) * scale + abn.bias.to(wide))
    act: Optional[nn.Module] = None
    if abn.activation == "leaky_relu":
        act = nn.LeakyReLU(abn.activation_param, inplace=True)
    return fused, act
