"""Several processes under `torchrun` (or `accelerate launch`): which share of the work is this rank's, and
gathering the shares back in order. One process (no launcher) is a world of one and needs no process group."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.errors import MimicError


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int

    @property
    def main(self) -> bool:
        """The rank that computes metrics once and writes the outputs."""
        return self.rank == 0


def world() -> World:
    """This process's place, from the launcher's environment; joins the process group the first time in a world
    of several (gloo on a CPU machine; on a CUDA machine NCCL for GPU tensors and gloo for CPU ones)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    here = World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))
    if size > 1 and not dist.is_initialized():
        if torch.cuda.is_available():  # NCCL for CUDA tensors, gloo for CPU ones and for objects and barriers
            torch.cuda.set_device(here.local_rank)  # each rank its own GPU, also for NCCL's own buffers
            dist.init_process_group("cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group("gloo")
    return here


def rank_device(device: str, here: World) -> str:
    """`cuda` becomes this rank's GPU (`cuda:LOCAL_RANK`) in a world of several; any other device stays.
    `auto` (one model over several GPUs) is for one process: one rank per GPU is the other way to use them."""
    if device == "auto" and here.size > 1:
        raise MimicError(
            "model.device=auto spreads one model over the GPUs of ONE process: run without torchrun"
        )
    return f"cuda:{here.local_rank}" if device == "cuda" and here.size > 1 else device


def share(n: int, here: World) -> range:
    """This rank's contiguous share of n items (shares differ in size by at most one, in rank order)."""
    return range(here.rank * n // here.size, (here.rank + 1) * n // here.size)


def gather(value, here: World) -> list:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    if here.size == 1:
        return [value]
    values = [None] * here.size
    dist.all_gather_object(values, value)
    return values


def barrier(here: World) -> None:
    """Wait until every rank is here (nothing in a world of one)."""
    if here.size > 1:
        dist.barrier()


def reduce_sum(values: torch.Tensor, here: World) -> torch.Tensor:
    """The elementwise sum of `values` over the ranks (a CPU tensor; itself in a world of one)."""
    if here.size > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def reduce_gradients(parameters, here: World) -> None:
    """Sum every parameter's gradient over the ranks (a rank whose part of a batch was empty adds zeros), so
    every rank steps with the whole batch's gradient and the weights stay identical."""
    if here.size == 1:
        return
    for param in parameters:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad)
