"""Replay the augmentation plan over whole shards: per-shard items and a WebDataset loader.

:func:`replay_items` turns one shard's RawSamples into augmented, mixed items for one
(epoch, view). It walks :func:`pipeline.plan.mix_pairs`, so every pre-mix image is augmented
once and each mixed image is built from the sample and its planned partner in the same shard.
Pixels depend only on (seed, epoch, sample_id, view) and the plan config, never on the order,
batch size, worker count or process.

:func:`make_replay_loader` reads shards with a WebDataset pipeline::

    SimpleShardList(manifest order)
      -> split_by_rank (shard i -> rank i % world_size)
      -> shuffle_shards (explicit seed: shuffle_seed, epoch, rank)
      -> wds.split_by_worker (whole shards per DataLoader worker)
      -> wds.tarfile_to_samples (handler raises ShardError naming the shard)
      -> group_shards (whole shard; count and sid == first_id + position checked)
      -> replay (every view of the shard)
      -> shuffle_items (optional buffer, explicit seed per epoch/rank/worker)
      -> batch_items (per-worker batches)

inside a torch DataLoader; the main process re-batches to exactly ``batch_size`` so the number
of batches per rank follows from the manifest (:func:`batches_per_rank`) whatever
``num_workers`` is. Corrupt samples are never dropped silently: they end up in
``loader.skipped`` (and ``on_skip``) with shard, key, sample_id, epoch, view, reason.
"""
from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import webdataset as wds
from PIL import Image

from pipeline.plan import AugConfig, AugParams, apply, mix, mix_pairs, sample_params, soft_label
from pipeline.shards import (
    Manifest,
    RawSample,
    SampleError,
    ShardError,
    ShardInfo,
    decode_image,
    load_manifest,
    sample_from_fields,
)

SkipSink = list | Callable[[dict], None] | None


@dataclass
class ReplayItem:
    """One replayed training example (mixed image and its soft target)."""

    sample_id: int
    key: str
    label: int
    image: torch.Tensor    # [3, H, W] float32, normalized
    target: torch.Tensor   # [C] float32, sums to 1
    epoch: int
    view: int


def _report(skipped: SkipSink, record: dict) -> None:
    if skipped is None:
        raise SampleError(f"shard {record['shard']} key {record['key']} epoch {record['epoch']} "
                          f"view {record['view']}: {record['reason']} (pass skipped= to record and go on)",
                          shard=record["shard"], key=record["key"])
    if callable(skipped):
        skipped(record)
    else:
        skipped.append(record)


