"""Deprecated: ``s2h.oneshot`` moved to ``s2h.unstructured`` (the method), ``s2h.engine`` (evaluate,
recalibrate_bn) and ``s2h.cli.oneshot`` (the command); ``train`` is now ``train_cross_entropy``.
Names read from here warn."""
from .compat import moved

__getattr__, __dir__ = moved(__name__, "s2h.unstructured", "s2h.unstructured.pruning", "s2h.cli.oneshot",
                             "s2h.engine.seeding", renamed={"train": "train_cross_entropy"})
