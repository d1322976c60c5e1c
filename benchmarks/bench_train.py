"""Training-step throughput and peak memory: the recipe's step (AMP forward, fp32 ASL, scaled backward, Adam,
EMA) on random data, for each model / size / precision asked. Meant for one prepared run on a GPU:

    python benchmarks/bench_train.py --device cuda --models tresnet_m tresnet_l --sizes 224 448 \
        --amp-dtypes float16 bfloat16 none -b 64 --steps 20

Prints one JSON object per configuration (images/s over the timed steps, peak CUDA memory) and a table.
On CPU it runs too (`--device cpu --amp-dtypes none`), which is how it is smoke-tested.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from asl.ema import ModelEma
from asl.engine import create_optimizer
from asl.losses import AsymmetricLoss
from asl.models import create_model
from asl.precision import AMP_DTYPES


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model_name: str, size: int, amp: str, batch: int, steps: int, warmup: int,
            device: torch.device) -> dict:
    torch.manual_seed(0)
    model = create_model(model_name, 80).to(device).train()
    ema = ModelEma(model, 0.9997)
    optimizer = create_optimizer(model, lr=1e-4, weight_decay=1e-4)
    criterion = AsymmetricLoss(gamma_neg=4, gamma_pos=0, clip=0.05, disable_torch_grad_focal_loss=True)
    dtype = AMP_DTYPES[amp]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    x = torch.rand(batch, 3, size, size, device=device)
    y = (torch.rand(batch, 80, device=device) < 0.05).float()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(x).float()
        loss = criterion(out, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        ema.update(model)
    _sync(device)
    elapsed = time.perf_counter() - start
    return {
        "model": model_name, "image_size": size, "amp": amp, "batch": batch, "device": str(device),
        "images_per_sec": round(batch * steps / elapsed, 1),
        "peak_memory_gib": (round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                            if device.type == "cuda" else None),
        "torch": torch.__version__,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["tresnet_m"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[224])
    parser.add_argument("--amp-dtypes", nargs="+", default=["float16", "bfloat16"], choices=sorted(AMP_DTYPES))
    parser.add_argument("-b", "--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rows = []
    for name in args.models:
        for size in args.sizes:
            for amp in args.amp_dtypes:
                try:
                    row = measure(name, size, amp, args.batch_size, args.steps, args.warmup, device)
                except torch.OutOfMemoryError:
                    row = {"model": name, "image_size": size, "amp": amp, "batch": args.batch_size,
                           "error": "out of memory"}
                    torch.cuda.empty_cache()
                print(json.dumps(row), flush=True)
                rows.append(row)
    print("\n| model | size | amp | batch | images/s | peak memory (GiB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['image_size']} | {r['amp']} | {r['batch']} | {r.get('images_per_sec', '-')} "
              f"| {r.get('peak_memory_gib', r.get('error', '-'))} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
