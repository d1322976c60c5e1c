"""The CSV files MIIL publishes with its splits (NUS-WIDE ``nus_wid_data.csv``, Open Images ``data.csv``):
rows of cells whose label columns hold Python list literals."""
from __future__ import annotations

import ast
import csv
import re
from pathlib import Path
from typing import Iterator, Sequence

from ..errors import DatasetError
from .base import not_utf8_error

__all__ = ["iter_miil_csv", "parse_list_literal"]

_QUOTED = r"""(?:'[^'\\\n]*'|"[^"\\\n]*")"""
_SIMPLE_LIST = re.compile(r"\[\s*(?:%s(?:\s*,\s*%s)*\s*,?)?\s*\]" % (_QUOTED, _QUOTED))
_QUOTED_ITEM = re.compile(_QUOTED)


def iter_miil_csv(path: Path, columns: Sequence[str]) -> Iterator[tuple[str, list[str]]]:
    """Yields ``(where, cells)`` for each data row of a MIIL CSV (NUS-WIDE split, Open Images ``data.csv``).

    Blank lines are skipped, and so is a header: a first row whose second column is not a list literal.
    A row with fewer than ``len(columns)`` cells raises DatasetError naming the file and line.
    """
    line_no = 0
    with open(path, newline="", encoding="utf-8") as f:
        try:
            for line_no, row in enumerate(csv.reader(f), 1):
                if not row or all(not cell.strip() for cell in row):
                    continue
                if len(row) < len(columns):
                    raise DatasetError(f"expected {len(columns)} columns ({', '.join(columns)}) at {path}:{line_no}")
                if line_no == 1 and not row[1].strip().startswith("["):
                    continue  # header row
                yield f"{path}:{line_no}", [cell.strip() for cell in row]
        except UnicodeDecodeError as exc:
            raise not_utf8_error(path, exc, f"after line {line_no}") from None


def parse_list_literal(text: str, where: str = "") -> list[str]:
    """``"['clouds', 'sky']"`` -> ``['clouds', 'sky']`` (the MIIL CSVs' label columns), as ``ast.literal_eval``.

    Empty cells and ``[]`` give ``[]``. A cell that is not a list of strings raises DatasetError naming ``where``.
    Lists of plain quoted strings (no escapes) take a regex fast path with the same result: literal_eval alone
    would take minutes on Open Images' 9M rows.
    """
    text = (text or "").strip()
    if not text:
        return []
    if _SIMPLE_LIST.fullmatch(text):
        return [m[1:-1].strip() for m in _QUOTED_ITEM.findall(text)]
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise DatasetError(f"not a list literal {text[:60]!r} at {where}") from None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple, set)) or not all(isinstance(v, str) for v in value):
        raise DatasetError(f"not a list of names {text[:60]!r} at {where}")
    return [v.strip() for v in value]
