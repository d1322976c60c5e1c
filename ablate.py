"""The paper's loss ablation (CE, focal, ASL, a gamma_neg sweep) with train.py's recipe: a table and a plot.

A thin shim: the program is :mod:`asl.apps.ablate` (see ``python ablate.py --help``).
"""
import sys

from asl.apps.ablate import main

if __name__ == "__main__":
    sys.exit(main())
