"""Helpers shared by the command lines (train.py, validate.py, infer.py, export.py).

Three things every script needs and that should behave the same everywhere:

* :class:`ArgumentParser` accepts each long flag in both spellings (``--model-path`` and ``--model_path``):
  the original scripts used underscores in some places and dashes in others, and users copy commands
  from both. Every option must declare a ``type`` (or a store-true/false style ``action``), because the
  original's untyped ``--num-classes`` silently became a string.
* :func:`run_main` turns an exception into one clear line on stderr and a non-zero exit code instead of a
  traceback: exit code 2 for bad input (:data:`USER_ERRORS`), 1 for anything else. Set the environment
  variable ``ASL_TRACEBACK=1`` to see the full traceback while debugging.
* :func:`select_device` maps ``auto|cpu|cuda|cuda:N`` to a :class:`torch.device`.

Typical use in a script::

    from asl.cli import ArgumentParser, UsageError, run_main, select_device

    def main(argv=None) -> int:
        args = ArgumentParser(description=...).parse_args(argv)
        ...
        return 0

    if __name__ == "__main__":
        sys.exit(run_main(main))

The library itself never exits or prints; only these CLI helpers do.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Any, Callable, Optional, Sequence

import torch

from .errors import AslError, UsageError

__all__ = [
    "ArgumentParser", "UsageError", "USER_ERRORS", "run_main", "format_error", "select_device",
    "str2bool", "setup_logging", "parse_key_values", "check_data_dir",
]

logger = logging.getLogger(__name__)

#: actions that take no value, and therefore need no ``type``.
_VALUELESS_ACTIONS = {"store_true", "store_false", "store_const", "count", "help", "version",
                      argparse.BooleanOptionalAction}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with both spellings of each long flag and a mandatory ``type`` for every option.

    ``add_argument('--model-path', ...)`` also registers ``--model_path`` (and vice versa); the
    destination is the underscore form, as argparse makes it. The help lists only the spelling that was
    declared, to keep it readable. Abbreviations are disabled: with two spellings per flag, prefixes
    would be ambiguous.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        # Required options with aliases are checked after parsing: argparse's own check would not count the
        # alias spelling (``--model_path``) as giving the option declared as ``--model-path``.
        self._required_options: dict[str, str] = {}

    def add_argument(self, *name_or_flags: str, **kwargs: Any) -> argparse.Action:  # type: ignore[override]
        is_option = bool(name_or_flags) and name_or_flags[0].startswith("-")
        action = kwargs.get("action", "store")
        if is_option and action not in _VALUELESS_ACTIONS and "type" not in kwargs and "choices" not in kwargs:
            raise TypeError(f"option {name_or_flags[0]} needs an explicit type=")
        if not is_option:
            return super().add_argument(*name_or_flags, **kwargs)
        kwargs.setdefault("dest", self._dest_for(name_or_flags))
        names = list(name_or_flags)
        aliases = []
        for name in name_or_flags:
            if name.startswith("--") and len(name) > 2:
                body = name[2:]
                for other in ("--" + body.replace("-", "_"), "--" + body.replace("_", "-")):
                    if other not in names and other not in aliases:
                        aliases.append(other)
        if aliases and kwargs.get("required"):
            kwargs["required"] = False
            self._required_options[kwargs["dest"]] = names[0]
        main_action = super().add_argument(*names, **kwargs)
        if aliases:
            # The alias shares dest and default; SUPPRESS keeps it out of --help and away from defaults.
            alias_kwargs = dict(kwargs, help=argparse.SUPPRESS, default=argparse.SUPPRESS)
            alias_kwargs.pop("required", None)
            super().add_argument(*aliases, **alias_kwargs)
        return main_action

    def parse_known_args(self, args: Optional[Sequence[str]] = None, namespace: Any = None):  # type: ignore[override]
        parsed, extras = super().parse_known_args(args, namespace)
        missing = [flag for dest, flag in self._required_options.items() if getattr(parsed, dest, None) is None]
        if missing:
            self.error(f"the following arguments are required: {', '.join(missing)}")
        return parsed, extras

    def error(self, message: str):  # type: ignore[override]
        """Usage errors as one line (argparse would print the whole usage block first), exit code 2."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    @staticmethod
    def _dest_for(flags: Sequence[str]) -> str:
        longs = [f for f in flags if f.startswith("--")]
        name = (longs[0] if longs else flags[0]).lstrip("-")
        return name.replace("-", "_")


def format_error(exc: BaseException, prog: Optional[str] = None) -> str:
    """One line: ``prog: error: message`` (the message of the exception, or its type if it has none)."""
    msg = str(exc).strip().replace("\n", " ") or type(exc).__name__
    if isinstance(exc, (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError)) \
            and exc.filename is not None and str(exc.filename) not in msg:
        msg = f"{msg}: {exc.filename}"
    prog = prog or os.path.basename(sys.argv[0]) or "asl"
    return f"{prog}: error: {msg}"


def run_main(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None,
             prog: Optional[str] = None) -> int:
    """Calls ``main(argv)`` and converts exceptions into one line on stderr and an exit code.

    Returns the code (0 on success, ``main``'s own return value if it is an int, 2 for bad input, 1 for
    any other error, 130 on Ctrl-C). argparse's own ``SystemExit`` (usage errors, ``--help``) passes
    through with its code.
    """
    try:
        code = main(argv)
        return int(code) if isinstance(code, int) else 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        print(format_error(KeyboardInterrupt("interrupted"), prog), file=sys.stderr)
        return 130
    except AslError as exc:
        # Bad input: one line. ASL_TRACEBACK=1 shows where it was raised, for debugging.
        if os.environ.get("ASL_TRACEBACK"):
            traceback.print_exc()
        print(format_error(exc, prog), file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - a bug: show it in full
        traceback.print_exc()
        return 1


def select_device(name: str = "auto", local_rank: Optional[int] = None) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Under torchrun ``local_rank`` picks this process's GPU when the name does not give an index.
    Raises :class:`UsageError` when CUDA is asked for but absent.
    """
    key = (name or "auto").strip().lower()
    if key == "auto":
        key = "cuda" if torch.cuda.is_available() else "cpu"
    if key == "cpu":
        return torch.device("cpu")
    if key.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        device = torch.device(key)
        if device.index is None:
            device = torch.device("cuda", local_rank or 0)
        if device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
        return device
    if key == "mps" and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    raise UsageError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")


def setup_logging(verbose: bool = False, main_process: bool = True) -> None:
    """Plain ``message`` logging on stderr for the main process; warnings only on the other ranks."""
    level = logging.DEBUG if verbose else logging.INFO
    if not main_process:
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)


def _number_or_text(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_key_values(items: Sequence[str], flag: str = "--dataset-option") -> dict[str, Any]:
    """``['num_train=64', 'csv-file=a.csv']`` -> ``{'num_train': 64, 'csv_file': 'a.csv'}`` (numbers cast)."""
    options: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"{flag} expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        options[key.strip().replace("-", "_")] = _number_or_text(value.strip())
    return options


def check_data_dir(path: str, generated: bool = False) -> None:
    """A missing or unreadable dataset root is bad input; ``generated`` data (synthetic) may not exist yet."""
    if generated and not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise UsageError(f"data directory not found: {path}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UsageError(f"data directory is not readable: {path}")
