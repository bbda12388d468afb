"""Checkpoint files: written atomically, read with ``torch.load(weights_only=True)`` only.

A checkpoint holds tensors, numbers, strings, lists and dicts (RNG states included, see
:func:`s2h.engine.seeding.rng_state`), so loading it never runs code. A file that needs anything
else (a pickled object: tampered with, or not written by s2h) is refused with
:class:`UnsafeCheckpointError`.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

__all__ = ["UnsafeCheckpointError", "atomic_save", "atomic_write_text", "load_checkpoint"]


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds objects other than tensors and plain values; it was not loaded."""


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file, fsync, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_checkpoint(path, map_location=None, what: str = "checkpoint"):
    """``torch.load(path, weights_only=True)``; a file that needs more is refused, naming the file."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(
            f"{what}: refusing to load {os.fspath(path)}: it holds objects other than tensors and plain values, so "
            "loading it could run code (a tampered file, or one not written by this version of s2h). Delete it "
            f"and start the run again without --resume, or restore a checkpoint written by s2h ({first})") from None
