"""Detect the classes in pictures (files or folders) with a checkpoint; headless.

A thin shim: the program is :mod:`asl.apps.infer` (see ``python infer.py --help``).
"""
import sys

from asl.apps.infer import main

if __name__ == "__main__":
    sys.exit(main())
