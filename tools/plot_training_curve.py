"""Plots a training curve from train.py's OUTPUT_DIR/log.txt (one JSON object per epoch).

    python tools/plot_training_curve.py models/log.txt --output pics/training_curve.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_log(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    if not rows:
        raise ValueError(f"{path} holds no epoch records")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path)
    parser.add_argument("--output", default="pics/training_curve.png")
    args = parser.parse_args(argv)
    try:
        rows = read_log(args.log)
    except (OSError, ValueError) as err:
        print(f"error: {err}")
        return 2

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_map, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("mAP_regular", "regular"), ("mAP_ema", "EMA")):
        if key in rows[0]:
            ax_map.plot(epochs, [r[key] for r in rows], marker="o", label=label)
    ax_map.set_xlabel("epoch")
    ax_map.set_ylabel("validation mAP (%)")
    ax_map.legend()
    ax_map.grid(alpha=0.3)
    loss_key = "train_loss" if "train_loss" in rows[0] else "loss"
    ax_loss.plot(epochs, [r[loss_key] for r in rows], marker="o", color="tab:red")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss (ASL, summed per batch)")
    ax_loss.grid(alpha=0.3)
    fig.suptitle(f"Training curve ({args.log})")
    fig.tight_layout()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
