"""Running on many processes, GPUs and machines with ``torch.distributed`` (launched by ``torchrun``).

``torchrun --nproc_per_node=N [--nnodes=M ...] -m ovseg_ros.eval ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init` reads them, joins the process group (NCCL
when every process has its own GPU, gloo on CPU) and picks the device of this process. Without those
variables everything runs in one process and the collectives are no-ops, so the same code serves both.

Work is split by :func:`shard`: rank r takes items r, r + N, r + 2N, ... of the sorted item list, which keeps
the shards balanced when image sizes drift along the list. Results are reduced with integer all-reduces,
so a sharded run gives exactly the numbers of a single-process run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import numpy as np
import torch

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""  # "" = not distributed

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tag(self) -> str:
        """A file-name tag of this rank (each rank writes its own files)."""
        return f"rank{self.rank:03d}"


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) when not launched by it."""
    try:
        return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as exc:
        raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {exc}") from None


def init(device: str = "auto", backend: str = "auto") -> tuple[DistContext, str]:
    """Join the process group when launched by torchrun; returns the context and this process's device.

    ``device``: ``auto`` / ``cuda`` become ``cuda:LOCAL_RANK`` when GPUs exist, else ``cpu``; an explicit
    ``cuda:K`` or ``cpu`` is kept. ``backend``: ``auto`` = NCCL for CUDA devices, gloo otherwise.
    """
    from ..core.models import resolve_device

    rank, world, local = env_world()
    if device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{local % torch.cuda.device_count()}"  # one GPU per process on each machine
    device = str(resolve_device(device))  # an unavailable or invalid device fails here, with the reason
    if world <= 1:
        return DistContext(), device
    import torch.distributed as dist

    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") and dist.is_nccl_available() else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://")
    return DistContext(rank, world, local, backend), device


def shard(items: Sequence[T], ctx: DistContext) -> list[T]:
    """This rank's share of ``items`` (strided: rank, rank + N, ...)."""
    return list(items[ctx.rank::ctx.world_size])


def _device_of(ctx: DistContext) -> torch.device:
    if ctx.backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(array: np.ndarray, ctx: DistContext) -> np.ndarray:
    """Element-wise sum over ranks of an integer array (exact); the array itself when not distributed."""
    if not ctx.distributed:
        return array
    import torch.distributed as dist

    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64)).to(_device_of(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy()


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj`` (small, picklable), in rank order."""
    if not ctx.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        import torch.distributed as dist

        if ctx.backend == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def finish(ctx: DistContext) -> None:
    """Leave the process group (after the last collective)."""
    if ctx.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
