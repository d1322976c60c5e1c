"""Winograd F(m x m, 3x3) convolution for CPU inference: the same 3x3 convolution with 4x to 5x fewer
multiplications.

On a CPU in fp32, TResNet's direct convolutions already run near the cores' peak (BENCHMARKS.md), so the only way
left to go faster is to do less arithmetic. Winograd's minimal filtering algorithm (Lavin & Gray, "Fast Algorithms
for Convolutional Neural Networks", CVPR 2016) computes each m x m output tile from an (m+2) x (m+2) input tile as

    Y = A^T [ (G g G^T) * (B^T d B) ] A

where ``*`` is elementwise over the (m+2)^2 tile positions. Summed over the input channels, that elementwise
product is (m+2)^2 matrix products (tiles x C_in) @ (C_in x C_out): 36 multiplications per 16 outputs instead of
144 for m = 4, 49 per 25 instead of 225 for m = 5. The transforms are small matrix products that move memory
around; they pay for themselves only on layers wide enough, which is why :func:`winograd_eligible` asks for 48
channels or more on both sides. That rule is for the prepared model, whose threads each run their share of the batch
single-threaded (:mod:`asl.models.batch_threads`): there TResNet's stem (48 -> 64) and 64-channel layers at 56x56
gain 1.35x to 1.42x (``benchmarks/bench_winograd.py --threads 1 -b 4``). With torch's usual threading, where each
pass is split between the cores, the same layers gained 10% at best and lost 20% or more whenever memory-bound
work ran slowly on our shared 2-vCPU machine (BENCHMARKS.md); wider layers gain either way.

Two tile sizes are used: m = 4, and m = 5 where the input's size makes it need clearly fewer multiplications once
the last tiles are padded (at 14x14: 9 tiles of 49 instead of 16 of 36; see :func:`tile_for`). Larger tiles would
save more, but their transforms need larger interpolation points, and F(7x7, 3x3) measured 15x to 50x the rounding
error of F(4x4, 3x3) in fp32; m = 4 and 5 stay at about 1e-5 of the largest output.

The work goes in chunks of at most 512 tiles. That bounds the scratch memory whatever the batch size, and keeps a
chunk's intermediate results in the CPU's cache between the passes over them (a 64-channel layer at 56x56, batch
8: 11.3 ms on the whole batch at once, 7.8 ms in chunks, 8.5 ms as a direct convolution).

On a GPU, cuDNN already chooses Winograd by itself, so :class:`WinogradConv2d` steps aside there and whenever its
arithmetic would not be plain CPU fp32 (autocast, other dtypes, tracing or export, ``torch.compile``).
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fastpath import DerivedWeights, plain_cpu_inference

__all__ = ["WinogradConv2d", "winograd_eligible", "winograd_matrices", "tile_for", "MIN_CHANNELS", "TILES"]

MIN_CHANNELS = 48
# The interpolation points of each output tile side m (infinity is the last point of every set). Small integers
# and halves keep the transforms' coefficients small, which is what keeps fp32 rounding small.
POINTS = {4: (0, 1, -1, 2, -2), 5: (0, 1, -1, 2, -2, Fraction(1, 2))}
TILES = tuple(POINTS)
CHUNK_TILES = 512  # tiles per chunk: measured best from 256 to 512 on the layers of TResNet-M


def _inverse(rows: list[list[Fraction]]) -> list[list[Fraction]]:
    """Exact Gauss-Jordan inverse of a small invertible matrix of fractions."""
    n = len(rows)
    work = [row[:] + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(rows)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if work[r][col] != 0)
        work[col], work[pivot] = work[pivot], work[col]
        work[col] = [v / work[col][col] for v in work[col]]
        for r in range(n):
            if r != col and work[r][col] != 0:
                factor = work[r][col]
                work[r] = [a - factor * b for a, b in zip(work[r], work[col])]
    return [row[n:] for row in work]


def winograd_matrices(tile: int = 4, dtype: torch.dtype = torch.float64
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B^T, G, A^T)`` of F(tile, 3), shapes n x n, n x 3 and tile x n with n = tile + 2: for an n-sample signal
    d and a 3-tap filter g, ``A^T ((G g) * (B^T d))`` is the ``tile``-sample valid correlation of d with g.

    Built exactly (in fractions) by Toom-Cook: correlation is the transpose of polynomial multiplication, which
    evaluates both factors at the points of :data:`POINTS` and infinity (A^T and G are those evaluations) and
    interpolates the product (B^T is the transposed inverse of the evaluation matrix). Each row of B^T is then
    scaled to coprime integers, so that the input transform is exact in fp32, and G takes the inverse scale.
    """
    points = [Fraction(p) for p in POINTS[tile]]
    n = tile + 2
    infinity = [[Fraction(int(k == n - 1)) for k in range(n)]]  # the leading coefficient
    interpolate = _inverse([[p ** k for k in range(n)] for p in points] + infinity)
    bt = [[interpolate[k][j] for k in range(n)] for j in range(n)]
    g = [[p ** k for k in range(3)] for p in points] + [[Fraction(0), Fraction(0), Fraction(1)]]
    at = [[p ** i for p in points] + [Fraction(int(i == tile - 1))] for i in range(tile)]
    for j, row in enumerate(bt):
        denominator = math.lcm(*(v.denominator for v in row))
        scale = Fraction(denominator, math.gcd(*(int(v * denominator) for v in row)))
        bt[j] = [v * scale for v in row]
        g[j] = [v / scale for v in g[j]]
    return tuple(torch.tensor([[float(v) for v in row] for row in m], dtype=dtype) for m in (bt, g, at))


