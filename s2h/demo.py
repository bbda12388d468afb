"""Deprecated: ``s2h.demo`` moved to ``s2h.cli.demo``. Names read from here warn."""
from .compat import moved

__getattr__, __dir__ = moved(__name__, "s2h.cli.demo")
