"""Export a checkpoint to ONNX.

A thin shim: the program is :mod:`asl.apps.export` (see ``python export.py --help``).
"""
import sys

from asl.apps.export import main

if __name__ == "__main__":
    sys.exit(main())
