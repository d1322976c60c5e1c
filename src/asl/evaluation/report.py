"""``validate.py --report DIR``: one Markdown page with pictures of what the mAP summarises.

``DIR/README.md`` (GitHub and most editors render it) holds the summary, three pictures and the per-class table:

- ``pr_curves.png``: precision-recall curves of the best and the worst classes;
- ``score_histogram.png``: the scores of positive and of negative labels: how far apart the two lie, and how many
  negatives leak above the threshold. ASL's focusing and margin act on the negatives, so its scores are no
  calibrated probabilities: a short run can put every score, negatives included, well above 0;
- ``ap_vs_support.png``: each class's AP against its number of positives (rare classes are where multi-label
  losses differ);
- the table: AP, positives, threshold, precision, recall and F1 per class, sorted by AP.

A class without positives has no AP and no curve: it is listed last with "n/a" (the plain mAP counts it as 0, as
the original does). Plots use matplotlib's ``Figure`` directly (the Agg renderer), so no display and no global
pyplot state are involved.

Class names come from dataset files and checkpoints, which anyone can write: the page shows them as text
(:func:`markdown_text`), never as Markdown or HTML, and :func:`printable` keeps a name on one line wherever it is
printed.
"""
from __future__ import annotations

import io
import unicodedata
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from ..atomic import atomic_write_bytes, atomic_write_text
from .metrics import precision_recall_curve

__all__ = ["write_report", "save_png", "printable", "markdown_text", "CURVES_PER_PANEL"]

#: classes drawn in each precision-recall panel (best, worst)
CURVES_PER_PANEL = 5


def write_report(directory: Union[str, Path], rows: Sequence[dict[str, Any]], targets: np.ndarray,
                 scores: np.ndarray, summary: Sequence[str]) -> Path:
    """Writes ``directory/README.md`` and its PNG pictures; returns the page's path.

    ``rows``: one dict per class, in class order, with ``class``, ``ap`` (percent, ``None`` when undefined),
    ``positives``, ``threshold``, ``precision``, ``recall`` and ``f1`` (percent). ``targets``/``scores``:
    ``(N, C)``, probabilities. ``summary``: Markdown lines for the top of the page.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ranked = sorted(rows, key=lambda r: (not _scored(r), -(r["ap"] or 0.0), r["index"]))
    pictures = {
        "pr_curves.png": ("Precision-recall curves of the best and worst classes", _pr_curves(ranked, targets,
                                                                                             scores)),
        "score_histogram.png": ("Scores of positive and negative labels", _score_histogram(rows, targets, scores)),
        "ap_vs_support.png": ("AP against the number of positives", _ap_vs_support(rows)),
    }
    for name, (_, figure) in pictures.items():
        save_png(figure, directory / name)
    lines = ["# Evaluation report", "", *summary, ""]
    for name, (title, _) in pictures.items():
        lines += [f"![{title}]({name})", ""]
    lines += _table(ranked)
    page = directory / "README.md"
    atomic_write_text(page, "\n".join(lines) + "\n")
    return page


def _scored(row: dict[str, Any]) -> bool:
    return row["ap"] is not None and row["positives"] > 0


def save_png(figure, path: Union[str, Path]) -> None:
    """Writes a matplotlib ``Figure`` as a PNG, atomically (the Agg renderer: no display involved)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\0": "\\0"}
# Bidirectional overrides and isolates reorder the text around them on a terminal or a page (a name could make the
# columns after it read backwards).
_BIDI_CONTROLS = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: object) -> str:
    """``text`` as one line that shows what it holds: control characters (CR, LF, NUL, ESC, ...), line and
    paragraph separators, bidirectional overrides and lone surrogates (undecodable bytes of a file name, which
    would make ``print`` fail) become visible escapes such as ``\\r``, ``\\0``, ``\\x1b`` or ``\\u202e``."""
    text = str(text)
    if text.isprintable():  # the common case; isprintable() is False for every character escaped below
        return text
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif unicodedata.category(ch) in ("Cc", "Zl", "Zp", "Cs") or ch in _BIDI_CONTROLS:
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


# ASCII punctuation that Markdown (GitHub's included: '$' starts math, '~' strikethrough) may read as syntax; a
# backslash before any ASCII punctuation makes it a literal character. '&', '<' and '>' become entities instead,
# so no name can open an HTML tag or spell an entity.
_MARKDOWN_SPECIAL = frozenset("\\`*_[]|~$")
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def markdown_text(text: object) -> str:
    """``text`` as literal text inside a Markdown line or table cell: :func:`printable`, then Markdown and HTML
    syntax escaped. Rendered, it reads exactly as :func:`printable` prints it."""
    return "".join(_ENTITIES.get(ch) or (f"\\{ch}" if ch in _MARKDOWN_SPECIAL else ch) for ch in printable(text))


