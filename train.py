"""Train a multi-label classifier with the Asymmetric Loss (the paper's recipe by default).

A thin shim: the program is :mod:`asl.apps.train` (see ``python train.py --help``).
"""
import sys

from asl.apps.train import main

if __name__ == "__main__":
    sys.exit(main())