def replay_items(
    samples: Sequence[RawSample],
    shard: ShardInfo,
    cfg: AugConfig,
    seed: int,
    epoch: int,
    view: int,
    out_size: int,
    num_classes: int,
    skipped: SkipSink = None,
    decoded: dict | None = None,
    pairs: Sequence[tuple[int, int]] | None = None,
    premixed: Callable[[int], tuple[AugParams, torch.Tensor] | SampleError] | None = None,
) -> Iterator[ReplayItem]:
    """Augmented, mixed items of one shard for one (epoch, view), in mix-pair order.

    Args:
        samples: the whole shard, in shard order (as from ``read_shard``).
        shard: its manifest entry (pairing is keyed on index/first_id/count).
        cfg, seed, epoch, view, out_size: the plan inputs.
        num_classes: length of ``target``.
        skipped: list to append skip records to, or a callback taking one record dict
            ``{shard, key, sample_id, epoch, view, reason}``; None raises SampleError instead.
            A corrupt sample's own item, and any item that mixes it in, are skipped.
        decoded: optional dict used as a decode cache (sample_id -> PIL image or SampleError),
            e.g. shared across the views of one shard so each image is decoded once.
        pairs: a contiguous slice of ``mix_pairs(seed, epoch, view, shard)`` to replay
            (default: all of them), so one view can be spread over several processes;
            pixels do not depend on the slicing.
        premixed: optional source of pre-mix images made elsewhere, e.g. by decode workers
            (``pipeline.premix``): ``sid -> (params, apply's float image)`` or the sample's
            SampleError; then nothing is decoded or augmented here, only mixed.

    Yields:
        ReplayItem per usable sample; each pre-mix image is augmented exactly once.
    """
    if len(samples) != shard.count:
        raise ShardError(f"shard {shard.name}: {len(samples)} samples given, manifest says {shard.count}")
    by_id = {s.sample_id: s for s in samples}
    decoded = {} if decoded is None else decoded
    pairs = mix_pairs(seed, epoch, view, shard) if pairs is None else pairs
    uses = Counter(i for pair in pairs for i in pair)   # drop tensors once no pair needs them
    augmented: dict[int, torch.Tensor] = {}
    params: dict[int, object] = {}

    made: dict[int, tuple | SampleError] = {}  # this view's pre-mix images from ``premixed``

    def image_of(sid: int) -> Image.Image | tuple | SampleError:
        if premixed is not None:
            if sid not in made:
                made[sid] = premixed(sid)
            return made[sid]
        if sid not in decoded:
            try:
                decoded[sid] = decode_image(by_id[sid])
            except SampleError as exn:
                decoded[sid] = exn
        return decoded[sid]

    def augmented_of(sid: int) -> torch.Tensor:
        if sid not in augmented:
            if premixed is not None:
                augmented[sid] = image_of(sid)[1]
            else:
                augmented[sid] = apply(image_of(sid), params_of(sid), out_size, cfg)
        return augmented[sid]

    def params_of(sid: int):
        if sid not in params:
            if premixed is not None:
                params[sid] = image_of(sid)[0]
            else:
                params[sid] = sample_params(cfg, seed, epoch, sid, view, image_of(sid).size)
        return params[sid]

    def record(sid: int, reason: str) -> dict:
        return {"shard": shard.name, "key": by_id[sid].key, "sample_id": sid, "epoch": epoch,
                "view": view, "reason": reason}

    for a, b in pairs:
        img_a = image_of(a)
        if isinstance(img_a, SampleError):
            _report(skipped, record(a, str(img_a)))
        else:
            pa = params_of(a)
            needs_partner = pa.mix_mode != "none"
            img_b = image_of(b) if needs_partner else None
            if isinstance(img_b, SampleError):
                _report(skipped, record(a, f"mix partner {by_id[b].key} (sample_id {b}) is corrupt: {img_b}"))
            else:
                xa = augmented_of(a)
                if needs_partner:
                    image = mix(xa, augmented_of(b), pa)
                    target = soft_label(pa, by_id[a].label, by_id[b].label, num_classes)
                else:
                    image = xa if uses[a] == 1 else xa.clone()  # never hand out a tensor still cached
                    target = soft_label(pa, by_id[a].label, by_id[a].label, num_classes)
                yield ReplayItem(a, by_id[a].key, by_id[a].label, image, target, epoch, view)
        for sid in (a, b):
            uses[sid] -= 1
            if uses[sid] == 0:
                augmented.pop(sid, None)
                params.pop(sid, None)
                made.pop(sid, None)


# --------------------------------------------------------------------------- loader stages

def _raise_shard_error(exn: Exception) -> bool:
    """WebDataset handler: never skip; re-raise as ShardError naming the shard url."""
    if isinstance(exn, ShardError):
        exn.args = exn.args[:1]  # drop the (stream, url) webdataset appended on the way out
        raise exn
    # webdataset appends (stream, url) to exn.args, or "@ <stream name='url'>" to the message
    first = str(exn.args[0]) if exn.args else ""
    strings = [a for a in exn.args[1:] if isinstance(a, str)]
    named = re.search(r"name='([^']+)'", first)
    url = strings[-1] if strings else named.group(1) if named else "?"
    raise ShardError(f"shard {url.rsplit('/', 1)[-1]}: broken tar ({url}): {type(exn).__name__}: {first}") from exn


def split_by_rank(rank: int, world_size: int):
    """Stage: keep shard i (manifest order) on rank ``i % world_size``."""
    def stage(src):
        for i, sample in enumerate(src):
            if i % world_size == rank:
                yield sample
    return stage


def shuffle_shards(enabled: bool, seed: tuple):
    """Stage: shuffle this rank's shard list with ``random.Random(str(seed))`` (same in every worker)."""
    def stage(src):
        urls = list(src)
        if enabled:
            random.Random(str(seed)).shuffle(urls)
        yield from urls
    return stage


def group_shards(manifest: Manifest):
    """Stage: consecutive samples of one ``__url__`` -> (ShardInfo, [RawSample]) for the whole shard."""
    by_name = {s.name: s for s in manifest.shards}

    def finish(url, fields_list):
        name = url.replace("\\", "/").rsplit("/", 1)[-1]
        if name not in by_name:
            raise ShardError(f"shard {url}: not in manifest {manifest.path}")
        shard = by_name[name]
        raws = [sample_from_fields(f, f["__key__"], shard, i) for i, f in enumerate(fields_list)]
        if len(raws) != shard.count:
            raise ShardError(f"shard {shard.name}: {len(raws)} samples read, manifest says {shard.count} "
                             f"(truncated tar?) ({url})")
        return shard, raws

    def stage(src):
        url, group = None, []
        for sample in src:
            if sample["__url__"] != url:
                if group:
                    yield finish(url, group)
                url, group = sample["__url__"], []
            group.append(sample)
        if group:
            yield finish(url, group)
    return stage


