"""Deprecated: ``s2h.trainer`` moved to ``s2h.structured.step`` and ``s2h.structured.step_base``. Names read from here warn."""
from .compat import moved

__getattr__, __dir__ = moved(__name__, "s2h.structured.step", "s2h.structured.step_base")
