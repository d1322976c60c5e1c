"""The loss ablation of ``ablate.py``: variants, the state of each run, the results table and the plot.

The paper compares losses on one network and one recipe: cross-entropy ``(gamma_neg, gamma_pos, clip) = (0, 0,
0)``, focal loss ``(2, 2, 0)`` and ASL, whose ``gamma_neg`` it sweeps. A variant is a name and those three
numbers; each runs ``train.py`` in its own folder ``runs/NAME``. Beside the training's own files, ablate keeps
``runs/NAME/ablate.json``: the exact ``train.py`` arguments, the seconds spent so far, when the session in progress
started, and whether the run finished. A finished run is never trained again; an unfinished one resumes from its
``last.pth``.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..atomic import atomic_write_text
from ..errors import UsageError
from ..evaluation.report import save_png

__all__ = ["Variant", "DEFAULT_VARIANTS", "parse_variant", "read_variants_file", "sweep", "check_unique",
           "RunStatus", "read_log", "best_epoch", "results_table", "plot_map_vs_gamma_neg", "partial_variants"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


@dataclass(frozen=True)
class Variant:
    name: str
    gamma_neg: float
    gamma_pos: float
    clip: float
    #: further train.py flags of the variant (the partial-label comparison's loss mode, prior, simulation)
    extra: tuple[str, ...] = ()

    def train_flags(self) -> list[str]:
        return ["--gamma-neg", f"{self.gamma_neg:g}", "--gamma-pos", f"{self.gamma_pos:g}", "--clip",
                f"{self.clip:g}", *self.extra]

    def describe(self) -> str:
        numbers = f"gamma_neg={self.gamma_neg:g}, gamma_pos={self.gamma_pos:g}, clip={self.clip:g}"
        return f"{numbers}, {' '.join(self.extra)}" if self.extra else numbers


def partial_variants(simulation: str, prior_path: Path) -> list[Variant]:
    """CSL's comparison on simulated partial labels (its README's FPC and RPS tables): unknown labels ignored, or
    taken as negatives, both with cross-entropy; then CSL's selective loss with the class prior that the ignore run
    estimated (``prior_path``; CSL ranks the classes with a temporary model trained in ignore mode). Every variant
    trains on the same draw of ``--simulate-partial simulation``."""
    shown = ("--simulate-partial", simulation)
    cross_entropy = ("--gamma-unann", "0")
    # original: CSL README's commands: gamma_neg 3 for fpc, 1 for rps; gamma_unann 4, top-k 5, prior threshold 0.5
    gamma_neg = 3.0 if simulation.startswith("fpc") else 1.0
    selective = ("--partial-loss-mode", "selective", "--gamma-unann", "4", "--likelihood-topk", "5",
                 "--prior-threshold", "0.5", "--prior-path", str(prior_path))
    return [Variant("ignore", 0.0, 0.0, 0.0, ("--partial-loss-mode", "ignore", *cross_entropy, *shown)),
            Variant("negative", 0.0, 0.0, 0.0, ("--partial-loss-mode", "negative", *cross_entropy, *shown)),
            Variant("selective", gamma_neg, 0.0, 0.0, (*selective, *shown))]


#: The paper's comparison: CE, focal loss, ASL as trained for the paper (4, 1, 0.05), and a gamma_neg sweep at
#: gamma_pos = 0 and clip 0.05 whose top is the recipe's default loss (4, 0, 0.05).
DEFAULT_VARIANTS = (
    Variant("ce", 0.0, 0.0, 0.0),
    Variant("focal", 2.0, 2.0, 0.0),
    Variant("asl_4_1_0.05", 4.0, 1.0, 0.05),
    Variant("asl_1_0_0.05", 1.0, 0.0, 0.05),
    Variant("asl_2_0_0.05", 2.0, 0.0, 0.05),
    Variant("asl_4_0_0.05", 4.0, 0.0, 0.05),
)


def parse_variant(text: str) -> Variant:
    """``NAME:GAMMA_NEG,GAMMA_POS,CLIP`` (``ce:0,0,0``); without ``NAME:`` the name is made from the numbers."""
    name, _, numbers = text.strip().rpartition(":")
    parts = [p.strip() for p in numbers.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise UsageError(f"variant {text!r}: expected NAME:GAMMA_NEG,GAMMA_POS,CLIP, e.g. focal:2,2,0")
    gamma_neg, gamma_pos, clip = values
    if gamma_neg < 0 or gamma_pos < 0 or not 0 <= clip < 1:
        raise UsageError(f"variant {text!r}: the gammas must be >= 0 and the clip within [0, 1)")
    name = name or f"asl_{gamma_neg:g}_{gamma_pos:g}_{clip:g}"
    if not _NAME.fullmatch(name):
        raise UsageError(f"variant {text!r}: the name must be letters, digits and _ . + - (it names a folder)")
    return Variant(name, gamma_neg, gamma_pos, clip)


def read_variants_file(path: str) -> list[Variant]:
    """One variant per line (``NAME:GAMMA_NEG,GAMMA_POS,CLIP``); blank lines and ``#`` comments are skipped."""
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8").splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read the variants file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"the variants file {path} is not UTF-8 text") from None
    return [parse_variant(line) for line in (ln.split("#", 1)[0].strip() for ln in lines) if line]


