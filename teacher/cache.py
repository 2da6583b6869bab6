"""The teacher caching job: score every (epoch, shard) work item once, on Ray.

Run it locally (embedded Ray) or on a cluster::

    python -m teacher.cache --config configs/cache/fmnist_regnety002.yaml [epochs=3 teacher.amp=none ...]
    RAY_ADDRESS=head:6379 python -m teacher.cache --config ...
    ray submit configs/teacher_cache.yaml teacher/cache.py --config /abs/path/config.yaml

Work items are ``(epoch, shard)`` pairs whose done marker is not yet in the cache, so
re-running the same command resumes (a re-run with nothing left says "12/12 items done,
nothing to run"). A resume compares the job's provenance with the cache's; paths are compared
by what they point to (manifest and checkpoint sha256), not by how they are spelled. With a
learned tail, one actor fits its basis (``teacher.calibrate``) before any item. A pool of :class:`TeacherWorker` actors (one GPU each,
or one CPU each on a laptop) runs :func:`teacher.work.run_item` on them. Each actor keeps
its replay workers for its whole life (``num_workers`` processes beside it, or Ray tasks on
any node with ``replay: ray``), and every call names the actor's next item, which is replayed
while the teacher scores the current one. An actor that dies (OOM, node loss, ``os._exit``,
a replay worker lost) hands its item back to the queue for the next free live actor, up to
``max_retries`` times per item; a replacement actor is requested but receives work only once it
is up, so a replacement that cannot be placed (the lost node held the only free GPU) never holds
an item: the job finishes on the survivors and reports the actors lost and items retried.
Data errors (truncated tar, missing shard) are not retried: the job finishes every other
item and then raises :class:`CacheJobError` naming the shards.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Run as `python -m teacher.cache` or as a path (`ray submit` copies this file to
    # ~/cache.py and runs it as a script): hand over to the imported module, so the actor
    # class is `teacher.cache.TeacherWorker`, importable by name in every Ray worker. The
    # repo root goes on sys.path for checkouts that are not pip-installed.
    if not __package__:
        _here = os.path.dirname(os.path.abspath(__file__))
        if sys.path and os.path.abspath(sys.path[0] or ".") == _here:
            sys.path.pop(0)  # teacher/ itself must not shadow top-level modules
        sys.path.insert(0, os.path.dirname(_here))
    from teacher.cache import HINTS, PROG, main as _main
    from pipeline.cli import run_cli

    sys.exit(run_cli(_main, PROG, hints=HINTS))

import argparse
import dataclasses
import json
import time
from collections import deque
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Sequence

import ray
from tqdm import tqdm

from pipeline import urls
from pipeline.cli import add_debug_flag, plural
from pipeline.config import load_config
from pipeline.manifest import load_manifest
from storage import CacheMismatchError, open_cache
from teacher.calibrate import calibrate_tail
from teacher.device import actor_plan, default_device, pin_memory
from teacher.feed import ItemFeed
from teacher.job import CacheJobConfig, OpenJob, make_teacher, open_job, open_writer
from teacher.pool import use_ray_cpus
from teacher.work import run_item

PROG = "python -m teacher.cache"
FORMAT_NOTE = "kdcache teacher cache"
FAULT_ENV = "KDCACHE_FAULT_EXIT_ONCE"  # test hook: path of a marker file, see teacher.work


class CacheJobError(RuntimeError):
    """The job finished what it could but some work items failed (names them)."""


# --------------------------------------------------------------------------- Ray actors

class TeacherWorker:
    """One teacher on one device, its replay workers and a cache writer; runs work items (a Ray actor).

    The replay workers (``teacher.work.ItemFeed``) start with the actor, before the teacher is
    built, and serve every item it runs.
    """

    def __init__(self, cfg_dict: dict, attrs: dict, fault_marker: str | None = None):
        use_ray_cpus()  # torch threads = the actor's num_cpus, whatever OMP_NUM_THREADS says
        self.cfg = CacheJobConfig.from_dict(cfg_dict)
        self.device = default_device()
        self.manifest = load_manifest(self.cfg.shards)
        self.feed = ItemFeed(self.cfg, self.manifest, self.cfg.teacher.input_size, pin=pin_memory(self.device))
        self.teacher = make_teacher(self.cfg, self.device)
        if self.teacher.checkpoint_sha256 != attrs["checkpoint_sha256"]:
            # another node's file or Hugging Face cache may hold other weights than the driver's
            raise CacheMismatchError(f"cache {self.cfg.out}: field checkpoint_sha256: this actor's teacher has "
                                     f"{self.teacher.checkpoint_sha256}, the job's is {attrs['checkpoint_sha256']}")
        self.writer = open_writer(self.cfg, self.manifest, attrs)
        self.fault_marker = fault_marker

    def run(self, epoch: int, shard_index: int, prefetch: tuple[int, int] | None = None) -> dict:
        """Cache (epoch, shard); replay ``prefetch``, the next item asked of this actor, meanwhile."""
        try:
            result = run_item(self.cfg, epoch, shard_index, teacher=self.teacher, writer=self.writer,
                              manifest=self.manifest, feed=self.feed, prefetch=prefetch,
                              fault_marker=self.fault_marker)
        except BrokenProcessPool:
            os._exit(4)  # a replay worker died (OOM?): the job retries the item on a fresh actor
        return dataclasses.asdict(result)

    def calibrate(self) -> bool:
        """Fit and store the cache's tail basis if it is missing (teacher.calibrate)."""
        return calibrate_tail(self.cfg, self.manifest, self.teacher, self.writer)

    def pid(self) -> int:
        return os.getpid()

    def worker_pids(self) -> list[int]:
        return list(self.feed.pool.pids)


