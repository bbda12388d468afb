"""Deprecated: ``s2h.export`` (the module) moved to ``s2h.structured.export`` and ``s2h.structured.io``.

``s2h.export`` the function is unchanged. Names read from this module warn.
"""
from .compat import moved

__getattr__, __dir__ = moved(__name__, "s2h.structured.export", "s2h.structured.io")