def sweep(gamma_negs: Sequence[float], gamma_pos: float, clip: float) -> list[Variant]:
    return [parse_variant(f"{g:g},{gamma_pos:g},{clip:g}") for g in gamma_negs]


def check_unique(variants: Sequence[Variant]) -> None:
    seen: dict[str, Variant] = {}
    for v in variants:
        if v.name in seen and seen[v.name] != v:
            raise UsageError(f"two variants are named {v.name!r} with different numbers")
        seen[v.name] = v


@dataclass
class RunStatus:
    """``runs/NAME/ablate.json``.

    ``seconds`` adds up the sessions that ended (normally, by an error or by an interruption); ``started`` is the
    wall-clock start (``time.time()``) of a session that has not ended. A session killed outright never records its
    own end, so its time is taken from what it kept: see :meth:`total_seconds`.
    """

    train_args: list[str]
    seconds: float = 0.0
    finished: bool = False
    started: Optional[float] = None

    @classmethod
    def read(cls, run_dir: Path) -> Optional["RunStatus"]:
        path = run_dir / "ablate.json"
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            started = data.get("started")
            return cls(list(data["train_args"]), float(data["seconds"]), bool(data["finished"]),
                       None if started is None else float(started))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise UsageError(f"{path} is damaged; delete the folder {run_dir} to run that variant again") from None

    def write(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "ablate.json", json.dumps(
            {"train_args": self.train_args, "seconds": self.seconds, "finished": self.finished,
             "started": self.started}, indent=1) + "\n")

    def total_seconds(self, run_dir: Path) -> float:
        """The ended sessions plus, for a session that never recorded its end (killed, or still running in another
        process), the time from its start to the last progress it kept: its last epoch record in ``log.txt`` or its
        last ``last.pth`` (``--save-every-steps``), whichever is later. Work after that point was lost with the
        process and is done again, and counted, by the session that resumes."""
        if self.started is None:
            return self.seconds
        kept = [r["time"] for r in read_log(run_dir / "log.txt") if _is_number(r.get("time"))]
        try:
            kept.append((run_dir / "last.pth").stat().st_mtime)
        except OSError:
            pass
        return self.seconds + max([0.0, *(t - self.started for t in kept)])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_log(log_path: Path) -> list[dict[str, Any]]:
    """The epoch records of a run's ``log.txt`` (none if absent). A line cut short by a killed process is
    skipped rather than stopping the whole ablation."""
    if not log_path.is_file():
        return []
    records = []
    for line in log_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "epoch" in record and "mAP" in record:
            records.append(record)
    return records


def best_epoch(log_path: Path) -> Optional[dict[str, Any]]:
    """The epoch record of ``log.txt`` with the highest mAP (the first of equals), or None without records."""
    records = read_log(log_path)
    if not records:
        return None
    best = max(records, key=lambda r: (r["mAP"], -r["epoch"]))
    return {"mAP": float(best["mAP"]), "epoch": int(best["epoch"])}


def results_table(rows: Sequence[dict[str, Any]], notes: Sequence[str], title: str = "Loss ablation") -> str:
    """The Markdown of ``results.md``: one row per variant, in the order given."""
    lines = [f"# {title}", "", *notes, "",
             "| variant | gamma_neg | gamma_pos | clip | best mAP | epoch | time |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        v: Variant = r["variant"]
        best = f"**{r['mAP']:.2f}**" if r.get("mAP") is not None else "(not finished)"
        epoch = str(r["epoch"]) if r.get("epoch") is not None else "-"
        lines.append(f"| {v.name} | {v.gamma_neg:g} | {v.gamma_pos:g} | {v.clip:g} | {best} | {epoch} | "
                     f"{_duration(r['seconds'])} |")
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def plot_map_vs_gamma_neg(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Best mAP against gamma_neg, one line per (gamma_pos, clip), each point labelled with its variant."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    ax = figure.subplots()
    groups: dict[tuple[float, float], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("mAP") is not None:
            groups.setdefault((r["variant"].gamma_pos, r["variant"].clip), []).append(r)
    for (gamma_pos, clip), members in sorted(groups.items()):
        members = sorted(members, key=lambda r: r["variant"].gamma_neg)
        xs, ys = [r["variant"].gamma_neg for r in members], [r["mAP"] for r in members]
        ax.plot(xs, ys, marker="o", label=f"gamma_pos={gamma_pos:g}, clip={clip:g}")
        for r in members:
            ax.annotate(r["variant"].name, (r["variant"].gamma_neg, r["mAP"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
    ax.set(xlabel="gamma_neg", ylabel="best mAP (%)", title=title)
    ax.grid(alpha=0.3)
    if groups:
        ax.legend(fontsize=8)
    save_png(figure, path)
