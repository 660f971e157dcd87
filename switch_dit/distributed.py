"""Process-group helpers: one process, or DDP under torchrun (NCCL on GPUs, gloo on CPUs).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them the run is a
single process and no process group is created.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Start the process group when launched by torchrun; pick this rank's device.

    device: "auto" (cuda:LOCAL_RANK when CUDA exists, else cpu), "cpu" or "cuda".
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' requested but CUDA is not available")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def cleanup(synchronize: bool = False) -> None:
    """Destroy the process group (no-op without one), after a barrier when `synchronize`.

    The barrier makes every rank finish its last collective before any rank tears the group down;
    a process that exits with the group alive (or destroys it while a peer is still in a
    collective) can abort in the backend's threads at interpreter exit ("terminate called
    without an active exception", seen once in 12 two-process runs). Pass synchronize=True
    when every rank finished its work; not after an error, when the other ranks may never
    reach the barrier (the default, for `finally:` blocks).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if synchronize:
        dist.barrier()
    dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t` over ranks (a copy; `t` itself unchanged). No-op without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t / dist.get_world_size()


def all_gather_object(obj: Any) -> List[Any]:
    """[obj of rank 0, obj of rank 1, ...]; [obj] without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
