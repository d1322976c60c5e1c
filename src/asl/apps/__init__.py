"""The command-line programs, importable: each module has ``main(argv=None) -> exit code``.

``train``, ``validate``, ``infer``, ``export`` and ``ablate`` run as the repository's root scripts
(``python train.py``), as ``python -m asl.apps.<name>``, or as the installed commands ``asl-train``,
``asl-validate``, ``asl-infer``, ``asl-export``, ``asl-ablate``.
"""
import os

# MKL (torch's CPU BLAS) may pick its kernels by the memory alignment of each call's arrays unless its
# "conditional numerical reproducibility" mode is on, so two runs of the same command could differ in the last
# bits. The programs turn it on before torch is imported (this package's modules import torch only below it);
# a value set by the user wins (MKL_CBWR=OFF opts out). Its cost is in docs/speed.md. A script that imports torch
# itself should set it first.
os.environ.setdefault("MKL_CBWR", "AUTO")
