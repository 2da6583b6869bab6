"""Persistent replay workers: processes beside the teacher, or Ray tasks on any node.

:func:`make_pool` gives an object with ``submit(fn, *args) -> handle`` (``handle.result()``,
``handle.cancel()``, ``handle.add_done_callback(cb)``), ``depth`` (tasks worth keeping in
flight) and ``close()``:

* ``workers == 0``: :class:`InlinePool`, the task runs in the caller's thread when its result
  is asked for (tests, benchmarks of one core).
* ``place == "local"``: :class:`ProcessPool`, ``workers`` processes forked once, when the pool
  is made, and reused for every task of every work item; each watches its parent and exits
  when it is gone, so a killed actor leaves no orphans.
* ``place == "ray"``: :class:`RayPool`, each task a Ray task of one CPU anywhere in the
  cluster (Ray reuses its worker processes); arguments and results go through the object
  store, so a GPU node with few cores is fed by CPU nodes.

Results do not depend on which worker ran a task: the tasks are pure functions.
"""
from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Callable

import torch

__all__ = ["InlinePool", "ProcessPool", "RayPool", "make_pool", "use_ray_cpus"]


def use_ray_cpus() -> int | None:
    """In a Ray actor or task: set torch's threads to the CPUs Ray assigned it (at least 1).

    Ray sets ``OMP_NUM_THREADS`` from ``num_cpus`` only when the environment has none: a node
    whose environment exports one (or a Ray that stops setting it) would run every actor with
    that many threads, more actors than cores' worth. Returns the thread count, or None (and
    changes nothing) outside Ray or without a CPU assignment.
    """
    try:  # ray stays out of the per-item path: feed and work run where it is not installed
        import ray
    except ImportError:
        return None
    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return None  # a driver (or a TeacherWorker built in-process): its threads are the caller's
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    if not cpus:
        return None
    threads = max(1, int(cpus))
    torch.set_num_threads(threads)
    return threads


class _Deferred:
    """A task run on demand, in the thread that asks for its result."""

    def __init__(self, fn: Callable, args: tuple):
        self._fn, self._args, self._done, self._value = fn, args, False, None

    def result(self) -> Any:
        if not self._done:
            self._value, self._done = self._fn(*self._args), True
        return self._value

    def cancel(self) -> bool:
        return True

    def add_done_callback(self, cb: Callable[[Any], None]) -> None:
        cb(self)


class InlinePool:
    """``workers == 0``: no processes; work happens where the result is read."""

    depth = 0  # nothing runs ahead of the reader
    pids: tuple[int, ...] = ()

    def submit(self, fn: Callable, *args) -> _Deferred:
        return _Deferred(fn, args)

    def close(self) -> None:
        pass


def _worker_init(parent: int, pids) -> None:
    torch.set_num_threads(1)  # workers run side by side with each other and the teacher
    pids.put(os.getpid())

    def watch() -> None:  # fork: reparented (getppid changes) as soon as the parent exits
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


class ProcessPool:
    """``workers`` forked processes, started now and kept for the pool's life.

    Forking happens here, before the owner starts its own threads (fork copies only the
    calling thread). ``pids`` are the worker processes.
    """

    def __init__(self, workers: int):
        ctx = multiprocessing.get_context("fork")
        started = ctx.SimpleQueue()
        self._executor = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                             initargs=(os.getpid(), started))
        self._executor.submit(int).result()  # forks every worker (fork context starts all at once)
        self.pids = tuple(sorted(started.get() for _ in range(workers)))
        self.depth = 2 * workers  # one running and one queued per worker

    def submit(self, fn: Callable, *args) -> Future:
        return self._executor.submit(fn, *args)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class _RayHandle:
    def __init__(self, ref):
        self.ref = ref

    def result(self) -> Any:
        import ray  # only RayPool's handles need ray (see use_ray_cpus)

        return ray.get(self.ref)

    def cancel(self) -> bool:
        import ray  # only RayPool's handles need ray (see use_ray_cpus)

        ray.cancel(self.ref)
        return True

    def add_done_callback(self, cb: Callable[[Any], None]) -> None:
        self.ref.future().add_done_callback(lambda _f: cb(self))


class RayPool:
    """Tasks as Ray tasks of one CPU each, wherever the cluster has a free CPU.

    ``depth`` = ``workers`` tasks in flight per pool (per teacher actor), so one actor does
    not queue a whole item ahead of the others.
    """

    pids: tuple[int, ...] = ()

    def __init__(self, workers: int):
        self.depth = workers
        self._remote: dict[Callable, Any] = {}

    def submit(self, fn: Callable, *args) -> _RayHandle:
        import ray  # only RayPool needs ray (see use_ray_cpus)

        if fn not in self._remote:
            self._remote[fn] = ray.remote(num_cpus=1, max_retries=3)(fn)
        return _RayHandle(self._remote[fn].remote(*args))

    def close(self) -> None:
        self._remote.clear()


def make_pool(place: str, workers: int):
    """The replay workers for one teacher: see the module docstring."""
    if workers == 0:
        return InlinePool()
    if place == "local":
        return ProcessPool(workers)
    if place == "ray":
        return RayPool(workers)
    raise ValueError(f"replay: unknown place {place!r} (local | ray)")
