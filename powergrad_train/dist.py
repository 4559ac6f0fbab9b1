"""The torchrun environment: rank, world size, process group, reductions."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as torch_dist

from powergrad_train.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_from_torchrun() -> DistEnv:
    """Read RANK / WORLD_SIZE / LOCAL_RANK as set by torchrun (a plain run is rank 0 of 1)."""
    return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def device_for(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def init(env: DistEnv, device: torch.device) -> None:
    """NCCL on GPUs, gloo on the CPU; nothing for a single process."""
    if env.distributed and not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                                      timeout=timedelta(minutes=30),
                                      device_id=device if device.type == "cuda" else None)


def close() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if torch_dist.is_initialized():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if torch_dist.is_initialized():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return tensor


def all_gather_objects(obj) -> list:
    if not torch_dist.is_initialized():
        return [obj]
    out = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not torch_dist.is_initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(compute):
    """compute() on rank 0 only; every rank returns its result, or raises its error."""
    if not torch_dist.is_initialized():
        return compute()
    box = [None]
    if torch_dist.get_rank() == 0:
        try:
            box = [(compute(), None)]
        except Exception as e:
            # The others raise the same user error; a bug keeps its traceback on rank 0.
            box = [(None, e if isinstance(e, UserError) else RuntimeError(f"failed on rank 0: {type(e).__name__}"))]
            torch_dist.broadcast_object_list(box, src=0)
            raise
    torch_dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error is not None:
        raise error
    return result