def connect_ray(address: str | None) -> bool:
    """Join ``address`` (or RAY_ADDRESS / a ``ray start`` cluster on this node) or start
    embedded Ray. ``address="local"`` (or RAY_ADDRESS=local) always starts a fresh embedded
    instance. Authentication is Ray's: token auth is on for an embedded instance (the token is
    RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token, made if missing);
    joining a cluster started with RAY_AUTH_MODE=token needs that cluster's token (README).
    Returns True when this call started Ray (and should shut it down)."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    ray.init(address=address, **kwargs)
    return True


def _auto_actors(cfg: CacheJobConfig) -> tuple[int, dict]:
    return actor_plan(ray.cluster_resources(), cfg.actors, cfg.num_workers, cfg.replay)


# --------------------------------------------------------------------------- the job

def write_summary(cfg: CacheJobConfig, summary: dict) -> str:
    """Store the job summary beside the cache's arrays (``summary.json``, any URL); returns its path."""
    path = urls.join(cfg.out, "summary.json")
    urls.write_bytes(path, json.dumps(summary, indent=2).encode())
    return path


@dataclass
class _Tally:
    """What the actors did so far."""

    images: int = 0
    retries: int = 0
    startup: float = 0.0
    calibration: float = 0.0
    actors_lost: int = 0              # actors that died (their items went back to the queue)
    actors_replaced: int = 0          # replacements that came up (and took work if any was left)
    replacements_cancelled: int = 0   # replacements still starting (unplaceable?) when the job ended
    skipped: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    results: list = field(default_factory=list)


