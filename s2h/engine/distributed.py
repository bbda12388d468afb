"""torch.distributed under torchrun: initialise, rank and world size, barriers."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "rank_and_world", "barrier"]


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def init_distributed(device_pref: str, op: str = "prune") -> tuple[int, int, torch.device]:
    """Initialise torch.distributed under torchrun (WORLD_SIZE > 1); pick the device. Returns (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if device_pref not in ("auto", "cpu", "cuda") and not device_pref.startswith("cuda:"):
        raise ValueError(f"{op}: --device must be auto, cpu or cuda, got {device_pref!r}")
    if device_pref.startswith("cuda:"):
        device = torch.device(device_pref)
    elif use_cuda:
        device = torch.device("cuda", local if world > 1 else 0)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = rank_and_world()
    return rank, world, device
