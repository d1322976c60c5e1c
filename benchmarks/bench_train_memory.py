"""Activation memory and speed of a TResNet training step, against timm's TResNet doing the same work.

Memory: the bytes of the distinct storages autograd keeps for backward during one training-mode forward,
counted with ``torch.autograd.graph.saved_tensors_hooks`` (deterministic: the same figure on any machine for a
given torch version), reported with and without the parameters (conv weights are saved by both models alike).
Speed: forward + backward + SGD step, the three models interleaved in one process, median of the repeats.

    python benchmarks/bench_train_memory.py --model-name tresnet_m -b 4 --image-size 224
    python benchmarks/bench_train_memory.py --speed -b 8 --image-size 160 --repeats 7
    python benchmarks/bench_train_memory.py --speed --compile -b 8 --image-size 160 --repeats 7

``--compile`` adds timm's model and train.py's default under ``torch.compile`` (inductor, as ``train.py --compile``)
to both tables, and prints the compiled default against timm compiled (memory) and against itself eager (speed). The
hooks see what the compiled graph saves, which need not be what eager saves: inductor may recompute cheap ops, or keep
re-laid-out copies of weights (counted as non-parameters). The compiles themselves (minutes on a small CPU) are left
out of the times.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn as nn

from asl.models import create_model


def saved_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(all saved storages, saved storages that are not parameters), in bytes, for one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    total = sum(seen.values())
    return total, total - sum(n for ptr, n in seen.items() if ptr in params)


def step_seconds(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="sum").backward()
    optimizer.step()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-name", default="tresnet_m")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("-b", "--batch-size", type=int, default=4)
    parser.add_argument("--speed", action="store_true", help="also time training steps")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also timm and the default under torch.compile")
    args = parser.parse_args(argv)

    import timm

    torch.manual_seed(0)
    models = {
        "timm": timm.create_model(args.model_name, num_classes=80),
        "asl plain autograd": create_model(args.model_name, 80, memory_efficient=False),
        "asl memory-efficient": create_model(args.model_name, 80),
        # train.py's default: memory-efficient norms and channels_last
        "asl train.py default": create_model(args.model_name, 80).to(memory_format=torch.channels_last),
    }
    for model in models.values():
        model.train()
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size)
    y = (torch.rand(args.batch_size, 80) < 0.05).float()
    if args.compile:
        for name in ("timm", "asl train.py default"):
            compiled = torch.compile(copy.deepcopy(models[name]))
            # Compile outside the hooks, so that the saved bytes are those of the graph a training run uses.
            nn.functional.binary_cross_entropy_with_logits(compiled(x), y).backward()
            compiled.zero_grad(set_to_none=True)
            models[f"{name}, compiled"] = compiled

    ref_total, ref_act = saved_bytes(models["timm"], x)
    print(f"{args.model_name}, batch {args.batch_size} at {args.image_size}: bytes saved for backward")
    print(f"{'model':<32} {'all MiB':>9} {'ratio':>6} {'activations MiB':>16} {'ratio':>6}")
    activations = {}
    for name, model in models.items():
        total, activations[name] = saved_bytes(model, x)
        act = activations[name]
        print(f"{name:<32} {total / 2**20:9.1f} {total / ref_total:6.3f} {act / 2**20:16.1f} {act / ref_act:6.3f}")
    if args.compile:
        ratio = activations["asl train.py default, compiled"] / activations["timm, compiled"]
        print(f"activations, compiled default against timm compiled: {ratio:.3f}x")

    if args.speed:
        optimizers = {n: torch.optim.SGD(m.parameters(), lr=1e-6) for n, m in models.items()}
        times: dict[str, list[float]] = {n: [] for n in models}
        for n, m in models.items():
            step_seconds(m, optimizers[n], x, y)  # warm-up
        for _ in range(args.repeats):
            for n, m in models.items():
                times[n].append(step_seconds(m, optimizers[n], x, y))
        ref = statistics.median(times["timm"])
        print(f"training step (forward + backward + SGD), median of {args.repeats}, interleaved:")
        for n in models:
            med = statistics.median(times[n])
            print(f"{n:<32} {args.batch_size / med:7.2f} img/s  speed vs timm {ref / med:5.3f}x")
        if args.compile:
            ratio = (statistics.median(times["asl train.py default"])
                     / statistics.median(times["asl train.py default, compiled"]))
            print(f"compiled against eager (train.py's default): {ratio:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