class _Slots:
    """Work items to teacher actors: one call in flight per live actor.

    Each call also names the actor's *next* item (taken from the queue now), which the actor
    replays while its teacher scores the current one; that item is the slot's next call.

    When an actor dies (OOM, its node lost, a replay worker lost) its item and next item go back
    to the front of the queue at once, for the next free live actor, and a replacement actor is
    requested for the slot. A replacement only gets work once it has answered ``pid``: its
    ``starting`` ref is waited on in the same ``ray.wait`` as the running calls, so live actors
    never wait on it (it may not be placeable at all: the lost node held the only free GPU/CPU,
    or a preempted node takes long to return). The job waits for a replacement only while no
    actor is alive. Replacements still starting when the last item is done are killed
    (:meth:`close`).
    """

    def __init__(self, todo: list, new_actor, n_actors: int, max_start_failures: int):
        self.queue, self.new_actor = deque(todo), new_actor
        self.actors = [new_actor() for _ in range(n_actors)]
        self.live = [True] * n_actors      # False: a replacement is starting, or the slot gave up
        self.next: list[tuple[int, int] | None] = [None] * n_actors
        self.busy = [False] * n_actors
        self.running: dict[Any, tuple[int, tuple[int, int]]] = {}  # ref -> (slot, item)
        self.starting: dict[Any, int] = {}                          # replacement's pid ref -> slot
        self.start_failures = [0] * n_actors
        self.max_start_failures = max_start_failures
        self.lost = self.replaced = 0

    def submit(self, slot: int) -> None:
        """Give ``slot``'s live actor its next item (if any is left) with the one after as prefetch."""
        item, self.next[slot] = self.next[slot], None
        if item is None and self.queue:
            item = self.queue.popleft()
        if item is None:
            self.busy[slot] = False
            return
        self.next[slot] = self.queue.popleft() if self.queue else None
        self.running[self.actors[slot].run.remote(*item, prefetch=self.next[slot])] = (slot, item)
        self.busy[slot] = True

    def fill(self) -> None:
        """Hand queued items to every live actor without a call in flight."""
        for slot, live in enumerate(self.live):
            if live and not self.busy[slot] and self.queue:
                self.submit(slot)

    def waiting_on(self) -> list:
        """The refs the job waits on: running calls and starting replacements; empty when done.

        A replacement still starting is waited on only while items are queued; none at all
        once every item is done, or when no actor can take the queue (see :meth:`stranded`)."""
        if self.running:
            return list(self.running) + list(self.starting)
        return list(self.starting) if self.queue else []

    def stranded(self) -> list[tuple[int, int]]:
        """Queued items no actor can ever take (every slot gave up on its replacements)."""
        if self.running or self.starting or any(self.live):
            return []
        items, self.queue = list(self.queue), deque()
        return items

    def died(self, slot: int, item: tuple[int, int] | None) -> None:
        """``slot``'s actor died running ``item`` (None: the item is not retried): requeue, replace."""
        for back in (self.next[slot], item):
            if back is not None:
                self.queue.appendleft(back)
        self.next[slot], self.busy[slot], self.live[slot] = None, False, False
        self.lost += 1
        self._replace(slot)
        self.fill()  # the requeued items go to a live actor now, not to the replacement

    def _replace(self, slot: int) -> None:
        try:
            ray.kill(self.actors[slot], no_restart=True)  # the old handle: make sure it is gone
        except Exception:
            pass
        self.actors[slot] = self.new_actor()
        self.starting[self.actors[slot].pid.remote()] = slot

    def on_started(self, ref) -> str | None:
        """A replacement answered (or died starting): it takes work now, or is replaced again.
        Returns the error when the slot gave up (``max_start_failures`` starts in a row died)."""
        slot = self.starting.pop(ref)
        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as err:
            self.start_failures[slot] += 1
            self.lost += 1
            if self.start_failures[slot] > self.max_start_failures:
                return f"replacement actor died {self.start_failures[slot]} times starting: {err}"
            self._replace(slot)
            return None
        self.start_failures[slot], self.live[slot] = 0, True
        self.replaced += 1
        self.submit(slot)
        return None

    def close(self) -> int:
        """Kill every actor, live or still starting; returns how many replacements were still starting."""
        cancelled = len(self.starting)
        for actor in self.actors:
            ray.kill(actor)
        self.starting.clear()
        return cancelled


