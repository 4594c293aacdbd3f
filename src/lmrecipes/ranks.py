"""The collectives the recipes share; each one is a plain local answer when there is no process group."""

from __future__ import annotations

import torch


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def gather_from_ranks(obj) -> list:
    """``obj`` from every rank, in rank order (``[obj]`` in one process). Every rank must call it."""
    if not distributed():
        return [obj]
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest ``value`` over all ranks (``value`` itself in one process). Every rank must call it."""
    if not distributed():
        return value
    tensor = torch.tensor([value], device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return int(tensor.item())
