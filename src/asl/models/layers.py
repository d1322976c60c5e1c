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


def _channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape(1, -1, *([1] * (ndim - 2)))


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
        # F.batch_norm returns only the output of this op; its saved batch statistics give the inverse std.
        out, _, save_invstd, _, _ = torch.ops.aten._batch_norm_impl_index(
            x, scale, bias, running_mean, running_var, training, momentum, eps, torch.backends.cudnn.enabled)
        if slope is not None:
            F.leaky_relu(out, slope, inplace=True)
        invstd = save_invstd if training else torch.rsqrt(running_var + eps)
        ctx.save_for_backward(out, weight, bias, invstd)
        ctx.training, ctx.eps, ctx.slope, ctx.x_dtype = training, eps, slope, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        y, weight, bias, invstd = ctx.saved_tensors
        dtype = torch.promote_types(y.dtype, torch.float32)
        y, dy = y.to(dtype), grad_out.to(dtype)
        if ctx.slope is not None:
            negative = y < 0
            y = torch.where(negative, y / ctx.slope, y)
            dy = torch.where(negative, dy * ctx.slope, dy)
        scale = weight.to(dtype).abs() + ctx.eps
        xhat = (y - _channel_view(bias.to(dtype), y.dim())) / _channel_view(scale, y.dim())
        dims = [0, *range(2, y.dim())]
        sum_dy = dy.sum(dims)
        sum_xhat_dy = (xhat * dy).sum(dims)
        grad_x = None
        if ctx.needs_input_grad[0]:
            gain = _channel_view(scale * invstd.to(dtype), y.dim())
            if ctx.training:
                count = y.numel() // y.shape[1]
                dy = dy - _channel_view(sum_dy / count, y.dim()) - xhat * _channel_view(sum_xhat_dy / count, y.dim())
            grad_x = (dy * gain).to(ctx.x_dtype)
        # original (inplace_abn): dweight = sum(xhat * dy), negated only where weight < 0 (0 counts as positive).
        grad_w = torch.where(weight < 0, -sum_xhat_dy, sum_xhat_dy).to(weight.dtype)
        return grad_x, grad_w, sum_dy.to(bias.dtype), None, None, None, None, None, None


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
            raise ValueError(f"TResNet needs an input size divisible by {b}, got {h}x{w}")
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
        x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return F.conv2d(x, self.filt.to(x.dtype), stride=self.stride, groups=x.shape[1])


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
    """Fold an eval-mode ABN into the preceding conv; returns the new conv and the activation left over."""
    scale = abn.effective_scale() / torch.sqrt(abn.running_var + abn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                      padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True)
    fused = fused.to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(abn.running_mean)
        fused.bias.copy_((conv_bias - abn.running_mean) * scale + abn.bias)
    act: Optional[nn.Module] = None
    if abn.activation == "leaky_relu":
        act = nn.LeakyReLU(abn.activation_param, inplace=True)
    return fused, act
