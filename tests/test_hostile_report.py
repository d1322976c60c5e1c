"""Names from files anyone can write, shown as text: printable() for terminals, markdown_text() for the report page,
and the report page itself with hostile class names; repeated names refused by name."""
from __future__ import annotations

import html
import os
import re

import numpy as np
import pytest

from asl.apps.validate import per_class_rows
from asl.errors import UsageError
from asl.evaluation.metrics import ThresholdMetrics
from asl.evaluation.report import markdown_text, printable, write_report
from asl.evaluation.thresholds import check_unique_classes, save_thresholds


@pytest.mark.parametrize("raw, shown", [
    ("person", "person"),
    ("traffic light", "traffic light"),
    ("café ☕ 猫", "café ☕ 猫"),                      # printable non-ASCII stays as it is
    ("a\rb", "a\\rb"),
    ("a\nb", "a\\nb"),
    ("a\tb", "a\\tb"),
    ("nul\x00", "nul\\0"),
    ("\x1b[31mred", "\\x1b[31mred"),                 # a terminal colour sequence
    ("del\x7f", "del\\x7f"),
    ("c1\x85next", "c1\\x85next"),                   # NEL: a line break for some terminals
    ("line\u2028sep\u2029par", "line\\u2028sep\\u2029par"),
    ("abc\u202edcba", "abc\\u202edcba"),              # right-to-left override
    (os.fsdecode(b"bad-\xff.jpg"), "bad-\\udcff.jpg"),  # undecodable file name bytes
])
def test_printable_shows_control_characters_as_escapes(raw, shown):
    assert printable(raw) == shown
    assert printable(raw).encode("utf-8")  # printing it cannot fail on a UTF-8 terminal


def test_markdown_text_escapes_syntax_and_html():
    assert markdown_text("<script>alert(1)</script>") == "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert markdown_text("<img src=x onerror=alert(1)>") == "&lt;img src=x onerror=alert(1)&gt;"
    assert markdown_text("a|b") == "a\\|b"
    assert markdown_text("`code`") == "\\`code\\`"
    assert markdown_text("back\\slash") == "back\\\\slash"
    assert markdown_text("R&D &amp;") == "R&amp;D &amp;amp;"
    assert markdown_text("*em* _em_ [link](http://x) ~~del~~ $x$") == \
        "\\*em\\* \\_em\\_ \\[link\\](http://x) \\~\\~del\\~\\~ \\$x\\$"
    assert markdown_text("cr\rnul\x00") == "cr\\\\rnul\\\\0"  # rendered: cr\rnul\0, as printable() prints it


def rendered_cells(row: str) -> list[str]:
    """A table row's cells as a CommonMark renderer shows them: split at unescaped '|', then a backslash before
    ASCII punctuation dropped and the HTML entities decoded."""
    cells = re.split(r"(?<!\\)\|", row.strip()[1:-1])
    return [html.unescape(re.sub(r"\\([!-/:-@\[-`{-~])", r"\1", cell.strip())) for cell in cells]


def test_report_table_shows_hostile_names_as_text(tmp_path):
    names = ["<script>alert('x')</script>", "<img src=x onerror=alert(1)>", "row\rbreak", "nul\x00", "pipe|`tick`",
             "&lt;already&gt;"]
    shown = ["<script>alert('x')</script>", "<img src=x onerror=alert(1)>", "row\\rbreak", "nul\\0", "pipe|`tick`",
             "&lt;already&gt;"]
    rng = np.random.default_rng(0)
    targets = (rng.random((30, len(names))) < 0.4).astype(np.float32)
    scores = rng.random((30, len(names))).astype(np.float32)
    meter = ThresholdMetrics(len(names), 0.5)
    meter.update(scores, targets)
    page = write_report(tmp_path, per_class_rows(names, targets, scores, False, meter), targets, scores, [])
    assert page == tmp_path / "README.md"
    text = page.read_bytes().decode("utf-8")
    assert "<" not in text and "\r" not in text and "\x00" not in text
    rows = [line for line in text.split("\n") if re.match(r"\| \d+ \|", line)]
    assert len(rows) == len(names)
    cells = [rendered_cells(row) for row in rows]
    assert all(len(c) == 8 for c in cells)
    assert sorted(c[1] for c in cells) == sorted(shown)


def test_repeated_names_are_named_with_their_positions(tmp_path):
    check_unique_classes(["a", "b", "c"], "x")
    with pytest.raises(UsageError, match=r"^ctx: the class name 'b' repeats \(classes 1 and 3\)"):
        check_unique_classes(["a", "b", "c", "b"], "ctx")
    with pytest.raises(UsageError, match=r"the class name 'nul\\x00' repeats"):  # repr: one line, visible
        save_thresholds(tmp_path / "t.json", ["nul\x00", "nul\x00"], [0.5, 0.5])
    assert not (tmp_path / "t.json").exists()
