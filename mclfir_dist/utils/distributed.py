"""Rank helpers and collectives that keep autograd (so negatives from other ranks carry gradient)."""
from __future__ import annotations

import warnings
from typing import Any, List

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def backend() -> str:
    return dist.get_backend() if is_distributed() else "none"


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0; gradients flow back to each rank's rows."""
    if not is_distributed():
        return x
    from torch.distributed.nn.functional import all_gather
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # 2.14 points to a private API; this one is public
        return torch.cat(all_gather(x.contiguous()), dim=0)


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def gather_objects(obj: Any) -> List[Any]:
    """Every rank's `obj`, in rank order (small, picklable things only)."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(modules, src: int = 0) -> None:
    """Copy rank `src`'s buffers (e.g. BatchNorm statistics, updated from each rank's own batches) to every rank."""
    if not is_distributed():
        return
    for module in modules:
        for buf in module.buffers():
            dist.broadcast(buf.data, src=src)
