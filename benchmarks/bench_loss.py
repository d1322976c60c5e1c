"""ASL forward + backward: `AsymmetricLoss` against the original formulation, both differentiated by autograd.

The reference below is the original repository's computation written out (sigmoid, clamp, log, the focal weight
``(1 - pt) ** (gamma_pos * y + gamma_neg * (1 - y))`` from detached tensors, autograd for the gradient).
`AsymmetricLoss` is the same formula in ordinary torch operations, plus the module's own work: the shape checks,
the float32 promotion, autocast switched off, and ``1 - y`` computed once for its three uses. Both run interleaved
in one process on the same float32 CPU logits and 0/1 targets; each repeat times enough calls for about
``--min-seconds``, and the median over the repeats is reported, with the speed ratio (reference / ours) and the
largest differences of the values and the gradients.

The second table does the same for CSL's `PartialSelectiveLoss` (partial labels: targets 1 / 0 / -1) at Open
Images' 64 x 9605 in the modes negative, ignore and selective (with a class prior), against the official CSL
formulation written out below (float masks, the focal weight with a tensor exponent, and in selective mode the
unknown entries gathered with ``nonzero`` and sorted by likelihood, with a stable sort: see the comment there).

    python benchmarks/bench_loss.py --threads 2 --repeats 7
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable

import torch

from asl.losses import AsymmetricLoss, PartialSelectiveLoss

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


# CSL's training defaults (gamma_pos 0, gamma_neg 1, gamma_unann 2, alphas 1, clip 0, top-k 5, threshold 0.05)
CSL_GAMMAS, CSL_TOPK, CSL_THRESHOLD = (0.0, 1.0, 2.0), 5, 0.05
CSL_MODES = ("negative", "ignore", "selective")


def reference_partial_loss(x: torch.Tensor, t: torch.Tensor, mode: str, prior: torch.Tensor) -> torch.Tensor:
    """CSL's loss as the official code computes it (alphas 1, no clip), for the benchmark's comparison."""
    is_pos, is_neg, is_unk = (t == 1).float(), (t == 0).float(), (t == -1).float()
    prob = torch.sigmoid(x)
    prob_neg = 1.0 - prob
    weights = 1.0
    if mode == "ignore":
        weights = torch.ones_like(t)
        weights[t == -1] = 0
    elif mode == "selective":
        weights = torch.ones_like(t)
        weights[:, prior > CSL_THRESHOLD] = 0
        weights = (weights + (t != -1).float()).bool()
        with torch.no_grad():
            unknown_at = torch.nonzero(t.reshape(-1) == -1).squeeze(1)
            # A stable sort, so that unknown labels tied at the k-th likelihood (common in float32) are taken in
            # row-major order as PartialSelectiveLoss does; the official's unstable argsort picks among them freely.
            most_likely = torch.argsort(prob_neg.reshape(-1)[unknown_at], stable=True)[:CSL_TOPK * t.shape[0]]
            weights.view(-1)[unknown_at[most_likely]] = False
    log_lik = (is_pos * torch.log(prob.clamp(min=EPS)) + is_neg * torch.log(prob_neg.clamp(min=EPS))
               + is_unk * torch.log(prob_neg.clamp(min=EPS)))
    gamma_pos, gamma_neg, gamma_unann = CSL_GAMMAS
    with torch.no_grad():
        focal = torch.pow(1 - prob * is_pos - prob_neg * (is_neg + is_unk),
                          gamma_pos * is_pos + gamma_neg * is_neg + gamma_unann * is_unk)
    return -(log_lik * focal * weights).sum()


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


def compare(label: str, reference: LossFn, ours: LossFn, x: torch.Tensor, y: torch.Tensor, args) -> bool:
    """Time both on the same inputs, print one row; ``False`` when their values or gradients differ."""
    ref_value, ref_grad = value_and_grad(reference, x, y)  # also the warm-up of both
    our_value, our_grad = value_and_grad(ours, x, y)
    value_diff = ((our_value - ref_value).abs() / ref_value.abs()).item()
    grad_diff = ((our_grad - ref_grad).abs().max() / ref_grad.abs().max()).item()

    once = min(seconds_per_call(reference, x, y, 1), seconds_per_call(ours, x, y, 1))
    calls = max(1, math.ceil(args.min_seconds / once))
    ref_times, our_times = [], []
    for _ in range(args.repeats):
        ref_times.append(seconds_per_call(reference, x, y, calls))
        our_times.append(seconds_per_call(ours, x, y, calls))
    ref_ms, our_ms = statistics.median(ref_times) * 1e3, statistics.median(our_times) * 1e3
    print(f"{label:>24} | {ref_ms:12.3f} | {our_ms:8.3f} | {ref_ms / our_ms:5.2f}x | {value_diff:10.1e} | "
          f"{grad_diff:9.1e}")
    if value_diff > 1e-5 or grad_diff > 1e-5:
        print(f"  MISMATCH on {label}: values or gradients differ by more than 1e-5 relative")
        return False
    return True


def partial_targets(shape: tuple, args, generator: torch.Generator) -> torch.Tensor:
    """Open Images-like partial labels: a few positives, some annotated negatives, the rest unknown (-1)."""
    draw = torch.rand(shape, generator=generator)
    targets = torch.full(shape, -1.0)
    targets[draw < args.positive_rate + args.negative_rate] = 0.0
    targets[draw < args.positive_rate] = 1.0
    return targets


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--min-seconds", type=float, default=0.05, help="time per repeat and implementation")
    parser.add_argument("--positive-rate", type=float, default=0.05, help="fraction of targets that are 1")
    parser.add_argument("--logit-scale", type=float, default=4.0, help="logits are N(0, scale^2)")
    parser.add_argument("--negative-rate", type=float, default=0.02,
                        help="CSL table: fraction of targets that are annotated negatives (the rest are unknown)")
    parser.add_argument("--loss", choices=["asl", "csl", "both"], default="both", help="which table(s) to run")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    ours = AsymmetricLoss(gamma_neg=GAMMA_NEG, gamma_pos=GAMMA_POS, clip=CLIP, eps=EPS,
                          disable_torch_grad_focal_loss=True)
    print(f"Loss forward + backward, float32 on CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} repeats of about {args.min_seconds * 1e3:.0f} ms each")
    header = (f"{'reference ms':>12} | {'ours ms':>8} | {'ratio':>6} | {'value diff':>10} | {'grad diff':>9}")
    if args.loss in ("asl", "both"):
        print(f"{'shape':>24} | {header}")
        for name, shape in SHAPES.items():
            generator = torch.Generator().manual_seed(0)
            x = torch.randn(shape, generator=generator) * args.logit_scale
            y = (torch.rand(shape, generator=generator) < args.positive_rate).float()
            if not compare(f"{name} {shape[0]}x{shape[1]}", reference_loss, ours, x, y, args):
                return 1
    if args.loss in ("csl", "both"):
        shape = SHAPES["Open Images"]
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(shape, generator=generator) * args.logit_scale
        y = partial_targets(shape, args, generator)
        prior = torch.rand(shape[1], generator=generator) * 0.1
        print(f"PartialSelectiveLoss at {shape[0]}x{shape[1]}: {args.positive_rate:.1%} positive, "
              f"{args.negative_rate:.1%} annotated negative, the rest unknown; prior U(0, 0.1)")
        print(f"{'mode':>24} | {header}")
        for mode in CSL_MODES:
            csl = PartialSelectiveLoss(partial_loss_mode=mode, likelihood_topk=CSL_TOPK, prior_threshold=CSL_THRESHOLD,
                                       prior=prior.tolist())

            def reference(a, b, mode=mode):
                return reference_partial_loss(a, b, mode, prior)

            if not compare(mode, reference, csl, x, y, args):
                return 1
    print("value diff: |ours - reference| / |reference|; grad diff: max |ours - reference| / max |reference|")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
