"""ASL forward + backward: `AsymmetricLoss` against the original formulation, both differentiated by autograd.

The reference below is the original repository's computation written out (sigmoid, clamp, log, the focal weight
``(1 - pt) ** (gamma_pos * y + gamma_neg * (1 - y))`` from detached tensors, autograd for the gradient).
`AsymmetricLoss` is the same formula in ordinary torch operations, plus the module's own work: the shape checks,
the float32 promotion, autocast switched off, and ``1 - y`` computed once for its three uses. Both run interleaved
in one process on the same float32 CPU logits and 0/1 targets; each repeat times enough calls for about
``--min-seconds``, and the median over the repeats is reported, with the speed ratio (reference / ours) and the
largest differences of the values and the gradients.

    python benchmarks/bench_loss.py --threads 2 --repeats 7
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable

import torch

from asl.losses import AsymmetricLoss

GAMMA_NEG, GAMMA_POS, CLIP, EPS = 4, 0, 0.05, 1e-8
SHAPES = {"Open Images": (64, 9605), "MS-COCO": (128, 80)}

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def reference_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The recipe's ASL summed over the batch, as the original repository computes it."""
    prob = torch.sigmoid(x)
    prob_neg = (1 - prob + CLIP).clamp(max=1)
    log_lik = y * torch.log(prob.clamp(min=EPS)) + (1 - y) * torch.log(prob_neg.clamp(min=EPS))
    prob_right = prob.detach() * y + prob_neg.detach() * (1 - y)
    weight = torch.pow(1 - prob_right, GAMMA_POS * y + GAMMA_NEG * (1 - y))
    return -(log_lik * weight).sum()


def value_and_grad(fn: LossFn, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.detach().clone().requires_grad_(True)
    value = fn(leaf, y)
    value.backward()
    return value.detach(), leaf.grad


def seconds_per_call(fn: LossFn, x: torch.Tensor, y: torch.Tensor, calls: int) -> float:
    leaf = x.detach().clone().requires_grad_(True)
    start = time.perf_counter()
    for _ in range(calls):
        leaf.grad = None
        fn(leaf, y).backward()
    return (time.perf_counter() - start) / calls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--min-seconds", type=float, default=0.05, help="time per repeat and implementation")
    parser.add_argument("--positive-rate", type=float, default=0.05, help="fraction of targets that are 1")
    parser.add_argument("--logit-scale", type=float, default=4.0, help="logits are N(0, scale^2)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    ours = AsymmetricLoss(gamma_neg=GAMMA_NEG, gamma_pos=GAMMA_POS, clip=CLIP, eps=EPS,
                          disable_torch_grad_focal_loss=True)
    print(f"ASL forward + backward, float32 on CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} repeats of about {args.min_seconds * 1e3:.0f} ms each")
    print(f"{'shape':>24} | {'reference ms':>12} | {'ours ms':>8} | {'ratio':>6} | {'value diff':>10} | "
          f"{'grad diff':>9}")
    for name, shape in SHAPES.items():
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=generator) * args.logit_scale
        y = (torch.rand(shape, generator=generator) < args.positive_rate).float()

        ref_value, ref_grad = value_and_grad(reference_loss, x, y)  # also the warm-up of both
        our_value, our_grad = value_and_grad(ours, x, y)
        value_diff = ((our_value - ref_value).abs() / ref_value.abs()).item()
        grad_diff = ((our_grad - ref_grad).abs().max() / ref_grad.abs().max()).item()

        once = min(seconds_per_call(reference_loss, x, y, 1), seconds_per_call(ours, x, y, 1))
        calls = max(1, math.ceil(args.min_seconds / once))
        ref_times, our_times = [], []
        for _ in range(args.repeats):
            ref_times.append(seconds_per_call(reference_loss, x, y, calls))
            our_times.append(seconds_per_call(ours, x, y, calls))
        ref_ms, our_ms = statistics.median(ref_times) * 1e3, statistics.median(our_times) * 1e3
        label = f"{name} {shape[0]}x{shape[1]}"
        print(f"{label:>24} | {ref_ms:12.3f} | {our_ms:8.3f} | {ref_ms / our_ms:5.2f}x | {value_diff:10.1e} | "
              f"{grad_diff:9.1e}")
        if value_diff > 1e-5 or grad_diff > 1e-5:
            print(f"  MISMATCH on {label}: values or gradients differ by more than 1e-5 relative")
            return 1
    print("value diff: |ours - reference| / |reference|; grad diff: max |ours - reference| / max |reference|")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
