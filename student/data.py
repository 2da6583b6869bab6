"""Student data: the replayed shards of a student epoch joined with cached teacher targets.

The plan (seed, views, augmentation) defaults to the cache's attrs, so the student replays
exactly what the teacher saw; the cache is opened with ``expect=`` the student's plan
fingerprint, the shard manifest sha256 and k, and refuses to serve anything else.
``pipeline.schedule`` decides which cached rows a student epoch reads (one pass over the N
images: N/V samples x V views with the default ``ra`` sampler) and which rank reads them;
``pipeline.loader`` replays and batches them; each batch is joined with the cache rows
``(cache epoch, sample_id, view)``. Rows the cache marks invalid are dropped (and counted).
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from pipeline.loader import LoaderConfig, ReplayLoader, split_loader
from pipeline.plan import AugConfig, fingerprint
from pipeline.schedule import Schedule
from pipeline.manifest import Manifest, load_manifest
from storage import CacheCorruptError, CacheMismatchError, CacheNotReady, CacheReader, EpochNotInCache, open_cache
from student.config import TrainConfig
from teacher.model import checkpoint_sha256


@dataclass(frozen=True)
class ReplayPlan:
    """What the student replays: the teacher's plan, or an explicit one when there is no cache."""

    seed: int
    views: int                  # repeated-augmentation views V (the cache's)
    aug: AugConfig
    fingerprint: str
    cached_epochs: int | None   # epochs in the cache (training cycles through them); None = no cache
    k: int | None               # teacher top-k (cache or teacher.k)


def resolve_plan(cfg: TrainConfig, attrs: dict | None) -> ReplayPlan:
    """Merge the student's data settings with the cache attrs (the cache wins by default).

    Raises:
        CacheMismatchError: the student's explicit aug/seed/views disagree with the cache.
    """
    data = cfg.data
    if attrs is None:
        aug = data.aug
        return ReplayPlan(data.seed, data.views or 1, aug, fingerprint(aug), None, cfg.teacher.k)
    where = f"cache {cfg.cache.path}"
    cache_aug = AugConfig.from_dict(attrs["aug"])
    aug = data.aug if data.aug is not None else cache_aug
    fp = fingerprint(aug)
    if data.aug is not None and fp != attrs["fingerprint"]:
        raise CacheMismatchError(
            f"{where}: field fingerprint: the student's data.aug fingerprints to {fp[:12]}, "
            f"the cache was made with {attrs['fingerprint'][:12]} (aug {cache_aug.to_dict()})"
        )
    seed = int(attrs["seed"]) if data.seed is None else data.seed
    if seed != int(attrs["seed"]):
        raise CacheMismatchError(f"{where}: field seed: expected {seed} (this run), found {attrs['seed']} (in the cache)")
    views = int(attrs["views"])
    if data.views is not None and data.views != views:
        raise CacheMismatchError(
            f"{where}: field views: the run asks for data.views={data.views}, the cache holds {views} views "
            f"per sample (leave data.views unset; data.sampler=one_view reads one view per epoch)")
    return ReplayPlan(seed, views, aug, fp, int(attrs["epochs"]), int(attrs["k"]))


def open_checked_cache(cfg: TrainConfig, manifest: Manifest) -> tuple[CacheReader, ReplayPlan]:
    """Open ``cfg.cache.path``, resolve the plan from its attrs, and re-open it with ``expect=``.

    The guard compares the plan fingerprint, the train manifest sha256, k and num_classes, and,
    when a cached student names its teacher (``teacher.model``), that teacher's weights sha256
    (a file's, or timm pretrained weights' as teacher/weights.py defines it); it raises
    ``CacheMismatchError`` naming the first field that differs.
    """
    attrs = open_cache(cfg.cache.path).attrs
    plan = resolve_plan(cfg, attrs)
    expect = {
        "fingerprint": plan.fingerprint,
        "manifest_sha256": manifest.sha256,
        "num_classes": manifest.num_classes,
    }
    if cfg.teacher.k is not None and cfg.teacher.mode == "cached":
        expect["k"] = cfg.teacher.k
    if cfg.teacher.model is not None and cfg.teacher.mode == "cached":
        expect["checkpoint_sha256"] = checkpoint_sha256(cfg.teacher.model)
    reader = open_cache(cfg.cache.path, expect=expect)
    return reader, plan


