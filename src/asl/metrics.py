"""The metrics' public path, kept for code that imports ``asl.metrics``; they live in :mod:`asl.evaluation.metrics`."""
from .evaluation.metrics import *  # noqa: F401,F403
from .evaluation.metrics import __all__  # noqa: F401
