"""Deprecated: ``s2h.flops`` moved to ``s2h.structured.flops``. Names read from here warn."""
from .compat import moved

__getattr__, __dir__ = moved(__name__, "s2h.structured.flops")
