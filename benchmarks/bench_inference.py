"""Inference throughput: `prepare_for_inference` (norms folded into convs, channels_last) vs. the plain model.

Both run in the same process on the same random weights and inputs, alternating, so the ratio is meaningful
on a shared machine. Also checks that the outputs agree.

    python benchmarks/bench_inference.py --model-name tresnet_m --image-size 224 -b 8 --repeats 5
"""
from __future__ import annotations

import argparse
import time

import torch

from asl.models import create_model, prepare_for_inference


def _throughput(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        model(x)
    return x.shape[0] / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-name", default="tresnet_m")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("-b", "--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    plain = create_model(args.model_name, 80).eval().to(device)
    fast = prepare_for_inference(plain)
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device)
    with torch.inference_mode():
        ref, out = plain(x), fast(x)  # also a warm-up of both
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    plain_rates, fast_rates = [], []
    for _ in range(args.repeats):
        plain_rates.append(_throughput(plain, x))
        fast_rates.append(_throughput(fast, x))
    best_plain, best_fast = max(plain_rates), max(fast_rates)
    print(f"{args.model_name} {args.image_size}px batch {args.batch_size} on {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"plain model:           {best_plain:8.1f} images/s")
    print(f"prepare_for_inference: {best_fast:8.1f} images/s  ({best_fast / best_plain:.2f}x)")
    print(f"max relative difference of the logits: {err:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
