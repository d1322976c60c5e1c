"""Command-line plumbing shared by the apps: the argument parser, typed flag values, checks of the paths given
(read before any work, written before any long work), logging and exit codes.

Contract: every long flag works with dashes and with underscores (``--model-path`` and ``--model_path``: the
original used both), every option has a type, and :func:`run_main` maps bad input (:class:`~asl.errors.AslError`)
to one line on stderr and exit code 2, a bug to its traceback and exit code 1.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .errors import AslError, UsageError
from .models.factory import MAX_IMAGE_SIZE

__all__ = [
    "ArgumentParser", "run_main", "format_error", "setup_logging", "parse_key_values", "check_data_dir",
    "positive_int", "nonnegative_int", "positive_float", "probability", "image_size",
]

#: actions that take no value, and therefore need no ``type``.
_VALUELESS_ACTIONS = {"store_true", "store_false", "store_const", "count", "help", "version",
                      argparse.BooleanOptionalAction}


def _spellings(flag: str) -> list[str]:
    """``--model-path`` -> ``['--model-path', '--model_path']`` (and the other way round); short flags alone."""
    if not flag.startswith("--"):
        return [flag]
    body = flag[2:]
    return list(dict.fromkeys([flag, "--" + body.replace("_", "-"), "--" + body.replace("-", "_")]))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default after its help, once: not where the help already speaks of its default, nor
    where the default only means "not given" (None, False, '', an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        default = action.default
        unset = default is None or default is False or (isinstance(default, (str, list)) and not default)
        if unset or "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that declares both spellings of every long flag as option strings of one argument and refuses an
    option without a ``type``. Abbreviations are off: with two spellings per flag, prefixes would be ambiguous.
    Usage errors are one line, exit code 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *name_or_flags: str, **kwargs: Any) -> argparse.Action:  # type: ignore[override]
        if not name_or_flags or not name_or_flags[0].startswith("-"):
            return super().add_argument(*name_or_flags, **kwargs)
        if kwargs.get("action", "store") not in _VALUELESS_ACTIONS and "type" not in kwargs \
                and "choices" not in kwargs:
            # original: the untyped --num-classes silently became a string.
            raise TypeError(f"option {name_or_flags[0]} needs an explicit type=")
        longs = [f for f in name_or_flags if f.startswith("--")]
        kwargs.setdefault("dest", (longs[0] if longs else name_or_flags[0]).lstrip("-").replace("-", "_"))
        flags = list(dict.fromkeys(s for flag in name_or_flags for s in _spellings(flag)))
        return super().add_argument(*flags, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ------------------------------------------------------------------------------------- typed flag values

def _number(cast: Callable[[str], Any], text: str, what: str) -> Any:
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _checked(cast: Callable[[str], Any], text: str, what: str, ok: Callable[[Any], bool]) -> Any:
    value = _number(cast, text, what)
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _checked(int, text, "an integer >= 1", lambda v: v >= 1)


def image_size(text: str) -> int:
    """A square input side: 1 to :data:`MAX_IMAGE_SIZE` (a typo like 100000 would try to allocate ~40 GB)."""
    value = positive_int(text)
    if value > MAX_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_IMAGE_SIZE} pixels, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    return _checked(int, text, "an integer >= 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    return _checked(float, text, "a positive number", lambda v: v > 0)


def nonnegative_float(text: str) -> float:
    return _checked(float, text, "a number >= 0", lambda v: v >= 0)


#: the largest --lr: Adam's first step moves a weight by up to 10x the learning rate, and a step size above
#: float32's range (about 3.4e38) crashes inside the optimizer ("value cannot be converted to type float without
#: overflow"). Below this bound a too-high rate only makes the run diverge, which is stopped with a message.
MAX_LEARNING_RATE = 1e30


def learning_rate(text: str) -> float:
    return _checked(float, text, f"a learning rate within (0, {MAX_LEARNING_RATE:g}]",
                    lambda v: 0 < v <= MAX_LEARNING_RATE)


def margin(text: str) -> float:
    """ASL's probability margin (``clip``): within [0, 1)."""
    return _checked(float, text, "a number within [0, 1)", lambda v: 0.0 <= v < 1.0)


def probability(text: str) -> float:
    return _checked(float, text, "a number within [0, 1]", lambda v: 0.0 <= v <= 1.0)


