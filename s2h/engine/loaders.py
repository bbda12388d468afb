"""Deterministic data order: seeded subsets and per-epoch batches drawn from (seed, epoch) alone."""
from __future__ import annotations

import torch

__all__ = ["IndexedSubset", "subset", "epoch_batches", "ListSampler", "epoch_loader"]


class IndexedSubset(torch.utils.data.Dataset):
    """The samples ``idx`` of ``ds`` (keeps ``ds.classes``)."""

    def __init__(self, ds, idx):
        self.ds, self.idx = ds, list(idx)
        self.classes = getattr(ds, "classes", None)

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        return self.ds[self.idx[i]]


def subset(ds, k: int | None, seed: int, op: str = "prune"):
    """A seeded random subset of ``k`` samples, in index order (``ds`` itself when k is None or too large)."""
    if k is None or k >= len(ds):
        return ds
    if k < 1:
        raise ValueError(f"{op}: a sample limit must be positive, got {k}")
    g = torch.Generator().manual_seed(seed)
    return IndexedSubset(ds, torch.sort(torch.randperm(len(ds), generator=g)[:k]).values.tolist())


def epoch_batches(n: int, batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The global batches of an epoch: a permutation drawn from (seed, epoch); the last partial batch
    is dropped (a BatchNorm batch of one sample is undefined)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    return [perm[i:i + batch] for i in range(0, n - batch + 1, batch)]


class ListSampler(torch.utils.data.Sampler):
    """A batch sampler over a fixed list of batches."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def epoch_loader(ds, batch_size: int, seed: int, epoch: int, rank: int, world: int, num_workers: int = 0,
                 pin: bool = False):
    """This rank's share (``batch_size // world`` samples) of every global batch of the epoch."""
    batches = epoch_batches(len(ds), batch_size, seed, epoch)
    per = batch_size // world
    mine = [b[rank * per:(rank + 1) * per] for b in batches]
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 31 + rank)
    return torch.utils.data.DataLoader(ds, batch_sampler=ListSampler(mine), num_workers=num_workers,
                                       pin_memory=pin, generator=g)
