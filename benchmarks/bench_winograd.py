"""TResNet-M's convolutions at 224 (batch 8 by default), layer by layer, against ``F.conv2d`` on the same weights:
the 3x3 stride-1 ones as Winograd (F(4x4, 3x3), or F(5x5, 3x3) where ``tile_for`` picks it: at 14x14), the
measurement behind ``winograd_eligible``'s channel rule; with ``--kind 1x1`` the 1x1 ones as ``PackedConv2d``
(weights reordered once for oneDNN). Both take channels_last fp32 inputs; interleaved, median of the repeats.
``--threads 1 -b 4`` is what each thread of the prepared model's ``BatchThreads`` does on a 2-thread machine.

    python benchmarks/bench_winograd.py --repeats 9
    python benchmarks/bench_winograd.py --kind 1x1 --threads 1 -b 4
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

from asl.cli import positive_int
from asl.models.packed import PackedConv2d
from asl.models.winograd import WinogradConv2d

# (in channels, out channels, side, how many) of TResNet-M's convolutions at 224 of each kind: 3x3 stride 1, and
# 1x1 outside the SE modules (main path and downsample).
LAYERS = {
    "3x3": [(48, 64, 56, 1), (64, 64, 56, 6), (64, 128, 56, 1), (128, 128, 28, 7), (256, 256, 28, 1),
            (256, 256, 14, 10), (512, 512, 14, 1), (512, 512, 7, 2)],
    "1x1": [(64, 128, 28, 1), (128, 256, 28, 1), (128, 1024, 14, 1), (1024, 256, 14, 10),
            (256, 1024, 14, 11), (1024, 512, 14, 1), (1024, 2048, 7, 1), (512, 2048, 7, 3), (2048, 512, 7, 2)],
}
FAST = {"3x3": WinogradConv2d, "1x1": PackedConv2d}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=sorted(LAYERS), default="3x3")
    parser.add_argument("-b", "--batch-size", type=positive_int, default=8)
    parser.add_argument("--repeats", type=positive_int, default=9)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch.set_num_threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kernel = int(args.kind[0])
    print(f"{args.kind} convolutions, batch {args.batch_size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"in -> out @ side (count): F.conv2d ms, {FAST[args.kind].__name__} ms, speed-up, max relative difference")
    for cin, cout, side, count in LAYERS[args.kind]:
        conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2).eval().to(memory_format=torch.channels_last)
        fast = FAST[args.kind](conv)
        x = torch.randn(args.batch_size, cin, side, side).contiguous(memory_format=torch.channels_last)
        times: dict[str, list[float]] = {"direct": [], "fast": []}
        with torch.inference_mode():
            expected = conv(x)
            err = ((fast(x) - expected).abs().max() / expected.abs().max()).item()
            # Warm-up: the first passes pay for fresh memory pages until the allocator keeps its blocks, as it
            # does in a model's steady state.
            for _ in range(args.warmup):
                conv(x), fast(x)
            for _ in range(args.repeats):
                for name, layer in (("direct", conv), ("fast", fast)):
                    start = time.perf_counter()
                    layer(x)
                    times[name].append(time.perf_counter() - start)
        direct, other = (statistics.median(times[k]) * 1e3 for k in ("direct", "fast"))
        print(f"{cin:4d} -> {cout:4d} @ {side:2d} ({count:2d}): {direct:6.1f} {other:6.1f}  "
              f"{direct / other:4.2f}x  {err:.0e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
