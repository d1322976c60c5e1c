"""Winograd F(4x4, 3x3) convolution for CPU inference: the same 3x3 convolution with 4x fewer multiplications.

On a CPU in fp32, TResNet's direct convolutions already run near the cores' peak (BENCHMARKS.md), so the only way
left to go faster is to do less arithmetic. Winograd's minimal filtering algorithm (Lavin & Gray, "Fast Algorithms
for Convolutional Neural Networks", CVPR 2016) computes each 4x4 output tile from a 6x6 input tile as

    Y = A^T [ (G g G^T) * (B^T d B) ] A

where ``*`` is elementwise over the 36 tile positions. Summed over the input channels, that elementwise product is
36 matrix products (tiles x C_in) @ (C_in x C_out): 36 multiplications per 16 outputs instead of 144. The
transforms are small matrix products that move memory around; they pay for themselves only on wide layers, which
is why :func:`winograd_eligible` asks for at least 128 channels on both sides (measured with
``benchmarks/bench_winograd.py``: a 64-channel layer at 56x56 ran 0.8x the direct convolution, the 128- to
512-channel layers of TResNet 1.1x to 1.8x).

On a GPU, cuDNN already chooses Winograd by itself, so :class:`WinogradConv2d` steps aside there and whenever its
arithmetic would not be plain CPU fp32 (autocast, other dtypes, tracing or export, ``torch.compile``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["WinogradConv2d", "winograd_eligible", "winograd_matrices", "MIN_CHANNELS"]

MIN_CHANNELS = 128
TILE = 4  # output tile side; the input tile is TILE + 2


def _exporting() -> bool:
    # torch.compiler.is_exporting arrived after torch 2.4, the oldest torch this package supports.
    check = getattr(torch.compiler, "is_exporting", None)
    return bool(check()) if check is not None else False


def winograd_matrices(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B^T, G, A^T)`` of F(4, 3) with the interpolation points 0, 1, -1, 2, -2 and infinity: shapes 6x6, 6x3,
    4x6. For a 6-sample signal d and a 3-tap filter g, ``A^T ((G g) * (B^T d))`` is the 4-sample valid correlation
    of d with g."""
    bt = torch.tensor([[4, 0, -5, 0, 1, 0],
                       [0, -4, -4, 1, 1, 0],
                       [0, 4, -4, -1, 1, 0],
                       [0, -2, -1, 2, 1, 0],
                       [0, 2, -1, -2, 1, 0],
                       [0, 4, 0, -5, 0, 1]], dtype=dtype)
    g = torch.tensor([[1 / 4, 0, 0],
                      [-1 / 6, -1 / 6, -1 / 6],
                      [-1 / 6, 1 / 6, -1 / 6],
                      [1 / 24, 1 / 12, 1 / 6],
                      [1 / 24, -1 / 12, 1 / 6],
                      [0, 0, 1]], dtype=dtype)
    at = torch.tensor([[1, 1, 1, 1, 1, 0],
                       [0, 1, -1, 2, -2, 0],
                       [0, 1, 1, 4, 4, 0],
                       [0, 1, -1, 8, -8, 1]], dtype=dtype)
    return bt, g, at