def replay_stage(cfg: AugConfig, seed: int, epoch: int, views: Sequence[int], out_size: int,
                 num_classes: int, cache_decoded: bool):
    """Stage: (shard, samples) -> ReplayItem for every view, plus ("skip", record) markers."""
    def stage(src):
        for shard, raws in src:
            decoded = {} if cache_decoded else None
            for view in views:
                skipped: list[dict] = []
                for item in replay_items(raws, shard, cfg, seed, epoch, view, out_size, num_classes,
                                         skipped=skipped, decoded=decoded):
                    yield item
                for rec in skipped:
                    yield rec
    return stage


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.id


def shuffle_items(bufsize: int, seed: tuple):
    """Stage: shuffle buffer seeded by (``seed``, worker id); skip records pass straight through."""
    def stage(src):
        if bufsize <= 1:
            yield from src
            return
        rng = random.Random(str((*seed, _worker_id())))
        buf: list = []
        for x in src:
            if isinstance(x, dict):
                yield x
                continue
            if len(buf) < bufsize:
                buf.append(x)
                continue
            j = rng.randrange(len(buf))
            buf[j], x = x, buf[j]
            yield x
        rng.shuffle(buf)
        yield from buf
    return stage


def collate(items: Sequence[ReplayItem]) -> dict:
    """ReplayItems -> batch dict of tensors."""
    return {
        "image": torch.stack([it.image for it in items]),
        "target": torch.stack([it.target for it in items]),
        "label": torch.tensor([it.label for it in items], dtype=torch.int64),
        "sample_id": torch.tensor([it.sample_id for it in items], dtype=torch.int64),
        "epoch": torch.tensor([it.epoch for it in items], dtype=torch.int64),
        "view": torch.tensor([it.view for it in items], dtype=torch.int64),
    }


def batch_items(batch_size: int):
    """Stage: items -> ("batch", dict) of up to ``batch_size``; skip records -> ("skip", record)."""
    def stage(src):
        items: list[ReplayItem] = []
        for x in src:
            if isinstance(x, dict):
                yield ("skip", x)
                continue
            items.append(x)
            if len(items) == batch_size:
                yield ("batch", collate(items))
                items = []
        if items:
            yield ("batch", collate(items))
    return stage


def _cat(batches: list[dict]) -> dict:
    return batches[0] if len(batches) == 1 else {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def _init_worker(_worker_id: int) -> None:
    torch.set_num_threads(1)  # workers decode/augment in parallel; no thread oversubscription


# --------------------------------------------------------------------------- sizes for DDP

def rank_num_samples(manifest: Manifest, rank: int, world_size: int, views: int = 1) -> int:
    """Items rank ``rank`` replays per epoch (shard i -> rank i % world_size), before any skips."""
    return views * sum(s.count for s in manifest.shards if s.index % world_size == rank)


def batches_per_rank(manifest: Manifest, batch_size: int, world_size: int = 1, views: int = 1,
                     drop_last: bool = False) -> list[int]:
    """Number of batches each rank yields per epoch (assuming no corrupt samples)."""
    rnd = math.floor if drop_last else math.ceil
    return [rnd(rank_num_samples(manifest, r, world_size, views) / batch_size) for r in range(world_size)]


def steps_per_epoch(manifest: Manifest, batch_size: int, world_size: int = 1, views: int = 1,
                    drop_last: bool = False) -> int:
    """Batches every rank can run in lockstep: min over ranks of :func:`batches_per_rank`.

    Pass it as ``max_batches`` so DDP ranks take the same number of steps. If shards hold
    corrupt samples (see ``manifest.skipped`` / ``loader.skipped``), leave a margin.
    """
    return min(batches_per_rank(manifest, batch_size, world_size, views, drop_last))


# --------------------------------------------------------------------------- loader

class ReplayLoader:
    """Iterable of replayed batches for one (epoch, rank); see :func:`make_replay_loader`.

    Attributes:
        manifest: the split's Manifest.
        skipped: skip records of the last/current iteration (shard, key, sample_id, epoch, view, reason).
    """

    def __init__(self, manifest: Manifest, cfg: AugConfig, seed: int, epoch: int, views: Sequence[int],
                 out_size: int, batch_size: int, num_workers: int, shuffle: bool, shuffle_seed: int,
                 rank: int, world_size: int, drop_last: bool, max_batches: int | None,
                 shuffle_buffer: int, on_skip: Callable[[dict], None] | None, cache_decoded: bool):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.manifest, self.cfg, self.seed, self.epoch = manifest, cfg, seed, epoch
        self.views, self.out_size, self.batch_size = list(views), out_size, batch_size
        self.num_workers, self.shuffle, self.shuffle_seed = num_workers, shuffle, shuffle_seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.max_batches, self.shuffle_buffer = max_batches, shuffle_buffer
        self.on_skip, self.cache_decoded = on_skip, cache_decoded
        self.skipped: list[dict] = []

    def pipeline(self) -> wds.DataPipeline:
        """The per-worker WebDataset pipeline (whole shards per rank and worker)."""
        m = self.manifest
        return wds.DataPipeline(
            wds.SimpleShardList(m.urls(), seed=None),  # manifest order; rank split needs it stable
            split_by_rank(self.rank, self.world_size),
            shuffle_shards(self.shuffle, ("shards", self.shuffle_seed, self.epoch, self.rank)),
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=_raise_shard_error),
            group_shards(m),
            replay_stage(self.cfg, self.seed, self.epoch, self.views, self.out_size, m.num_classes,
                         self.cache_decoded),
            shuffle_items(self.shuffle_buffer if self.shuffle else 0,
                          ("items", self.shuffle_seed, self.epoch, self.rank)),
            batch_items(self.batch_size),
        )

    def __len__(self) -> int:
        n = batches_per_rank(self.manifest, self.batch_size, self.world_size, len(self.views),
                             self.drop_last)[self.rank]
        return n if self.max_batches is None else min(n, self.max_batches)

    def __iter__(self) -> Iterator[dict]:
        self.skipped = []
        loader = torch.utils.data.DataLoader(
            self.pipeline(), batch_size=None, num_workers=self.num_workers,
            worker_init_fn=_init_worker if self.num_workers > 0 else None,
            prefetch_factor=2 if self.num_workers > 0 else None)
        limit = math.inf if self.max_batches is None else self.max_batches
        emitted, pending, n = 0, [], 0
        it = iter(loader)
        try:
            for kind, payload in it:
                if kind == "skip":
                    self.skipped.append(payload)
                    if self.on_skip is not None:
                        self.on_skip(payload)
                    continue
                pending.append(payload)
                n += len(payload["label"])
                while n >= self.batch_size and emitted < limit:
                    cat = _cat(pending)
                    yield {k: v[: self.batch_size] for k, v in cat.items()}
                    emitted += 1
                    n -= self.batch_size
                    pending = [{k: v[self.batch_size:] for k, v in cat.items()}] if n else []
                if emitted >= limit:
                    return
            if n and not self.drop_last and emitted < limit:
                yield _cat(pending)
        finally:
            # Stop workers now (max_batches cut the epoch short, or an error): left to the
            # garbage collector, a DataLoader iterator that saw an error takes ~5 s to shut down.
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