def parse_key_values(items: Sequence[str], flag: str = "--dataset-option") -> dict[str, Any]:
    """``['num_train=64', 'csv-file=a.csv']`` -> ``{'num_train': 64, 'csv_file': 'a.csv'}`` (numbers cast)."""
    options: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"{flag} expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        if not key.strip():
            raise UsageError(f"{flag} expects KEY=VALUE, got {item!r} (no key)")
        options[key.strip().replace("-", "_")] = _number_or_text(value.strip())
    return options


def _number_or_text(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


# ------------------------------------------------------------------------------------------ paths given

def check_data_dir(path: str, generated: bool = False) -> None:
    """A missing or unreadable dataset root is bad input; ``generated`` data (synthetic) may not exist yet."""
    if generated and not os.path.exists(path):
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"data directory {path} is a file; give the dataset's folder (layouts: Datasets.md)")
    if not os.path.isdir(path):
        raise UsageError(f"data directory not found: {path}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UsageError(f"data directory is not readable: {path}")


def check_writable(flag: str, target: Path) -> None:
    """A file that can be created or replaced: not a folder, a name the file system takes, and a folder above it
    that exists or can be created."""
    # os.path, not Path methods: they raise for a name too long, which is checked below with a clear message.
    target = Path(target)
    if os.path.isdir(target):
        raise UsageError(f"{flag} {target} is a folder; give a file name")
    check_folder(flag, target.parent, shown=target)


def check_folder(flag: str, folder: Path, shown: Optional[Path] = None, probed: Optional[set] = None) -> None:
    """A folder that exists or can be created: the nearest existing path at or above it is a folder this process
    may write in, and no name on the way is too long. ``shown``: the path the user gave, named in the message
    (default: ``folder``); ``probed``: folders already found writable, when many are checked."""
    folder = Path(folder)
    shown = folder if shown is None else Path(shown)
    chain = [folder, *folder.parents]
    existing = next((p for p in chain if os.path.lexists(p)), Path("."))
    if probed is None or existing not in probed:
        if not os.path.isdir(existing):
            what = "a file" if os.path.exists(existing) else "a symbolic link to nothing"
            raise UsageError(f"{flag} {shown}: {existing} is {what}, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UsageError(f"{flag} {shown}: {existing} is not writable")
        # os.access trusts the permission bits, and root passes them everywhere: a file created (and removed at
        # once) is the only sure test, e.g. of /proc or of a read-only bind mount.
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as exc:
            raise UsageError(f"{flag} {shown}: cannot create a file in {existing} ({exc.strerror or exc})") from None
        if probed is not None:
            probed.add(existing)
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no such limit: the usual one
        limit = 255
    created = [p.name for p in chain[:chain.index(existing)]] + ([shown.name] if shown != folder else [])
    for name in created:
        if len(os.fsencode(name)) > limit:
            raise UsageError(f"{flag} {shown}: the name {name[:40]}... is longer than the {limit} bytes that "
                             f"{existing} allows")


# ------------------------------------------------------------------------------------ logging, exit codes

class _CurrentStderr(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a record comes, not as it was at setup: an app called in-process (a
    notebook, a test) may run under a stderr that is replaced, and closed, once it returns."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(verbose: bool = False, main_process: bool = True) -> None:
    """Plain ``message`` logging on stderr for the main process; warnings only on the other ranks."""
    level = logging.DEBUG if verbose else logging.INFO
    if not main_process:
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", handlers=[_CurrentStderr()], force=True)


def format_error(exc: BaseException, prog: Optional[str] = None) -> str:
    """One line: ``prog: error: message`` (the message of the exception, or its type if it has none)."""
    msg = str(exc).strip().replace("\n", " ") or type(exc).__name__
    prog = prog or os.path.basename(sys.argv[0]) or "asl"
    return f"{prog}: error: {msg}"


def run_main(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None,
             prog: Optional[str] = None) -> int:
    """Calls ``main(argv)`` and returns the exit code: ``main``'s own (0 if it returns None), 2 for bad input
    (one line on stderr), 1 for a bug (its traceback), 130 on Ctrl-C; argparse's exits keep their code."""
    try:
        code = main(argv)
        return int(code) if isinstance(code, int) else 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except KeyboardInterrupt:
        print(format_error(KeyboardInterrupt("interrupted"), prog), file=sys.stderr)
        return 130
    except AslError as exc:
        if os.environ.get("ASL_TRACEBACK"):  # where the bad input was detected, for debugging
            traceback.print_exc()
        print(format_error(exc, prog), file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - a bug: show it in full
        traceback.print_exc()
        return 1