def winograd_eligible(conv: nn.Module, min_channels: int = MIN_CHANNELS) -> bool:
    """A plain 3x3, stride-1, 'same'-padded, ungrouped Conv2d with at least ``min_channels`` in and out."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and min(conv.in_channels, conv.out_channels) >= min_channels)


class WinogradConv2d(nn.Module):
    """Inference-only stand-in for an eligible ``nn.Conv2d`` (same ``weight`` and ``bias``, same state-dict keys).

    The transformed filters (36 x C_in x C_out, 4x the weight's size) are computed in float64 once, kept in fp32 on
    the CPU as a plain attribute (never saved, never moved to a GPU), and recomputed if the weight is changed in
    place (``load_state_dict``). Outputs agree with the direct convolution to fp32 rounding (about 1e-5 relative).
    Where gradients are needed, the layer is a plain convolution: the Winograd path overwrites its intermediate
    results, which autograd would need intact, and its filters carry no gradient to the weight.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        if not winograd_eligible(conv, min_channels=1):
            raise ValueError(f"not a 3x3 stride-1 'same' ungrouped convolution: {conv}")
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self._filters: Optional[torch.Tensor] = None
        self._source: Optional[torch.Tensor] = None  # the weight tensor the filters were made of
        self._source_version = -1
        bt, _, at = winograd_matrices(torch.float32)
        self._bt, self._at = bt, at
        if self.weight.device.type == "cpu":
            self.transformed_filters()  # now, so that the first batch is not the slow one

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=(3, 3), padding=(1, 1), Winograd F(4x4, 3x3)"

    def _fast_path(self, x: torch.Tensor) -> bool:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        return (x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.device.type == "cpu"
                and self.weight.dtype == torch.float32 and x.dim() == 4 and not needs_grad
                and not torch.is_autocast_enabled("cpu") and not torch.jit.is_tracing()
                and not torch.jit.is_scripting() and not torch.compiler.is_compiling()
                and not _exporting() and not torch.onnx.is_in_onnx_export())

    def transformed_filters(self) -> torch.Tensor:
        """``U[p*6 + q] = (G g G^T)[p, q]`` for every (input, output) channel pair: 36 x C_in x C_out, fp32."""
        # Stale when the parameter holds another tensor (.half().float(), a round trip through another device) or
        # the same one changed in place (load_state_dict). Holding the source keeps its memory from being reused
        # by a new weight at the same address, and its version counter is the parameter's. Inference tensors
        # (made under torch.inference_mode) have no version counter; they cannot change in place.
        weight = self.weight.detach()
        version = 0 if weight.is_inference() else weight._version
        if (self._filters is None or self._source is None or self._source.data_ptr() != weight.data_ptr()
                or self._source_version != version):
            _, g, _ = winograd_matrices(torch.float64)
            with torch.no_grad():
                u = torch.einsum("pi,kcij,qj->pqck", g, weight.double(), g)
            self._filters = u.reshape(36, self.in_channels, self.out_channels).float().contiguous()
            self._source, self._source_version = weight, version
        return self._filters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast_path(x):
            return F.conv2d(x, self.weight, self.bias, padding=1)
        return self._winograd(x)

    def _winograd(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        k = self.out_channels
        th, tw = -(-h // TILE), -(-w // TILE)
        tiles = n * th * tw
        size = 36 * tiles * max(c, k)
        # Two buffers take turns below: each result goes into the one whose contents are no longer needed. Fresh
        # memory can cost page faults (about 4,000 per call when a layer was timed alone), and the broadcasting
        # matmul is 6x faster with out= than when it allocates its result (measured, 128 channels at 28x28).
        first, second = torch.empty(size, dtype=x.dtype), torch.empty(size, dtype=x.dtype)
        # NHWC keeps the channels innermost in every copy below (a view when x is channels_last). One pixel of
        # zero padding on top/left, and enough on the bottom/right to complete the last tile.
        hp, wp = TILE * th + 2, TILE * tw + 2
        padded = torch.empty(n, hp, wp, c, dtype=x.dtype)
        padded[:, :1].zero_()
        padded[:, h + 1:].zero_()
        padded[:, :, :1].zero_()
        padded[:, :, w + 1:].zero_()
        padded[:, 1:h + 1, 1:w + 1].copy_(x.permute(0, 2, 3, 1))
        d = first[:36 * tiles * c].view(6, 6, n, th, tw, c)
        d.copy_(padded.unfold(1, 6, TILE).unfold(2, 6, TILE).permute(4, 5, 0, 1, 2, 3))
        # B^T d B, separably: rows, then columns; each a small matrix product over a long contiguous axis.
        v1 = torch.mm(self._bt, d.view(6, -1), out=second[:36 * tiles * c].view(6, -1)).view(6, 6, tiles * c)
        v = torch.matmul(self._bt, v1, out=first[:36 * tiles * c].view(6, 6, -1)).view(36, tiles, c)
        m = torch.bmm(v, self.transformed_filters(), out=second[:36 * tiles * k].view(36, tiles, k))
        y1 = torch.mm(self._at, m.view(6, -1), out=first[:24 * tiles * k].view(TILE, -1)).view(TILE, 6, -1)
        y = torch.matmul(self._at, y1, out=second[:16 * tiles * k].view(TILE, TILE, -1))
        out = torch.empty(n, th, TILE, tw, TILE, k, dtype=x.dtype)
        out.copy_(y.view(TILE, TILE, n, th, tw, k).permute(2, 3, 0, 4, 1, 5))
        out = out.view(n, TILE * th, TILE * tw, k)
        if TILE * th != h or TILE * tw != w:
            out = out[:, :h, :w].contiguous()
        if self.bias is not None:
            out.add_(self.bias)
        return out.permute(0, 3, 1, 2)
