"""Deprecated: ``s2h.reference`` moved to ``s2h.structured.reference``. Names read from here warn."""
from .compat import moved

__getattr__, __dir__ = moved(__name__, "s2h.structured.reference")
