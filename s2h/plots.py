"""Deprecated: ``s2h.plots`` moved to ``s2h.engine.plots`` (every plot, in one place). Names read from here warn."""
from .compat import moved

__getattr__, __dir__ = moved(__name__, "s2h.engine.plots")