def _run_items(job: OpenJob, fault_marker: str | None, progress: bool, t0: float) -> _Tally:
    """Run the job's pending items on a pool of teacher actors; retry items whose actor died."""
    cfg, attrs, todo = job.cfg, job.attrs, job.todo
    tally = _Tally()
    n_actors, options = _auto_actors(cfg)
    actor_cls = ray.remote(TeacherWorker).options(**options)
    cfg_dict = cfg.to_dict()
    slots = _Slots(todo, lambda: actor_cls.remote(cfg_dict, attrs, fault_marker), min(n_actors, len(todo)),
                   max_start_failures=cfg.max_retries)
    try:  # a teacher that cannot be built is a config error: fail now, do not retry
        ray.get([a.pid.remote() for a in slots.actors])
    except ray.exceptions.RayActorError as err:
        raise CacheJobError(f"{cfg.out}: could not start a teacher actor: {err}") from None
    tally.startup = time.perf_counter() - t0
    # the tail basis is global: one actor fits it before any item is handed out (once per cache);
    # another one does if it dies meanwhile (its first item then fails over like any other)
    for i, actor in enumerate(slots.actors):
        try:
            ray.get(actor.calibrate.remote())
            break
        except ray.exceptions.RayActorError:
            if i == len(slots.actors) - 1:
                raise
    tally.calibration = time.perf_counter() - t0 - tally.startup
    attempts: dict[tuple[int, int], int] = {}
    bar = tqdm(total=len(todo), unit="item", disable=not progress, file=sys.stderr, desc=f"caching {cfg.out}")
    try:
        while True:
            slots.fill()  # nothing queued may wait while a live actor is idle
            for item in slots.stranded():
                tally.failed.append({"epoch": item[0], "shard": item[1], "error": "no teacher actor left to run it"})
            waiting = slots.waiting_on()
            if not waiting:
                break
            (ref,), _ = ray.wait(waiting, num_returns=1)
            if ref in slots.starting:
                gave_up = slots.on_started(ref)
                if gave_up:
                    print(f"{cfg.out}: an actor slot is closed: {gave_up}", file=sys.stderr)
                continue
            slot, item = slots.running.pop(ref)
            try:
                res = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                attempts[item] = attempts.get(item, 0) + 1
                if attempts[item] > cfg.max_retries:
                    tally.failed.append({"epoch": item[0], "shard": item[1],
                                         "error": f"actor died {attempts[item]} times: {err}"})
                    bar.update(1)
                    item = None
                else:
                    tally.retries += 1
                slots.died(slot, item)  # requeued for a live actor; a replacement is requested
                continue
            except ray.exceptions.RayTaskError as err:
                # data errors (truncated/missing shard) are deterministic: do not retry
                cause = err.cause if getattr(err, "cause", None) is not None else err
                tally.failed.append({"epoch": item[0], "shard": item[1], "error": f"{type(cause).__name__}: {cause}"})
                bar.update(1)
                slots.submit(slot)
                continue
            tally.results.append(res)
            tally.images += res["images"]
            tally.skipped.extend(res["skipped"])
            bar.update(1)
            bar.set_postfix_str(f"{tally.images / max(time.perf_counter() - t0, 1e-9):.1f} img/s")
            slots.submit(slot)
    finally:
        bar.close()
        tally.replacements_cancelled = slots.close()
        tally.actors_lost, tally.actors_replaced = slots.lost, slots.replaced
    return tally


def run_job(cfg: CacheJobConfig, *, address: str | None = None, progress: bool = True,
            fault_marker: str | None = None) -> dict:
    """Cache every pending (epoch, shard) item of ``cfg``; returns the summary dict.

    Raises CacheJobError (after finishing all other items and writing the summary) when
    some items failed for good.
    """
    job = open_job(cfg)
    if job.warning:  # with or without progress (--no-progress): it says why a student would learn less
        print(job.warning, file=sys.stderr)
    if not job.todo:  # nothing to run: summary.json keeps the figures of the run that did the work
        return _summarize(job, _Tally(), 0.0)
    fault_marker = fault_marker or os.environ.get(FAULT_ENV) or None

    started_ray = connect_ray(address)
    t0 = time.perf_counter()
    try:
        tally = _run_items(job, fault_marker, progress, t0)
    finally:
        if started_ray:
            ray.shutdown()

    seconds = time.perf_counter() - t0
    failed = tally.failed
    summary = _summarize(job, tally, seconds)
    summary["summary_path"] = write_summary(job.cfg, summary)
    if failed:
        lines = "\n".join(f"  epoch {f['epoch']} shard {f['shard']}: {f['error']}" for f in failed)
        raise CacheJobError(f"{len(failed)} work item(s) of {job.cfg.out} failed; everything else "
                            f"is cached and a re-run retries only these:\n{lines}")
    return summary


