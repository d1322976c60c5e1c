"""Draws the paper's loss-gradient figure from `asl.losses` with autograd: |dL/dz| against p = sigmoid(z).

For a single logit z with probability p, CE, focal loss and ASL differ in how hard they push: ASL's
asymmetric focusing and probability margin all but silence the easy negatives (small p) and discard the
very-high-p negatives that are likely mislabelled. The gradient here is the full one (the focal weight is
differentiated too, disable_torch_grad_focal_loss=False), which is the quantity the paper plots.

    python tools/plot_loss_gradients.py --output pics/loss_gradients.png
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from asl.losses import AsymmetricLoss

SETTINGS = {
    "CE": dict(gamma_neg=0, gamma_pos=0, clip=0),
    "Focal loss (gamma=2)": dict(gamma_neg=2, gamma_pos=2, clip=0),
    "ASL (gamma-=4, gamma+=0, m=0.05)": dict(gamma_neg=4, gamma_pos=0, clip=0.05),
}


def loss_gradient(settings: dict, target: float, p: torch.Tensor) -> torch.Tensor:
    """|dL/dz| at each probability in ``p`` for one label with the given target."""
    loss_fn = AsymmetricLoss(disable_torch_grad_focal_loss=False, **settings)
    z = torch.logit(p.double()).float().requires_grad_(True)
    loss = loss_fn(z[:, None], torch.full((len(p), 1), target))
    (grad,) = torch.autograd.grad(loss, z)
    return grad.abs()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="pics/loss_gradients.png")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = torch.linspace(0.001, 0.999, 999)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, target, title in ((axes[0], 0.0, "Negative samples"), (axes[1], 1.0, "Positive samples")):
        for name, settings in SETTINGS.items():
            ax.plot(p.numpy(), loss_gradient(settings, target, p).numpy(), label=name)
        ax.set_title(title)
        ax.set_xlabel("probability p")
        ax.set_ylabel("|dL/dz|")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Loss gradients, from asl.losses with autograd")
    fig.tight_layout()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
