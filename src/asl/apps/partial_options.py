"""train.py's options for partial labels (CSL, CVPR 2022): the loss mode, its weights, the class prior and the
simulated partial annotation; and how they resolve against the ASL recipe's flags.

original: CSL's train.py spells them ``--partial_loss_mode``, ``--gamma_unann``, ``--likelihood_topk``,
``--prior_path``, ``--prior_threshold``, ``--simulate_partial_type`` and ``--simulate_partial_param``; every flag here
takes both spellings.
"""
from __future__ import annotations

import argparse
from typing import Any

from ..class_prior import read_prior_csv
from ..cli import ArgumentParser, nonnegative_float, nonnegative_int
from ..data import DatasetError
from ..data.partial import parse_simulation
from ..errors import UsageError
from ..losses import PARTIAL_LOSS_MODES

__all__ = ["partial_label_options", "defer_loss_defaults", "resolve_partial_options", "simulation_arg"]

#: original: CSL's train.py defaults of the flags it shares with the ASL recipe
CSL_LOSS_DEFAULTS = {"gamma_neg": 1.0, "gamma_pos": 0.0, "clip": 0.0}
#: original: CSL's --simulate_partial_param default (its fpc 1000)
_CSL_SIMULATION_PARAM = 1000
#: --unannotated's default without --partial-loss-mode
_UNANNOTATED_DEFAULT = "negative"


def simulation_arg(text: str) -> str:
    """argparse ``type=`` of ``--simulate-partial`` (and ablate.py's ``--partial``): ``fpc:N`` or ``rps:P``."""
    try:
        mode, param = parse_simulation(text)
    except DatasetError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return simulation_text(mode, param)


def simulation_text(mode: str, param: Any) -> str:
    """The one spelling a simulation is recorded under (``args.json``): ``fpc:1000``, ``rps:0.5``."""
    return f"{mode}:{param:g}" if isinstance(param, float) else f"{mode}:{param}"


def partial_label_options() -> ArgumentParser:
    p = ArgumentParser(add_help=False)
    p.add_argument("--partial-loss-mode", type=str, default=None, choices=list(PARTIAL_LOSS_MODES),
                   help="train with CSL's PartialSelectiveLoss, targets of -1 being unknown labels (docs/usage.md, "
                        "Partial labels); then --gamma-neg, --gamma-pos and --clip default to CSL's 1, 0 and 0, and "
                        "--unannotated does not apply")
    p.add_argument("--gamma-unann", type=nonnegative_float, default=2.0, help="CSL: focusing of the unknown labels")
    p.add_argument("--alpha-pos", type=nonnegative_float, default=1.0, help="CSL: weight of the positives")
    p.add_argument("--alpha-neg", type=nonnegative_float, default=1.0, help="CSL: weight of the annotated negatives")
    p.add_argument("--alpha-unann", type=nonnegative_float, default=1.0, help="CSL: weight of the unknown labels")
    p.add_argument("--likelihood-topk", type=nonnegative_int, default=5,
                   help="CSL selective: unknown labels ignored per image of the batch, the likeliest positives")
    p.add_argument("--prior-path", type=str, default=None,
                   help="CSL selective: the class prior, a Classes,avg_pred CSV such as a first run's "
                        "OUTPUT_DIR/prior.csv")
    p.add_argument("--prior-threshold", type=nonnegative_float, default=0.05,
                   help="CSL selective: the unknown labels of classes whose prior exceeds it are ignored (0: off)")
    p.add_argument("--simulate-partial", type=simulation_arg, default=None, metavar="fpc:N|rps:P",
                   help="hide training annotations as CSL's study does: fpc:N keeps N positives and N negatives per "
                        "class, rps:P drops each label with probability P")
    p.add_argument("--simulate-partial-type", type=str, default=None, choices=["fpc", "rps"],
                   help="CSL's spelling of --simulate-partial's mode, with --simulate-partial-param")
    p.add_argument("--simulate-partial-param", type=float, default=None,
                   help=f"CSL's spelling of --simulate-partial's N or P (default {_CSL_SIMULATION_PARAM} for fpc)")
    return p


class _DefaultFloat(float):
    """A flag's default left in place: equal to its value, but known not to come from the command line or a
    ``--config`` file (which set plain values)."""


def defer_loss_defaults(parser: argparse.ArgumentParser) -> None:
    """Mark the defaults of ``--gamma-neg``, ``--gamma-pos`` and ``--clip`` (and leave ``--unannotated`` unset) in
    ``parser``, so that :func:`resolve_partial_options` can tell a value given from a default."""
    for action in parser._actions:
        if action.dest in CSL_LOSS_DEFAULTS:
            action.help = (f"{action.help} (default {action.default:g}; "
                           f"{CSL_LOSS_DEFAULTS[action.dest]:g} with --partial-loss-mode)")
            action.default = _DefaultFloat(action.default)
        elif action.dest == "unannotated":
            # argparse passes a text default through the flag's type, which would drop a marker: None instead
            action.help = f"{action.help} (default {action.default})"
            action.default = None


def _given(value: Any) -> bool:
    return value is not None and not isinstance(value, _DefaultFloat)


def resolve_partial_options(args: argparse.Namespace) -> dict[str, Any]:
    """The resolved values of the loss flags, the unannotated mode and the simulation; bad combinations are one
    line (:class:`UsageError`)."""
    partial = args.partial_loss_mode is not None
    resolved = {dest: float(getattr(args, dest)) if _given(getattr(args, dest)) or not partial
                else CSL_LOSS_DEFAULTS[dest] for dest in CSL_LOSS_DEFAULTS}
    if partial and _given(args.unannotated):
        raise UsageError(f"--partial-loss-mode replaces --unannotated (unknown labels reach the loss as -1): "
                         f"drop --unannotated {args.unannotated}")
    resolved["unannotated"] = None if partial else (args.unannotated or _UNANNOTATED_DEFAULT)
    resolved.update(simulate_partial=_resolve_simulation(args), simulate_partial_type=None,
                    simulate_partial_param=None)
    if args.prior_path is not None:
        read_prior_csv(args.prior_path)  # an unreadable file is refused before any work
    return resolved


def _resolve_simulation(args: argparse.Namespace):
    if args.simulate_partial_type is None:
        if args.simulate_partial_param is not None:
            raise UsageError("--simulate-partial-param needs --simulate-partial-type fpc|rps")
        return args.simulate_partial
    if args.simulate_partial is not None:
        raise UsageError("give --simulate-partial or --simulate-partial-type, not both")
    param = _CSL_SIMULATION_PARAM if args.simulate_partial_param is None else args.simulate_partial_param
    try:
        return simulation_arg(f"{args.simulate_partial_type}:{param}")
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"--simulate-partial-type/--simulate-partial-param: {exc}") from None

