"""State-dict keys as files carry them: wrapper prefixes and BatchNorm counters, cleaned in one place
(:func:`asl.checkpoint.load_checkpoint` calls it once for every file it reads)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

__all__ = ["WRAPPER_PREFIXES", "is_counter", "clean_state_dict"]

#: prefixes added by (Distributed)DataParallel (``module.``) and torch.compile (``_orig_mod.``), in any nesting.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def is_counter(key: str) -> bool:
    """BatchNorm's ``num_batches_tracked``: absent from the official files, unused by the models here."""
    return isinstance(key, str) and key.endswith("num_batches_tracked")


def clean_state_dict(state_dict: Mapping[str, Any]) -> "OrderedDict[str, Any]":
    """The keys without wrapper prefixes, in the same order."""
    cleaned: "OrderedDict[str, Any]" = OrderedDict()
    for key, value in state_dict.items():
        stripped = isinstance(key, str)
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        cleaned[key] = value
    return cleaned
