"""fp32 against CPU bf16 autocast (``--amp-dtype bfloat16``) on real photos: the mAP of each, how far the scores
move, and the speed, for one checkpoint on one or more COCO-layout splits, in one process.

    python train.py ../shared/data/tiny_coco --train-split train2017 --val-split val2017 --image-size 128 -b 10 \\
        -j 0 --epochs 8 --stop-epoch 7 --lr 2e-3 --ema-decay 0.9 --device cpu --output-dir bf16run
    python benchmarks/bench_cpu_bf16.py ../shared/data/tiny_coco --model-path bf16run/model-highest.pth \\
        --split train2017 --split val2017
"""
from __future__ import annotations

import argparse
import time

import torch

from asl.cli import positive_int
from asl.data import create_dataset, create_loader
from asl.evaluation.predictions import evaluate
from asl.metrics import mAP
from asl.models.loading import load_model
from asl.precision import cpu_has_native_bf16


def _timed(model: torch.nn.Module, loader, amp_dtype) -> tuple[dict, float]:
    start = time.perf_counter()
    out = evaluate(model, loader, torch.device("cpu"), amp_dtype=amp_dtype)
    return out, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--split", action="append", required=True)
    parser.add_argument("--dataset", default="coco")
    parser.add_argument("--image-size", type=positive_int, default=None, help="default: the checkpoint's")
    parser.add_argument("-b", "--batch-size", type=positive_int, default=8)
    args = parser.parse_args(argv)

    loaded = load_model(args.model_path, device="cpu")
    size = args.image_size or loaded.image_size
    print(f"{loaded.model_name} at {size} px, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"native bf16: {cpu_has_native_bf16()}")
    print("| split | images | mAP fp32 | mAP bf16 | change | max score change | median | bf16 speed vs fp32 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for split in args.split:
        ds = create_dataset(args.dataset, args.data, split, size, train=False, with_index=True)
        loader = create_loader(ds, args.batch_size)
        evaluate(loaded.model, loader, torch.device("cpu"), amp_dtype=torch.bfloat16)  # warm-up of both paths
        fp32, t32 = _timed(loaded.model, loader, None)
        bf16, t16 = _timed(loaded.model, loader, torch.bfloat16)
        a, b = mAP(fp32["targets"], fp32["scores"]), mAP(bf16["targets"], bf16["scores"])
        moved = (torch.as_tensor(fp32["scores"]) - torch.as_tensor(bf16["scores"])).abs()
        print(f"| {split} | {len(ds)} | {a:.2f} | {b:.2f} | {b - a:+.2f} | {moved.max().item():.4f} | "
              f"{moved.median().item():.4f} | {t32 / t16:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
