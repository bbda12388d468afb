"""Deprecated: ``s2h.groups`` moved to ``s2h.structured.groups``. Names read from here warn."""
from .compat import moved

__getattr__, __dir__ = moved(__name__, "s2h.structured.groups")
