"""Winograd (F(4x4, 3x3), or F(5x5, 3x3) where ``tile_for`` picks it: at 14x14) against the direct convolution,
layer by layer, on the 3x3 stride-1 convolutions of TResNet-M at 224 (batch 8 by default): the measurement behind
``winograd_eligible``'s 128-channel rule. Both take channels_last fp32 inputs; interleaved, median of the repeats.

    python benchmarks/bench_winograd.py --repeats 9
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

from asl.models.winograd import WinogradConv2d

# (in channels, out channels, side) of TResNet-M's 3x3 stride-1 convolutions at 224, and how many there are.
LAYERS = [(48, 64, 56, 1), (64, 64, 56, 6), (64, 128, 56, 1), (128, 128, 28, 7), (256, 256, 28, 1),
          (256, 256, 14, 10), (512, 512, 14, 1), (512, 512, 7, 2)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-b", "--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"batch {args.batch_size}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print("in -> out @ side (count): direct ms, Winograd ms, speed-up, max relative difference")
    for cin, cout, side, count in LAYERS:
        conv = nn.Conv2d(cin, cout, 3, padding=1).eval().to(memory_format=torch.channels_last)
        fast = WinogradConv2d(conv)
        x = torch.randn(args.batch_size, cin, side, side).contiguous(memory_format=torch.channels_last)
        times: dict[str, list[float]] = {"direct": [], "winograd": []}
        with torch.inference_mode():
            expected = conv(x)
            err = ((fast(x) - expected).abs().max() / expected.abs().max()).item()
            # Warm-up: the first passes pay for fresh memory pages until the allocator keeps its blocks, as it
            # does in a model's steady state.
            for _ in range(args.warmup):
                conv(x), fast(x)
            for _ in range(args.repeats):
                for name, layer in (("direct", conv), ("winograd", fast)):
                    start = time.perf_counter()
                    layer(x)
                    times[name].append(time.perf_counter() - start)
        direct, winograd = (statistics.median(times[k]) * 1e3 for k in ("direct", "winograd"))
        print(f"{cin:4d} -> {cout:4d} @ {side:2d} ({count:2d}): {direct:6.1f} {winograd:6.1f}  "
              f"{direct / winograd:4.2f}x  {err:.0e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