class TrainData:
    """Per-epoch batches for one rank: replayed images + labels (+ cached teacher rows).

    Args:
        cfg: the train config (data/cache sections).
        manifest: the train split manifest.
        plan: from :func:`resolve_plan`.
        reader: the cache, or None (online teacher / no distillation).
        rank, world_size: DDP position; each rank reads its block of every epoch's rows.
        log: where notices go (rank 0 print).
        extra_size: also replay every row at this size (``batch["extra_image"]``), e.g. for an
            online teacher whose input size differs from the student's.
    """

    def __init__(self, cfg: TrainConfig, manifest: Manifest, plan: ReplayPlan, reader: CacheReader | None,
                 rank: int = 0, world_size: int = 1, log: Callable[[str], None] = print,
                 extra_size: int | None = None):
        if cfg.data.batch_size % world_size:
            raise ValueError(f"data.batch_size={cfg.data.batch_size} is not divisible by {world_size} ranks")
        self.cfg = cfg
        self.manifest = manifest
        self.plan = plan
        self.reader = reader
        self.rank = rank
        self.world_size = world_size
        self.batch_size = cfg.data.batch_size // world_size
        self.log = log
        self.extra_size = extra_size
        self.schedule = make_schedule(cfg, manifest, plan)
        self._cycle_logged = False
        self._reader_lock = threading.Lock()

    def plan_epoch(self, epoch: int) -> int:
        """The cache epoch student epoch ``epoch`` reads (cycles past the cached count)."""
        return self.schedule.source(epoch).cache_epoch

    def num_batches(self) -> int:
        """Batches per epoch, identical on every rank (capped by data.max_batches)."""
        return steps_per_epoch(self.cfg, self.schedule, self.batch_size, self.world_size)

    def loader(self, epoch: int) -> ReplayLoader:
        """The replay loader of student epoch ``epoch`` on this rank (no cache join)."""
        d = self.cfg.data
        lcfg = LoaderConfig(batch_size=self.batch_size, out_size=d.img_size, num_workers=d.num_workers,
                            interleave=d.interleave, extra_size=self.extra_size, max_batches=self.num_batches())
        order = self.schedule.order(epoch, self.rank, self.world_size, self.batch_size, lanes=lcfg.lanes,
                                    interleave=d.interleave, drop_last=d.drop_last)
        return ReplayLoader(self.manifest, self.plan.aug, self.plan.seed, order, lcfg)

    def batches(self, epoch: int) -> Iterator[dict]:
        """Batches of student epoch ``epoch`` for this rank (teacher rows joined when cached)."""
        src = self.schedule.source(epoch)
        if src.cycle and not self._cycle_logged:
            self.log(f"student epoch {epoch} reads {src.describe()}: the run is longer than the cache's "
                     f"{self.plan.cached_epochs} epochs x {self.plan.views} views, so cached rows are read again")
            self._cycle_logged = True
        stop = threading.Event()
        if self.reader is not None:
            self._check_ready(epoch)
            prefetch = threading.Thread(target=self._prefetch, args=(epoch, stop), daemon=True,
                                        name=f"cache-prefetch-{epoch}")
            prefetch.start()
        loader = self.loader(epoch)
        seen_skips = 0
        try:
            for batch in loader:
                batch = self._join(batch, src.cache_epoch) if self.reader is not None else dict(batch, dropped=0)
                # Corrupt samples the replay could not decode count as dropped rows too.
                batch["dropped"] += len(loader.skipped) - seen_skips
                seen_skips = len(loader.skipped)
                yield batch
        finally:
            stop.set()

    def _prefetch(self, epoch: int, stop: threading.Event) -> None:
        """Load the cached rows student epoch ``epoch`` reads while its loader starts up, so the
        per-batch join finds them in memory and never waits on storage. Items not done yet are
        left to the join (which waits for them with ``cache.wait``)."""
        for cache_epoch, s in self.schedule.needed_items(epoch):
            if stop.is_set():
                return
            first = np.array([self.manifest.shards[s].first_id])
            with self._reader_lock:
                try:
                    if self.reader.is_done(cache_epoch, s):
                        self.reader.lookup_rows(cache_epoch, first, np.zeros(1, np.int64))  # loads the shard
                except (CacheCorruptError, EpochNotInCache):
                    return  # the join reads the same item and raises it in the training thread

    def _check_ready(self, epoch: int) -> None:
        """Without ``cache.wait`` fail fast, naming the first (epoch, shard) that is not done."""
        if self.cfg.cache.wait:
            return
        for cache_epoch, shard in self.schedule.needed_items(epoch):
            if not self.reader.is_done(cache_epoch, shard):
                raise CacheNotReady(cache_epoch, shard, self.reader.path)

    def _lookup(self, plan_epoch: int, sample_ids: np.ndarray, views: np.ndarray):
        while True:
            try:
                with self._reader_lock:  # the prefetch thread loads shards meanwhile
                    return self.reader.lookup_rows(plan_epoch, sample_ids, views)
            except CacheNotReady as e:
                if not self.cfg.cache.wait:
                    raise
                self.reader.wait_done(e.epoch, e.shard, timeout=self.cfg.cache.timeout_s,
                                      poll=self.cfg.cache.poll_s, log=self.log)

    def _join(self, batch: dict, plan_epoch: int) -> dict:
        sids = batch["sample_id"].numpy()
        views = batch["view"].numpy()
        rows = self._lookup(plan_epoch, sids, views)
        logprobs, indices, valid = rows[:3]
        batch = dict(batch)
        batch["teacher_logprobs"] = torch.from_numpy(np.asarray(logprobs, dtype=np.float32))
        batch["teacher_indices"] = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        batch["teacher_log_tail"] = torch.from_numpy(rows.log_tail)
        if rows.tail_code is not None:
            batch["teacher_tail_code"] = torch.from_numpy(rows.tail_code)
        valid = np.asarray(valid, dtype=bool)
        dropped = int((~valid).sum())
        if dropped:
            keep = torch.from_numpy(valid)
            batch = {k: (v[keep] if torch.is_tensor(v) and v.shape[:1] == keep.shape else v) for k, v in batch.items()}
        batch["dropped"] = dropped
        return batch


