"""Write a dataset split as WebDataset shards, for ``--dataset webdataset`` in train.py, validate.py and ablate.py.

A thin shim: the program is :mod:`asl.apps.shards` (see ``python shards.py --help``).
"""
import sys

from asl.apps.shards import main

if __name__ == "__main__":
    sys.exit(main())
