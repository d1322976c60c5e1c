"""The package's errors for bad input: one base class, so that the command lines can tell them from bugs.

An :class:`AslError` means the user asked for something that cannot be done (a missing file, a flag out of range,
a checkpoint for another model); its message is one line saying what and where. The command lines print it and
exit with code 2. Any other exception is a bug and keeps its traceback (exit code 1).
"""
from __future__ import annotations

__all__ = ["AslError", "UsageError", "ModelError", "DatasetError", "CheckpointError", "TrainingDivergedError",
           "NonFiniteScoresError", "UnknownArchitectureError"]


class AslError(Exception):
    """Bad input. The message is one line naming the flag, file or value at fault.

    Raised in a DataLoader worker, the error reaches the main process through torch's ``ExceptionWrapper``, which
    rebuilds it from a message holding the worker's whole traceback ("Caught ... Original Traceback ..."); the
    constructor keeps the original one-line message, so that the command line still prints one line."""

    def __init__(self, *args) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (_without_worker_traceback(args[0]),)
        super().__init__(*args)


def _without_worker_traceback(message: str) -> str:
    if message.startswith("Caught ") and "Original Traceback" in message:
        last = message.rstrip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return message


class UsageError(AslError):
    """A command-line value that cannot be used (a flag out of range, a missing or unwritable folder)."""


class ModelError(AslError, ValueError):
    """An unknown model name or a model that cannot be built as asked (a ``ValueError`` too, as documented for
    :func:`asl.models.create_model`)."""


class DatasetError(AslError, ValueError):
    """A dataset that cannot be used as given: unknown name or option, missing folder or annotation file,
    malformed labels, or (with ``strict=True``) an unreadable image."""


class CheckpointError(AslError):
    """A checkpoint that cannot be saved, read or trusted, or that does not fit the model."""


class TrainingDivergedError(AslError):
    """The loss or the weights became NaN or infinite: the run stops, and no checkpoint holds the broken weights."""


class NonFiniteScoresError(AslError):
    """A model gave NaN or infinite scores: its weights are broken, and an mAP of them would mean nothing."""


class UnknownArchitectureError(CheckpointError):
    """A state dict whose tensor shapes are no TResNet: the architecture has to come from elsewhere (the
    checkpoint's ``model_name``, or ``--model-name`` for a ``timm/<name>`` network)."""
