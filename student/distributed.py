"""torchrun/DDP plumbing: init from env, rank helpers, metric reductions.

Without ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything degrades to a
single process: rank 0 of 1, reductions return their input.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as td

from teacher.device import ddp_backend


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device_type: str) -> DistInfo:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA) if launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not td.is_initialized():
        backend = ddp_backend(device_type)
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        td.init_process_group(backend=backend)
    return DistInfo(rank, world, local_rank)


def is_active() -> bool:
    return td.is_available() and td.is_initialized()


def _reduce(values: list[float], op) -> list[float]:
    if not is_active():
        return [float(v) for v in values]
    device = "cuda" if td.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    td.all_reduce(t, op=op)
    return t.cpu().tolist()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum each value over ranks."""
    return _reduce(values, td.ReduceOp.SUM if is_active() else None)


def all_reduce_max(values: list[float]) -> list[float]:
    return _reduce(values, td.ReduceOp.MAX if is_active() else None)


def all_reduce_min(values: list[float]) -> list[float]:
    return _reduce(values, td.ReduceOp.MIN if is_active() else None)


def barrier() -> None:
    if is_active():
        td.barrier()


def shutdown() -> None:
    if is_active():
        td.destroy_process_group()


def lockstep(batches):
    """Yield batches while every rank still has one; under DDP all ranks stop together.

    A rank whose replay skipped corrupt samples may have fewer batches than the precomputed
    step count; without this the other ranks would wait forever in the gradient all-reduce.
    Costs one scalar all-reduce per step, and nothing without DDP.
    """
    if not is_active():
        yield from batches
        return
    it = iter(batches)
    while True:
        batch = next(it, None)
        if all_reduce_min([0.0 if batch is None else 1.0])[0] == 0.0:
            return
        yield batch
