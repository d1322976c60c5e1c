"""Evaluate a checkpoint (model-zoo file or ours, path or URL): mAP and the threshold metrics.

A thin shim: the program is :mod:`asl.apps.validate` (see ``python validate.py --help``).
"""
import sys

from asl.apps.validate import main

if __name__ == "__main__":
    sys.exit(main())
