"""Deprecated: ``s2h.train`` (the ``prune`` command) moved to ``s2h.cli.prune`` and ``s2h.engine``;
``build_model`` is ``s2h.models.build_model``, ``evaluate_plain(net, ...)`` is
``s2h.engine.evaluate(net, ...)["top1"]``. Names read from here warn."""
from .compat import moved

__getattr__, __dir__ = moved(__name__, "s2h.cli.prune", "s2h.cli.prune_config", "s2h.engine.evaluation",
                             "s2h.engine.perf", "s2h.engine.plots", "s2h.models")