def _summarize(job: OpenJob, tally: _Tally, seconds: float) -> dict:
    cfg, manifest, done_before = job.cfg, job.manifest, job.done_before
    reader = open_cache(cfg.out)
    rows = cfg.epochs * manifest.num_samples * cfg.views
    total_bytes = reader.bytes_on_disk()
    # skipped rows of items done in earlier runs are in the cache's missing records
    all_missing = list(reader.missing_records())
    images, startup, calibration = tally.images, tally.startup, tally.calibration
    return {
        "cache": cfg.out,
        "items_total": cfg.epochs * len(manifest.shards),
        "items_done_before": done_before,
        "items_run": len(tally.results),
        "items_failed": tally.failed,
        "retries": tally.retries,
        # failover: actors that died (node lost, OOM, ...), replacements that came up,
        # and replacements still waiting for a place when the last item was done (killed then)
        "actors_lost": tally.actors_lost,
        "actors_replaced": tally.actors_replaced,
        "replacements_cancelled": tally.replacements_cancelled,
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 2) if seconds > 0 else 0.0,
        # actor start-up (process spawn, imports, teacher build) and the tail calibration (once per
        # cache) vs the steady rate after them
        "startup_seconds": round(startup, 3),
        "calibration_seconds": round(calibration, 3),
        "steady_images_per_s": (round(images / (seconds - startup - calibration), 2)
                                if seconds > startup + calibration else 0.0),
        "rows": rows,
        "bytes_on_disk": total_bytes,
        "bytes_per_row": round(total_bytes / rows, 3) if rows else 0.0,
        "skipped": tally.skipped,
        "skipped_total_in_cache": len(all_missing),
        "items": sorted([[r["epoch"], r["shard_index"]] for r in tally.results]),
    }


def report(summary: dict) -> str:
    """The job's last line: what is done, what ran now, where the summary is."""
    done = summary["items_done_before"] + summary["items_run"]
    text = f"cache {summary['cache']}: {done}/{plural(summary['items_total'], 'item')} done"
    if not summary["items_run"]:
        return text + ", nothing to run"
    text += (f" ({plural(summary['items_run'], 'item')} run now: {summary['images']} images in "
             f"{summary['seconds']:.0f} s, {summary['images_per_s']:.0f} img/s")
    skipped = len(summary["skipped"])
    text += f", {plural(skipped, 'sample')} skipped)" if skipped else ")"
    lost = summary.get("actors_lost", 0)
    if lost:  # failover: say what was lost and what it cost
        text += (f"; {plural(lost, 'actor')} lost, {plural(summary['retries'], 'item')} retried, "
                 f"{summary['actors_replaced']} replaced")
        if summary["replacements_cancelled"]:
            text += f", {plural(summary['replacements_cancelled'], 'replacement')} never placed"
    return text + f"; summary in {summary['summary_path']}"


HINTS = {
    "ConfigError": "configs/cache/*.yaml show the keys; CacheJobConfig in teacher/job.py documents them",
    "CacheMismatchError": "a cache resumes only under the job config that made it; set out= to a new path "
                          "for a new cache",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="configs/cache/<name>.yaml")
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster to join; default RAY_ADDRESS, else a `ray start` "
                             "cluster on this node, else embedded Ray; 'local' = always embedded")
    parser.add_argument("--no-progress", action="store_true")
    add_debug_flag(parser)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. epochs=2 teacher.amp=none")
    args = parser.parse_args(argv)
    cfg = load_config(CacheJobConfig, args.config, args.overrides)
    print(report(run_job(cfg, address=args.ray_address, progress=not args.no_progress)))
    return 0
