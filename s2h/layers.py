"""Deprecated: ``s2h.layers`` moved to ``s2h.structured.layers`` and ``s2h.structured.masks``. Names read from here warn."""
from .compat import moved

__getattr__, __dir__ = moved(__name__, "s2h.structured.layers", "s2h.structured.masks")
