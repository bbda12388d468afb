"""``python -m s2h <command>``: the s2h command line.

Each subcommand is one entry of :data:`COMMANDS`: a module of this package that provides
``add_arguments(parser)`` and ``main(args)``. ``main`` is imported only when that command runs.
"""
from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["COMMANDS", "HelpFormatter", "build_parser", "main"]

#: name -> (module, help, description)
COMMANDS = {
    "oneshot": ("s2h.cli.oneshot", "teacher-guided one-shot unstructured pruning",
                "Train a teacher, distill a student, score weights by |theta * dL/dtheta| "
                "(L = alpha*T^2*CA-KLD + (1-alpha)*CE), prune in one shot, retrain with the "
                "mask fixed. Default data: the bundled digits, offline in minutes."),
    "prune": ("s2h.cli.prune", "S2HPruner: train and prune to a FLOPs budget in one stage",
              "One-stage structured channel pruning (S2HPruner): soft and hard networks "
              "trained together, the hard one exported. torchrun works (DDP)."),
    "demo": ("s2h.cli.demo", "the main job: S2H on the bundled digits, offline in minutes",
             "S2HPruner on scikit-learn's digits next to a dense baseline: accuracy, FLOPs, parameters, latency."),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default once: argparse's ``(default: X)`` unless the help states it already
    or there is none to show (None, a flag's False, an empty list)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.default in (None, False, [], ()) or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def _lazy(module: str):
    """``main`` of ``module``, imported when the command runs."""

    def run(args):
        return importlib.import_module(module).main(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m s2h", description="s2h: pruning with fused kernels")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_, description) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=description,
                           formatter_class=HelpFormatter)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(func=_lazy(module))
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