def make_replay_loader(
    split_dir: str,
    cfg: AugConfig,
    seed: int,
    epoch: int,
    views: int | Sequence[int] = 1,
    out_size: int = 224,
    batch_size: int = 64,
    num_workers: int = 0,
    shuffle: bool = True,
    shuffle_seed: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    max_batches: int | None = None,
    shuffle_buffer: int = 256,
    on_skip: Callable[[dict], None] | None = None,
    cache_decoded: bool = True,
    manifest: Manifest | None = None,
) -> ReplayLoader:
    """Batches of replayed (epoch, sample_id, view) examples from a shard split folder.

    Args:
        split_dir: folder with ``manifest.json`` and the shards.
        cfg, seed, epoch, out_size: the plan inputs; pixels depend only on these and ids.
        views: number of repeat views (0..views-1) or an explicit list of view indices;
            every view of a shard is replayed while the shard is in memory.
        batch_size: exact batch size (the last batch may be smaller unless ``drop_last``).
        num_workers: DataLoader worker processes; whole shards go to each (rank, worker).
        shuffle: shuffle shard order (per rank) and items (buffer of ``shuffle_buffer``);
            seeds are explicit: (``shuffle_seed`` or ``seed``, epoch, rank[, worker]).
        rank, world_size: shard i goes to rank ``i % world_size`` (see :func:`batches_per_rank`).
        max_batches: stop after this many batches (DDP: ``steps_per_epoch(...)`` on every rank).
        on_skip: callback per skipped item record; records also collect in ``loader.skipped``.
        cache_decoded: keep a shard's decoded images while replaying its views (decode once;
            memory ~ one decoded shard per worker).
        manifest: an already loaded manifest of ``split_dir`` (else it is loaded).

    Returns:
        ReplayLoader yielding ``{"image" [B,3,H,W], "target" [B,C], "label" [B] int64,
        "sample_id" [B], "epoch" [B], "view" [B]}``.
    """
    m = manifest if manifest is not None else load_manifest(split_dir)
    view_list = list(range(views)) if isinstance(views, int) else [int(v) for v in views]
    return ReplayLoader(m, cfg, seed, epoch, view_list, out_size, batch_size, num_workers, shuffle,
                        seed if shuffle_seed is None else shuffle_seed, rank, world_size, drop_last,
                        max_batches, shuffle_buffer, on_skip, cache_decoded)

