"""The teacher caching job: score every (epoch, shard) work item once, on Ray.

Run it locally (embedded Ray) or on a cluster::

    python -m pipeline.cache --config configs/cache/fmnist_regnety002.yaml [epochs=3 teacher.amp=none ...]
    RAY_ADDRESS=head:6379 python -m pipeline.cache --config ...
    ray submit configs/teacher_cache.yaml pipeline/cache.py --config /abs/path/config.yaml

Work items are ``(epoch, shard)`` pairs whose done marker is not yet in the cache, so
re-running the same command resumes (a re-run with nothing left says "12/12 items done,
nothing to run"). A resume compares the job's provenance with the cache's; paths are
compared by what they point to (manifest and checkpoint sha256), not by how they are spelled. A pool of :class:`TeacherActor` (one GPU each, or one
CPU each on a laptop) runs :func:`pipeline.work.run_item` on them; each actor decodes and
replays its shard in ``num_workers`` DataLoader processes. An actor that dies (OOM, node
loss, ``os._exit``) is re-created and its item resubmitted, up to ``max_retries`` times.
Data errors (truncated tar, missing shard) are not retried: the job finishes every other
item and then raises :class:`CacheJobError` naming the shards.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Run as `python -m pipeline.cache` or as a path (`ray submit` copies this file to
    # ~/cache.py and runs it as a script): hand over to the imported module, so the actor
    # class is `pipeline.cache.TeacherWorker`, importable by name in every Ray worker. The
    # repo root goes on sys.path for checkouts that are not pip-installed.
    if not __package__:
        _here = os.path.dirname(os.path.abspath(__file__))
        if sys.path and os.path.abspath(sys.path[0] or ".") == _here:
            sys.path.pop(0)  # pipeline/ itself must not shadow top-level modules
        sys.path.insert(0, os.path.dirname(_here))
    from pipeline.cache import HINTS, PROG, main as _main
    from pipeline.cli import run_cli

    sys.exit(run_cli(_main, PROG, hints=HINTS))

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from pipeline.cli import add_debug_flag, plural
from pipeline.config import ConfigBase, check, load_config
from pipeline.plan import AugConfig, fingerprint
from teacher.model import TeacherConfig, build_teacher, file_sha256
from teacher.tail import TailConfig

PROG = "python -m pipeline.cache"
FORMAT_NOTE = "kdcache teacher cache"
FAULT_ENV = "KDCACHE_FAULT_EXIT_ONCE"  # test hook: path of a marker file, see pipeline.work


class CacheJobError(RuntimeError):
    """The job finished what it could but some work items failed (names them)."""


@dataclass
class CacheJobConfig(ConfigBase):
    """Everything that defines a teacher cache (values only; saved in the cache attrs).

    Args:
        shards: split directory with ``manifest.json`` (see pipeline.shards).
        out: cache path (local directory or fsspec URL).
        epochs, views: rows are (epoch, sample_id, view) for epoch < epochs, view < views.
        k: top-k logits stored per row.
        seed: augmentation plan seed.
        batch_size: teacher batch size.
        num_workers: decode/replay processes per actor (0 = in the actor process).
        actors: teacher actors; 0 = one per GPU, else CPUs // (1 + num_workers).
        max_retries: re-runs of a work item whose actor died.
        aug: the augmentation plan; teacher: the model; tail: the learned tail (teacher/tail.py).
    """

    shards: str = ""
    out: str = ""
    epochs: int = 1
    views: int = 1
    k: int = 10
    seed: int = 0
    batch_size: int = 64
    num_workers: int = 2
    actors: int = 0
    max_retries: int = 3
    aug: AugConfig = field(default_factory=AugConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    tail: TailConfig = field(default_factory=TailConfig)

    def __post_init__(self) -> None:
        check(bool(self.shards), "shards", "set the split directory (holding manifest.json)")
        check(bool(self.out), "out", "set the cache path")
        for name in ("epochs", "views", "k", "batch_size"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, found {getattr(self, name)}")
        for name in ("num_workers", "actors", "max_retries"):
            check(getattr(self, name) >= 0, name, f"must be >= 0, found {getattr(self, name)}")
        check(self.k <= self.teacher.num_classes, "k",
              f"must be <= teacher.num_classes={self.teacher.num_classes}, found {self.k}")


# --------------------------------------------------------------------------- provenance

def checkpoint_sha256(t: TeacherConfig) -> str:
    """Same value as ``Teacher.checkpoint_sha256``, without building the model."""
    if t.checkpoint:
        return file_sha256(t.checkpoint)
    return f"callable:{t.callable}" if t.callable else "random"


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("kdcache")
    except Exception:  # running from a bare checkout
        return "unknown"


# Path fields of the stored job config -> the attr that says what they point to. A resume
# compares that content identity, not the spelling ("runs/x" vs "/home/me/runs/x", a moved dataset).
PATH_FIELDS = {("shards",): "manifest_sha256", ("teacher", "checkpoint"): "checkpoint_sha256"}


def _absolute(path: str | None) -> str | None:
    return os.path.abspath(path) if path and "://" not in path else path


def absolute_paths(cfg: CacheJobConfig) -> CacheJobConfig:
    """``cfg`` with local paths made absolute (URLs kept): Ray actors do not share the driver's
    working directory, and the job config stored in the cache must work from anywhere."""
    return cfg.replace(shards=_absolute(cfg.shards), out=_absolute(cfg.out),
                       teacher=cfg.teacher.replace(checkpoint=_absolute(cfg.teacher.checkpoint)))


def cache_attrs(cfg: CacheJobConfig, manifest) -> dict:
    """Provenance stored in the cache group attrs (compared again on every resume)."""
    t = cfg.teacher
    job = {k: v for k, v in absolute_paths(cfg).to_dict().items()
           if k not in ("batch_size", "num_workers", "actors", "max_retries", "out")}
    return {
        "teacher": t.name if not t.callable else t.callable,
        "checkpoint_sha256": checkpoint_sha256(t),
        "num_classes": t.num_classes,
        "classes": list(manifest.classes),
        "input_size": t.input_size,
        "mean": list(t.mean),
        "std": list(t.std),
        "k": cfg.k,
        "epochs": cfg.epochs,
        "views": cfg.views,
        "seed": cfg.seed,
        "aug": cfg.aug.to_dict(),
        "fingerprint": fingerprint(cfg.aug),
        "manifest_sha256": manifest.sha256,
        "num_samples": manifest.num_samples,
        "shard_size": manifest.shard_size,
        "package_version": package_version(),
        # what does not change the rows is left out, so a resume may use other batch sizes
        "job": job,
    }


def resume_attrs(cfg: CacheJobConfig, attrs: dict) -> dict:
    """``attrs`` with the existing cache's spelling of each path that points to the same content.

    storage compares attrs for equality on reopen; a path field whose content identity (manifest
    or checkpoint sha256) matches the cache's takes the cache's stored value, so only a real
    difference (another dataset, another teacher file, another config value) is refused.
    """
    from storage import CacheMismatchError, open_cache

    try:
        stored = open_cache(cfg.out).attrs
    except (FileNotFoundError, KeyError, CacheMismatchError):
        return attrs  # no complete cache there: create_cache creates it or names the mismatch
    out = json.loads(json.dumps(attrs))
    for (*parents, leaf), identity in PATH_FIELDS.items():
        mine, theirs = out["job"], stored.get("job", {})
        for key in parents:
            mine, theirs = mine.get(key, {}), theirs.get(key, {})
        if stored.get(identity) == attrs[identity] and leaf in theirs:
            mine[leaf] = theirs[leaf]
    return out


def open_writer(cfg: CacheJobConfig, manifest, attrs: dict):
    """Create the cache, or reopen it for a resume (storage checks attrs are identical)."""
    from storage import create_cache

    return create_cache(
        cfg.out, shards=manifest.shards, shard_size=manifest.shard_size,
        num_samples=manifest.num_samples, epochs=cfg.epochs, views=cfg.views, k=cfg.k,
        num_classes=cfg.teacher.num_classes, attrs=attrs, tail_dim=cfg.tail.dim,
    )


def check_manifest(cfg: CacheJobConfig, manifest) -> None:
    check(manifest.num_classes == cfg.teacher.num_classes, "teacher.num_classes",
          f"dataset {cfg.shards} has {manifest.num_classes} classes, teacher has {cfg.teacher.num_classes}")


# --------------------------------------------------------------------------- Ray actors

def make_teacher(cfg: CacheJobConfig, device: str = "cpu"):
    """The job's teacher: top-``cfg.k``, fed images normalized with the plan's mean/std."""
    return build_teacher(cfg.teacher, device=device, k=cfg.k,
                         input_mean=cfg.aug.mean, input_std=cfg.aug.std)


class TeacherWorker:
    """One teacher on one device plus a cache writer; runs work items (a Ray actor)."""

    def __init__(self, cfg_dict: dict, attrs: dict, fault_marker: str | None = None):
        import torch

        from pipeline.shards import load_manifest

        self.cfg = CacheJobConfig.from_dict(cfg_dict)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.manifest = load_manifest(self.cfg.shards)
        self.teacher = make_teacher(self.cfg, self.device)
        self.writer = open_writer(self.cfg, self.manifest, attrs)
        self.fault_marker = fault_marker

    def run(self, epoch: int, shard_index: int) -> dict:
        from pipeline.work import run_item

        result = run_item(self.cfg, epoch, shard_index, teacher=self.teacher, writer=self.writer,
                          manifest=self.manifest, fault_marker=self.fault_marker)
        return dataclasses.asdict(result)

    def calibrate(self) -> bool:
        """Fit and store the cache's tail basis if it is missing (pipeline.calibrate)."""
        from pipeline.calibrate import calibrate_tail

        return calibrate_tail(self.cfg, self.manifest, self.teacher, self.writer)

    def pid(self) -> int:
        return os.getpid()


