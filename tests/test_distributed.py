"""DDP plumbing: ranks with uneven batch counts stop together instead of hanging."""
from __future__ import annotations

import os

import torch.multiprocessing as mp

from student import distributed as dist


def _run(rank: int, world: int, port: int, out: dict) -> None:
    import torch.distributed as td

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    td.init_process_group("gloo", rank=rank, world_size=world)
    try:
        batches = range(3 if rank == 0 else 2)  # rank 1 lost a batch to a corrupt sample
        out[rank] = list(dist.lockstep(batches))
    finally:
        td.destroy_process_group()


def test_lockstep_stops_all_ranks_at_the_shortest():
    port = 29500 + os.getpid() % 1000
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_run, args=(2, port, out), nprocs=2, join=True)
        assert dict(out) == {0: [0, 1], 1: [0, 1]}


def test_lockstep_is_a_passthrough_without_ddp():
    assert list(dist.lockstep(iter([1, 2, 3]))) == [1, 2, 3]