def _label(name: str) -> str:
    # One line of text in a legend; a '$' pair would switch matplotlib to math text.
    return printable(name).replace("$", r"\$")


def _figure(width: float, height: float, panels: int = 1):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    axes = figure.subplots(1, panels, squeeze=False)[0]
    return figure, axes


def _pr_curves(ranked: Sequence[dict[str, Any]], targets: np.ndarray, scores: np.ndarray):
    scored = [r for r in ranked if _scored(r)]
    # Few classes: half in each panel; otherwise the CURVES_PER_PANEL best and worst.
    per_panel = min(CURVES_PER_PANEL, (len(scored) + 1) // 2)
    best = scored[:per_panel]
    worst = scored[per_panel:][-per_panel:] if per_panel else []
    figure, axes = _figure(10, 4.2, panels=2)
    for ax, chosen, title in ((axes[0], best, "best classes"), (axes[1], worst, "worst classes")):
        for row in chosen:
            k = row["index"]
            precision, recall, _ = precision_recall_curve(scores[:, k], targets[:, k])
            ax.step(np.concatenate([[0.0], recall]), np.concatenate([[precision[0]], precision]), where="post",
                    label=f"{_label(row['class'])} (AP {row['ap']:.1f})")
        ax.set(xlim=(0, 1.01), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=title)
        ax.grid(alpha=0.3)
        if chosen:
            ax.legend(fontsize=8, loc="lower left")
        else:
            ax.text(0.5, 0.5, "no other class with positives", ha="center", va="center")
    return figure


def _score_histogram(rows: Sequence[dict[str, Any]], targets: np.ndarray, scores: np.ndarray):
    figure, axes = _figure(7, 4)
    ax = axes[0]
    bins = np.linspace(0.0, 1.0, 51)
    positive, negative = _label_histograms(targets, scores, bins)
    for counts, label, colour in ((positive, "positive labels", "tab:green"),
                                  (negative, "negative labels", "tab:red")):
        ax.stairs(counts, bins, fill=True, alpha=0.45, color=colour, label=f"{label} ({int(counts.sum())})")
    thresholds = sorted({round(float(r["threshold"]), 4) for r in rows})
    if len(thresholds) == 1:
        ax.axvline(thresholds[0], color="black", linestyle="--", linewidth=1,
                   label=f"threshold {thresholds[0]:g}")
    ax.set_yscale("log")
    ax.set(xlabel="probability", ylabel="labels (log scale)", xlim=(0, 1))
    ax.legend(fontsize=8)
    return figure


def _label_histograms(targets: np.ndarray, scores: np.ndarray, bins: np.ndarray,
                      block_elements: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """Counts of the scores of positive and of negative labels per bin, a block of rows at a time (Open Images'
    score matrix is over a billion values: no full-size copy or mask is made)."""
    positive, negative = np.zeros(len(bins) - 1), np.zeros(len(bins) - 1)
    rows = max(1, block_elements // max(scores.shape[1], 1))
    for start in range(0, scores.shape[0], rows):
        s, t = scores[start:start + rows], targets[start:start + rows]
        positive += np.histogram(np.clip(s[t == 1], 0.0, 1.0), bins)[0]
        negative += np.histogram(np.clip(s[(t >= 0) & (t != 1)], 0.0, 1.0), bins)[0]
    return positive, negative


def _ap_vs_support(rows: Sequence[dict[str, Any]]):
    figure, axes = _figure(7, 4)
    ax = axes[0]
    scored = [r for r in rows if _scored(r)]
    ax.scatter([r["positives"] for r in scored], [r["ap"] for r in scored], s=14, alpha=0.7)
    if scored:
        ax.set_xscale("log")
    ax.set(xlabel="positives in the evaluated set (log scale)", ylabel="AP (%)", ylim=(0, 101))
    ax.grid(alpha=0.3)
    return figure


def _table(ranked: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["## Per-class results, by AP", "",
             "| rank | class | AP | positives | threshold | precision | recall | F1 |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for rank, r in enumerate(ranked, start=1):
        ap = f"{r['ap']:.2f}" if _scored(r) else "n/a"
        threshold = r["threshold"]
        shown = "never" if threshold >= 1.0 else f"{threshold:.4g}"
        lines.append(f"| {rank} | {markdown_text(r['class'])} | {ap} | {r['positives']} | {shown} | "
                     f"{r['precision']:.1f} | {r['recall']:.1f} | {r['f1']:.1f} |")
    if not all(_scored(r) for r in ranked):
        lines += ["", "n/a: no positive (or, with unannotated labels, no negative) in the evaluated set, so no AP; "
                      "the plain mAP counts a class without positives as 0, as the original does."]
    lines += ["", "Precision, recall and F1 (%) at the threshold; a class is predicted when its probability is "
                  "above it."]
    return lines