def make_schedule(cfg: TrainConfig, manifest: Manifest, plan: ReplayPlan) -> Schedule:
    """The run's student-epoch schedule; without a cache, plan epochs never cycle."""
    cached = plan.cached_epochs or max(1, -(-cfg.run.epochs // plan.views))
    return Schedule(manifest.shards, plan.views, cached, plan.seed, sampler=cfg.data.sampler)


def steps_per_epoch(cfg: TrainConfig, schedule: Schedule, batch_per_rank: int, world_size: int) -> int:
    """Lock-step batches per rank of a student epoch (the schedule's count; with ``data.drop_last``
    full steps only, as DeiT's DataLoader(drop_last=True)); capped by ``data.max_batches``."""
    rows = schedule.rows(0) // world_size
    if cfg.data.drop_last and rows < batch_per_rank:
        raise ValueError(f"data.drop_last: a rank holds {rows} rows per epoch, fewer than one batch of "
                         f"{batch_per_rank} (data.batch_size={cfg.data.batch_size} over {world_size} ranks)")
    n = schedule.steps(0, batch_per_rank, world_size, drop_last=cfg.data.drop_last)
    return n if cfg.data.max_batches is None else min(n, cfg.data.max_batches)


def make_val_loader(cfg: TrainConfig, aug: AugConfig, rank: int = 0, world_size: int = 1) -> ReplayLoader:
    """Eval-style batches of the val shards (center crop as ``data.eval_resize``, the plan's normalization)."""
    val_aug = dataclasses.replace(aug, enabled=False, eval_resize=cfg.data.eval_resize)
    lcfg = LoaderConfig(batch_size=cfg.data.eval_batch_size, out_size=cfg.data.img_size,
                        num_workers=cfg.data.num_workers)
    return split_loader(load_manifest(cfg.data.val), val_aug, lcfg, rank=rank, world_size=world_size)


__all__ = ["ReplayPlan", "resolve_plan", "open_checked_cache", "TrainData", "make_schedule", "steps_per_epoch",
           "make_val_loader", "load_manifest"]