def connect_ray(address: str | None) -> bool:
    """Join ``address`` (or RAY_ADDRESS / a ``ray start`` cluster on this node) or start
    embedded Ray. ``address="local"`` always starts a fresh embedded instance.
    Returns True when this call started Ray (and should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    ray.init(address=address, **kwargs)
    return True


def _auto_actors(cfg: CacheJobConfig) -> tuple[int, dict]:
    import ray

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    if gpus:
        return (cfg.actors or gpus), {"num_gpus": 1, "num_cpus": 1}
    cpus = int(res.get("CPU", 1))
    return (cfg.actors or max(1, cpus // (1 + cfg.num_workers))), {"num_cpus": 1}


# --------------------------------------------------------------------------- the job

def pending_items(writer, epochs: int, num_shards: int) -> tuple[list[tuple[int, int]], int]:
    """(epoch, shard) items without a done marker, epoch-major (so students can start
    on early epochs while later ones are cached), and how many were already done."""
    done = set(writer.done_items())
    todo = [(e, s) for e in range(epochs) for s in range(num_shards) if (e, s) not in done]
    return todo, len(done)


def write_summary(cfg: CacheJobConfig, summary: dict) -> str:
    """Store the job summary with the cache (storage function if any, else a sidecar)."""
    import storage

    writer_fn = getattr(storage, "write_summary", None)
    if writer_fn is not None:
        writer_fn(cfg.out, summary)
        return cfg.out
    import fsspec

    path = cfg.out.rstrip("/") + "/summary.json"
    with fsspec.open(path, "w") as f:
        json.dump(summary, f, indent=2)
    return path


def run_job(cfg: CacheJobConfig, *, address: str | None = None, progress: bool = True,
            fault_marker: str | None = None) -> dict:
    """Cache every pending (epoch, shard) item of ``cfg``; returns the summary dict.

    Raises CacheJobError (after finishing all other items and writing the summary) when
    some items failed for good.
    """
    import ray
    from tqdm import tqdm

    from pipeline.shards import class_mix_warning, load_manifest

    cfg = absolute_paths(cfg)
    manifest = load_manifest(cfg.shards)
    check_manifest(cfg, manifest)
    warning = class_mix_warning(manifest)
    if warning and progress:
        print(warning, file=sys.stderr)
    attrs = resume_attrs(cfg, cache_attrs(cfg, manifest))
    writer = open_writer(cfg, manifest, attrs)
    todo, done_before = pending_items(writer, cfg.epochs, len(manifest.shards))
    if not todo:  # nothing to run: summary.json keeps the figures of the run that did the work
        return _summarize(cfg, manifest, done_before, todo, [], 0, 0.0, 0, [], [])
    fault_marker = fault_marker or os.environ.get(FAULT_ENV) or None

    started_ray = connect_ray(address) if todo else False
    t0 = time.perf_counter()
    images, retries, skipped, failed, results = 0, 0, [], [], []
    startup = 0.0
    try:
        if todo:
            n_actors, options = _auto_actors(cfg)
            n_actors = min(n_actors, len(todo))
            actor_cls = ray.remote(TeacherWorker).options(**options)
            cfg_dict = cfg.to_dict()

            def new_actor():
                return actor_cls.remote(cfg_dict, attrs, fault_marker)

            actors = [new_actor() for _ in range(n_actors)]
            try:  # a teacher that cannot be built is a config error: fail now, do not retry
                ray.get([a.pid.remote() for a in actors])
            except ray.exceptions.RayActorError as err:
                raise CacheJobError(f"{cfg.out}: could not start a teacher actor: {err}") from None
            # the tail basis is global: one actor fits it before any item is handed out
            ray.get(actors[0].calibrate.remote())
            startup = time.perf_counter() - t0
            queue = list(todo)
            attempts: dict[tuple[int, int], int] = {}
            running: dict[Any, tuple[int, tuple[int, int]]] = {}  # ref -> (actor slot, item)

            def submit(slot: int) -> None:
                if queue:
                    item = queue.pop(0)
                    running[actors[slot].run.remote(*item)] = (slot, item)

            for slot in range(n_actors):
                submit(slot)
            bar = tqdm(total=len(todo), unit="item", disable=not progress, file=sys.stderr,
                       desc=f"caching {cfg.out}")
            while running:
                (ref,), _ = ray.wait(list(running), num_returns=1)
                slot, item = running.pop(ref)
                try:
                    res = ray.get(ref)
                except ray.exceptions.RayActorError as err:
                    attempts[item] = attempts.get(item, 0) + 1
                    if attempts[item] > cfg.max_retries:
                        failed.append({"epoch": item[0], "shard": item[1],
                                       "error": f"actor died {attempts[item]} times: {err}"})
                    else:
                        retries += 1
                        queue.insert(0, item)
                    actors[slot] = new_actor()  # the old one is gone; start over on this slot
                    submit(slot)
                    continue
                except ray.exceptions.RayTaskError as err:
                    # data errors (truncated/missing shard) are deterministic: do not retry
                    cause = err.cause if getattr(err, "cause", None) is not None else err
                    failed.append({"epoch": item[0], "shard": item[1],
                                   "error": f"{type(cause).__name__}: {cause}"})
                    bar.update(1)
                    submit(slot)
                    continue
                results.append(res)
                images += res["images"]
                skipped.extend(res["skipped"])
                bar.update(1)
                elapsed = time.perf_counter() - t0
                bar.set_postfix_str(f"{images / max(elapsed, 1e-9):.1f} img/s")
                submit(slot)
            bar.close()
            for actor in actors:
                ray.kill(actor)
    finally:
        if started_ray:
            ray.shutdown()

    seconds = time.perf_counter() - t0
    summary = _summarize(cfg, manifest, done_before, todo, results, images, seconds,
                         retries, skipped, failed, startup)
    summary["summary_path"] = write_summary(cfg, summary)
    if failed:
        lines = "\n".join(f"  epoch {f['epoch']} shard {f['shard']}: {f['error']}" for f in failed)
        raise CacheJobError(f"{len(failed)} work item(s) of {cfg.out} failed; everything else "
                            f"is cached and a re-run retries only these:\n{lines}")
    return summary


def _summarize(cfg, manifest, done_before, todo, results, images, seconds, retries,
               skipped, failed, startup: float = 0.0) -> dict:
    from storage import open_cache

    reader = open_cache(cfg.out)
    rows = cfg.epochs * manifest.num_samples * cfg.views
    total_bytes = reader.bytes_on_disk()
    # skipped rows of items done in earlier runs are in the cache's missing records
    all_missing = list(reader.missing_records())
    return {
        "cache": cfg.out,
        "items_total": cfg.epochs * len(manifest.shards),
        "items_done_before": done_before,
        "items_run": len(results),
        "items_failed": failed,
        "retries": retries,
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 2) if seconds > 0 else 0.0,
        # actor start-up (process spawn, imports, teacher build) vs the steady rate after it
        "startup_seconds": round(startup, 3),
        "steady_images_per_s": round(images / (seconds - startup), 2) if seconds > startup else 0.0,
        "rows": rows,
        "bytes_on_disk": total_bytes,
        "bytes_per_row": round(total_bytes / rows, 3) if rows else 0.0,
        "skipped": skipped,
        "skipped_total_in_cache": len(all_missing),
        "items": sorted([[r["epoch"], r["shard_index"]] for r in results]),
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
    return text + f"; summary in {summary['summary_path']}"


HINTS = {
    "ConfigError": "configs/cache/*.yaml show the keys; CacheJobConfig in pipeline/cache.py documents them",
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
