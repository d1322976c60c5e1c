"""`make demo`: the whole pipeline on generated data, through the real scripts, in under 3 minutes on 2 CPU cores.

1. generate the synthetic COCO-format set (shapes on clutter, 256-px pictures) under demo_data/;
2. train TResNet-M on it with train.py: the paper's recipe (ASL 4/0/0.05, Adam, OneCycle, EMA, Cutout,
   RandAugment) at 64 px for 3 epochs with a higher peak learning rate (a short run from scratch);
3. validate the best checkpoint with validate.py, with its evaluation report (demo_out/report/README.md);
4. run infer.py on a few validation pictures, writing annotated copies under pics/demo/;
5. print the final mAP next to chance level (the mAP of random scores on the same labels), and fail (exit 1)
   unless it beats chance by 20 points.

3 epochs reach 63.4 mAP against a chance level of 33.2 (5 epochs: 69.0), so the promise holds with 10 points to
spare at about 60% of the 5-epoch run's training time (BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def run(step: str, args: list[str]) -> None:
    """Runs one of the repository's scripts on this terminal, so its progress shows live; stops on failure."""
    print(f"\n=== {step}: python {shlex.join(args)}", flush=True)
    start = time.perf_counter()
    returncode = subprocess.call([sys.executable, *args], cwd=REPO)
    print(f"=== {step} took {time.perf_counter() - start:.0f} s", flush=True)
    if returncode != 0:
        raise SystemExit(f"demo step '{step}' failed with exit code {returncode}")


def generate(data: Path, picture_size: int) -> None:
    """The demo set, generated again if an earlier version left one with other pictures."""
    from asl.data import generate_synthetic_coco

    annotation = data / "annotations" / "instances_val.json"
    if annotation.is_file() and json.loads(annotation.read_text())["info"].get("image_size") == picture_size:
        return
    print(f"\n=== generate: {data}/ ({picture_size}-px pictures)", flush=True)
    generate_synthetic_coco(data, image_size=picture_size)


def chance_map(data: Path, split: str) -> float:
    """mAP of uniformly random scores on the validation labels: the floor a trained model must beat."""
    from asl.data import create_dataset
    from asl.metrics import mAP

    dataset = create_dataset("synthetic", data, split, 64, train=False)
    targets = np.stack([dataset.target(i).numpy() for i in range(len(dataset))])
    scores = np.random.default_rng(0).random(targets.shape)
    return mAP(targets, scores)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="demo_data")
    parser.add_argument("--output-dir", default="demo_out")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64, help="network input size")
    parser.add_argument("--picture-size", type=int, default=256,
                        help="side of the generated pictures (the annotated copies are drawn from them)")
    parser.add_argument("--lr", default="1e-3", help="peak OneCycle learning rate (the paper: 1e-4 over 40 epochs)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    models = Path(args.output_dir) / "models"
    size = str(args.image_size)
    generate(Path(args.data), args.picture_size)

    run("train", ["train.py", args.data, "--dataset", "synthetic", "--model-name", "tresnet_m", "--model-path", "",
                  "--image-size", size, "-b", "16", "-j", "2", "--lr", args.lr, "--epochs", str(args.epochs),
                  "--stop-epoch", str(args.epochs - 1), "--ema-decay", "0.97", "--print-freq", "20",
                  "--output-dir", str(models), "--cache-dir", str(Path(args.output_dir) / "cache")])
    checkpoint = models / "model-highest.pth"
    report = Path(args.output_dir) / "validate.json"
    run("validate", ["validate.py", args.data, "--dataset", "synthetic", "--val-split", "val",
                     "--model-path", str(checkpoint), "--image-size", size, "-b", "64", "-j", "2",
                     "--thre", "0.7", "--output-json", str(report), "--report", str(Path(args.output_dir) / "report")])
    pictures = sorted((Path(args.data) / "val").glob("*.jpg"))[:4]
    run("infer", ["infer.py", "--model_path", str(checkpoint), "--input_size", size, "--th", "0.7",
                  "--output", "pics/demo", "--pic_path", *map(str, pictures)])
    run("plot", ["tools/plot_training_curve.py", str(models / "log.txt"), "--output", "pics/demo/training_curve.png"])

    final = float(json.loads(report.read_text())["mAP"])
    chance = chance_map(Path(args.data), "val")
    print(f"\nDemo done in {time.perf_counter() - started:.0f} s: validation mAP {final:.2f} "
          f"(chance level {chance:.2f}); annotated pictures in pics/demo/, evaluation report in "
          f"{Path(args.output_dir) / 'report' / 'README.md'}")
    return 0 if final > chance + 20 else 1


if __name__ == "__main__":
    raise SystemExit(main())
