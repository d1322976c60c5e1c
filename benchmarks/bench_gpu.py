"""TResNet + ASL against timm's TResNet on one GPU: training images/s and peak memory (AMP fp16 and bf16,
channels_last on and off, torch.compile on and off) and inference images/s. Run through benchmarks/gpu.sh.

Each configuration runs ours and timm's with the same settings, interleaved in one process (warm-up, then timed
steps), and prints one JSON line; a Markdown table closes the run. ``--dry-run`` does the same on the CPU with a
tiny model, input and step count, to check the script without a GPU.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from typing import Optional

import torch
import torch.nn as nn

from asl.losses import AsymmetricLoss
from asl.models import create_model, prepare_for_inference
from asl.precision import AMP_DTYPES, autocast


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _models(name: str, device: torch.device, channels_last: bool, compile_: bool) -> dict[str, nn.Module]:
    import timm

    torch.manual_seed(0)
    models = {"asl": create_model(name, 80), "timm": timm.create_model(name, num_classes=80)}
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return {k: (torch.compile(m.to(device, memory_format=fmt)) if compile_ else m.to(device, memory_format=fmt))
            for k, m in models.items()}


def train_throughput(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: str, steps: int,
                     warmup: int) -> tuple[float, Optional[float]]:
    """(images/s, peak GiB) of the recipe's step: autocast forward, fp32 summed ASL, scaled backward, Adam."""
    device = x.device
    dtype = AMP_DTYPES[amp]
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    criterion = AsymmetricLoss(gamma_neg=4, gamma_pos=0, clip=0.05, disable_torch_grad_focal_loss=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        with autocast(device, dtype):
            out = model(x).float()
        loss = criterion(out, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    _sync(device)
    elapsed = time.perf_counter() - start
    peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
    return x.shape[0] * steps / elapsed, peak


@torch.inference_mode()
def eval_throughput(model: nn.Module, x: torch.Tensor, amp: str, steps: int, warmup: int) -> float:
    model.eval()
    for step in range(warmup + steps):
        if step == warmup:
            _sync(x.device)
            start = time.perf_counter()
        with autocast(x.device, AMP_DTYPES[amp]):
            model(x)
    _sync(x.device)
    return x.shape[0] * steps / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tresnet_l")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("-b", "--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tresnet_m, 64 px, batch 2, 1 step, no compile")
    args = parser.parse_args(argv)
    if args.dry_run:
        device, args.model, args.image_size, args.batch_size, args.steps, args.warmup = "cpu", "tresnet_m", 64, 2, 1, 0
        grid = list(itertools.product(["bfloat16"], [False, True], [False]))
    else:
        device = "cuda"
        torch.backends.cudnn.benchmark = True
        # compile only where it is likeliest to be used: each compile costs minutes of the 8-minute budget.
        grid = list(itertools.product(["float16", "bfloat16"], [False, True], [False])) + [("bfloat16", True, True)]
    device = torch.device(device)
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = (torch.rand(args.batch_size, 80, device=device) < 0.05).float()
    rows = []
    for amp, channels_last, compile_ in grid:
        models = _models(args.model, device, channels_last, compile_)
        xf = x.contiguous(memory_format=torch.channels_last) if channels_last else x
        row = {"model": args.model, "size": args.image_size, "batch": args.batch_size, "amp": amp,
               "channels_last": channels_last, "compile": compile_, "device": str(device)}
        for name, model in models.items():
            ips, peak = train_throughput(model, xf, y, amp, args.steps, args.warmup)
            row[f"{name}_train_img_s"], row[f"{name}_peak_gib"] = round(ips, 1), peak
        inference = {"asl": prepare_for_inference(create_model(args.model, 80).to(device)),
                     "timm": models["timm"]}
        for name, model in inference.items():
            row[f"{name}_eval_img_s"] = round(eval_throughput(model, xf, amp, args.steps, args.warmup), 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
        del models, inference
    print("\n| amp | channels_last | compile | train img/s asl / timm | peak GiB asl / timm | eval img/s asl / timm |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['amp']} | {r['channels_last']} | {r['compile']} | {r['asl_train_img_s']} / "
              f"{r['timm_train_img_s']} | {r['asl_peak_gib']} / {r['timm_peak_gib']} | {r['asl_eval_img_s']} / "
              f"{r['timm_eval_img_s']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
