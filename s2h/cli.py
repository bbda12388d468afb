"""``python -m s2h <command>``: the s2h command line.

Each subcommand is one ``add_parser`` block below plus a module that provides
``add_arguments(parser)`` and ``main(args)`` (imported only when that command runs).
"""
from __future__ import annotations

import argparse
import importlib
import sys


def _lazy(module: str):
    """``main`` of ``module``, imported when the command runs (keeps ``--help`` fast)."""

    def run(args):
        return importlib.import_module(module).main(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m s2h", description="s2h: pruning with fused kernels")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # oneshot: teacher-guided one-shot unstructured pruning (s2h/oneshot.py)
    from . import oneshot

    p = sub.add_parser("oneshot", help="teacher-guided one-shot unstructured pruning",
                       description="Train a teacher, distill a student, score weights by |theta * dL/dtheta| "
                                   "(L = alpha*T^2*CA-KLD + (1-alpha)*CE), prune in one shot, retrain with the "
                                   "mask fixed. Default data: the bundled digits, offline in minutes.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    oneshot.add_arguments(p)
    p.set_defaults(func=_lazy("s2h.oneshot"))

    # prune: S2HPruner training to a FLOPs budget (s2h/train.py)
    from . import train

    p = sub.add_parser("prune", help="S2HPruner: train and prune to a FLOPs budget in one stage",
                       description="One-stage structured channel pruning (S2HPruner): soft and hard networks "
                                   "trained together, the hard one exported. torchrun works (DDP).",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_arguments(p)
    p.set_defaults(func=_lazy("s2h.train"))

    # demo: the main job (s2h/demo.py); until the trainer lands, the channel-mask stand-in
    import importlib.util

    demo_module = "s2h.demo" if importlib.util.find_spec("s2h.demo") else "s2h.masks_demo"
    p = sub.add_parser("demo", help="the main job: S2H on the bundled digits, offline in minutes")
    importlib.import_module(demo_module).add_arguments(p)
    p.set_defaults(func=_lazy(demo_module))

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
