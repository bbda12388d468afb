"""Deprecated: ``s2h.model`` moved to ``s2h.structured.model`` and ``s2h.structured.convert``. Names read from here warn."""
from .compat import moved

__getattr__, __dir__ = moved(__name__, "s2h.structured.model", "s2h.structured.convert")
