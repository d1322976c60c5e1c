"""The command-line programs, importable: each module has ``main(argv=None) -> exit code``.

``train``, ``validate``, ``infer`` and ``export`` run as the repository's root scripts (``python train.py``),
as ``python -m asl.apps.<name>``, or as the installed commands ``asl-train``, ``asl-validate``, ``asl-infer``,
``asl-export``.
"""
