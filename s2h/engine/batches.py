"""Small pieces every loop uses: batches from a loader, a module's device, a progress bar."""
from __future__ import annotations

import sys
from typing import Iterator, Mapping

import torch
from torch import nn

__all__ = ["iterate_batches", "module_device", "progress_bar"]


def iterate_batches(loader, op: str) -> Iterator[tuple]:
    """Yield (x, y) from ``loader`` (tuples, or mappings with "input"/"target"); an error naming
    ``op`` when it yields nothing."""
    try:
        n = len(loader)
    except TypeError:
        n = None
    if n == 0:
        raise ValueError(f"{op}: the loader is empty (0 batches); check the dataset and batch size")
    seen = False
    for batch in loader:
        seen = True
        if isinstance(batch, Mapping):
            yield batch["input"], batch["target"]
        else:
            yield batch[0], batch[1]
    if not seen:
        raise ValueError(f"{op}: the loader yielded no batches; check the dataset and batch size")


def module_device(model: nn.Module) -> torch.device:
    """The device of the module's first parameter (CPU when it has none)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def progress_bar(total: int | None, desc: str, enabled: bool):
    """A tqdm bar on stderr (disabled: a no-op bar)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True, file=sys.stderr)