def tile_for(height: int, width: int) -> int:
    """The output tile side for this input size: 5 where F(5x5, 3x3) needs at most 4/5 of the multiplications of
    F(4x4, 3x3) once the last row and column of tiles are padded (14x14: 9 tiles of 49 against 16 of 36), else 4.

    Fewer multiplications alone do not decide it: the 7-point transforms cost more per value than the 6-point
    ones, and padded outputs must be cropped. At 112x112, where F(5x5) saves 8% of the multiplications, it ran
    15% to 20% slower on 128 and 152 channels; at 14x14 (23% saved) it ran 10% to 20% faster.
    """
    def products(m: int) -> int:
        return (-(-height // m)) * (-(-width // m)) * (m + 2) ** 2

    return 5 if 5 * products(5) <= 4 * products(4) else 4


def winograd_eligible(conv: nn.Module, min_channels: int = MIN_CHANNELS) -> bool:
    """A plain 3x3, stride-1, 'same'-padded, ungrouped Conv2d with at least ``min_channels`` in and out."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and min(conv.in_channels, conv.out_channels) >= min_channels)


class WinogradConv2d(nn.Module):
    """Inference-only stand-in for an eligible ``nn.Conv2d`` (same ``weight`` and ``bias``, same state-dict keys).

    The transformed filters ((m+2)^2 x C_in x C_out: 4x the weight's size for m = 4, 5.4x for m = 5) are computed
    in float64 on the first call with each tile size, kept in fp32 on the CPU as plain attributes (never saved,
    never moved to a GPU), and recomputed if the weight is changed in place (``load_state_dict``). Outputs agree
    with the direct convolution to fp32 rounding (about 1e-5 of the largest output). Where gradients are needed,
    the layer is a plain convolution: the Winograd path overwrites its intermediate results, which autograd would
    need intact, and its filters carry no gradient to the weight.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        if not winograd_eligible(conv, min_channels=1):
            raise ValueError(f"not a 3x3 stride-1 'same' ungrouped convolution: {conv}")
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.weight = nn.Parameter(conv.weight.detach().clone(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        self._filters = DerivedWeights()
        # The fp32 data transforms B^T and A^T of each tile size (exact: small integers and powers of 1/2).
        self._transforms = {m: winograd_matrices(m, torch.float32)[::2] for m in TILES}

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=(3, 3), padding=(1, 1), Winograd F(m x m, 3x3)"

    def transformed_filters(self, tile: int = 4) -> torch.Tensor:
        """``U[p*n + q] = (G g G^T)[p, q]`` for every (input, output) channel pair, n = tile + 2: n^2 x C_in x
        C_out, fp32."""
        def make(weight: torch.Tensor) -> torch.Tensor:
            _, g, _ = winograd_matrices(tile, torch.float64)
            u = torch.einsum("pi,kcij,qj->pqck", g, weight.double(), g)
            return u.reshape(-1, self.in_channels, self.out_channels).float().contiguous()

        return self._filters.get(self.weight, tile, make)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or not plain_cpu_inference(self, x):  # F.conv2d also takes unbatched 3-D input
            return F.conv2d(x, self.weight, self.bias, padding=1)
        return self._winograd(x)

    def _winograd(self, x: torch.Tensor) -> torch.Tensor:
        batch, c, h, w = x.shape
        m = tile_for(h, w)
        th, tw = -(-h // m), -(-w // m)
        # A chunk is whole images when an image has fewer tiles than a chunk, else rows of tiles of one image.
        images, rows = (min(batch, CHUNK_TILES // (th * tw)), th) if th * tw <= CHUNK_TILES else \
            (1, max(1, CHUNK_TILES // tw))
        size = (m + 2) ** 2 * images * rows * tw * max(c, self.out_channels)
        # Two buffers take turns: each result goes into the one whose contents are no longer needed. The broadcast
        # matmul is 6x faster with out= than when it allocates its result (measured, 128 channels at 28x28).
        buffers = torch.empty(size, dtype=x.dtype), torch.empty(size, dtype=x.dtype)
        # NHWC keeps the channels innermost in every copy below (a view when x is channels_last). The zero columns
        # of the padding (one on the left, enough on the right to complete the last tile) are written once here;
        # each chunk fills the rows between them.
        padded = x.new_empty(images, m * rows + 2, m * tw + 2, c)
        padded[:, :, :1].zero_()
        padded[:, :, w + 1:].zero_()
        out = x.new_empty(batch, m * th, m * tw, self.out_channels)
        src = x.permute(0, 2, 3, 1)
        for first in range(0, batch, images):
            count = min(images, batch - first)
            for top in range(0, th, rows):
                self._chunk(src[first:first + count], padded[:count], top, min(rows, th - top), m, buffers,
                            out[first:first + count])
        if m * th != h or m * tw != w:
            out = out[:, :h, :w].contiguous()
        return out.permute(0, 3, 1, 2)

    def _chunk(self, src: torch.Tensor, padded: torch.Tensor, top: int, rows: int, m: int,
               buffers: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor) -> None:
        """Tile rows ``top`` to ``top + rows`` of the images ``src`` (NHWC) into the same rows of ``out``."""
        images, h, w, c = src.shape
        k, n = self.out_channels, m + 2
        tw = (out.shape[2]) // m
        tiles = images * rows * tw
        # Input rows m*top - 1 to m*(top + rows) + 1 (exclusive), zero where they fall outside the image.
        low, high = m * top - 1, m * (top + rows) + 1
        rows_in = padded[:, :high - low]
        if low < 0:
            rows_in[:, :-low].zero_()
        if high > h:
            rows_in[:, h - low:].zero_()
        rows_in[:, max(low, 0) - low:min(high, h) - low, 1:w + 1].copy_(src[:, max(low, 0):min(high, h)])
        first, second = buffers
        d = first[:n * n * tiles * c].view(n, n, images, rows, tw, c)
        d.copy_(rows_in.unfold(1, n, m).unfold(2, n, m).permute(4, 5, 0, 1, 2, 3))
        # B^T d B, separably: rows, then columns; each a small matrix product over a long contiguous axis.
        bt, at = self._transforms[m]
        v1 = torch.mm(bt, d.view(n, -1), out=second[:n * n * tiles * c].view(n, -1))
        v = torch.matmul(bt, v1.view(n, n, -1), out=first[:n * n * tiles * c].view(n, n, -1)).view(n * n, tiles, c)
        prod = torch.bmm(v, self.transformed_filters(m), out=second[:n * n * tiles * k].view(n * n, tiles, k))
        if self.bias is not None:
            # The column of A^T that evaluates at the point 1 is all ones. A constant added at that tile position
            # (in both directions) before the output transform therefore reaches every output once: the bias,
            # without a pass over the output.
            one = POINTS[m].index(1)
            prod[one * n + one].add_(self.bias)
        y1 = torch.mm(at, prod.view(n, -1), out=first[:m * n * tiles * k].view(m, -1))
        y = torch.matmul(at, y1.view(m, n, -1), out=second[:m * m * tiles * k].view(m, m, -1))
        out[:, m * top:m * (top + rows)].view(images, rows, m, tw, m, k).copy_(
            y.view(m, m, images, rows, tw, k).permute(2, 3, 0, 4, 1, 5))
