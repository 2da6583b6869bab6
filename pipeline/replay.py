"""Replay the augmentation plan over one shard: the per-shard step both sides share.

:func:`replay_items` turns one shard's RawSamples into augmented, mixed items for one
(epoch, view) and an explicit list of mix pairs (from ``pipeline.schedule``: ``shard_pairs`` for
the caching job, ``Unit.pairs`` for a loader). Every pre-mix image is augmented once and each
mixed image is built from the sample and its planned partner in the same shard. Pixels depend
only on (seed, epoch, sample_id, view), the pairs and the plan config, never on the order,
batch size, worker count or process. Corrupt samples are never dropped silently: they become
skip records (shard, key, sample_id, epoch, view, reason) or a SampleError.

The loader that reads shards and batches these items is ``pipeline.loader``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image

from pipeline.plan import AugConfig, AugParams, apply, mix, sample_params, soft_label
from pipeline.decode import decode_image
from pipeline.errors import SampleError, ShardError
from pipeline.manifest import ShardInfo
from pipeline.shards import RawSample

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
    extra: torch.Tensor | None = None   # the same replay at ``extra_size`` (e.g. an online teacher's)


def _report(skipped: SkipSink, record: dict) -> None:
    if skipped is None:
        raise SampleError(f"shard {record['shard']} key {record['key']} epoch {record['epoch']} "
                          f"view {record['view']}: {record['reason']} (pass skipped= to record and go on)",
                          shard=record["shard"], key=record["key"])
    if callable(skipped):
        skipped(record)
    else:
        skipped.append(record)


def _decode(by_id: dict, sid: int, cfg: AugConfig, decoded: dict):
    """The decoded image of ``sid`` (or its SampleError), through the ``decoded`` cache."""
    if sid not in decoded:
        try:
            decoded[sid] = decode_image(by_id[sid], cfg.exif_transpose, cfg.max_pixels)
        except SampleError as exn:
            decoded[sid] = exn
    return decoded[sid]


def replay_items(
    samples: Sequence[RawSample],
    shard: ShardInfo,
    cfg: AugConfig,
    seed: int,
    epoch: int,
    view: int,
    out_size: int,
    num_classes: int,
    pairs: Sequence[tuple[int, int]],
    skipped: SkipSink = None,
    decoded: dict | None = None,
    extra_size: int | None = None,
    premixed: Callable[[int], tuple[AugParams, torch.Tensor] | SampleError] | None = None,
) -> Iterator[ReplayItem]:
    """Augmented, mixed items of one shard for one (epoch, view), in mix-pair order.

    Args:
        samples: the whole shard, in shard order (as from ``read_shard``).
        shard: its manifest entry (pairing is keyed on index/first_id/count).
        cfg, seed, epoch, view, out_size: the plan inputs.
        num_classes: length of ``target``.
        pairs: the (sample_id, partner_id) pairs to replay, e.g. ``schedule.shard_pairs`` (every
            row of the shard) or a slice of them; pixels do not depend on the slicing.
        skipped: list to append skip records to, or a callback taking one record dict
            ``{shard, key, sample_id, epoch, view, reason}``; None raises SampleError instead.
            A corrupt sample's own item, and any item that mixes it in, are skipped.
        decoded: optional dict used as a decode cache (sample_id -> PIL image or SampleError),
            e.g. shared across the views of one shard so each image is decoded once.
        extra_size: also render every item at this size into ``ReplayItem.extra`` (the same
            plan, boxes in normalized coordinates, at another resolution).
        premixed: optional source of pre-mix images made elsewhere, e.g. by decode workers
            (``pipeline.premix``): ``sid -> (params, apply's float image at out_size)`` or the
            sample's SampleError; then nothing is decoded or augmented here, only mixed
            (not with ``extra_size``).

    Yields:
        ReplayItem per usable sample; each pre-mix image is augmented exactly once.
    """
    if len(samples) != shard.count:
        raise ShardError(f"shard {shard.name}: {len(samples)} samples given, manifest says {shard.count}")
    if premixed is not None and extra_size is not None:
        raise ValueError("replay_items: premixed images come at out_size only; extra_size needs a replay here")
    by_id = {s.sample_id: s for s in samples}
    decoded = {} if decoded is None else decoded
    uses = Counter(i for pair in pairs for i in pair)   # drop tensors once no pair needs them
    augmented: dict[tuple[int, int], torch.Tensor] = {}
    params: dict[int, object] = {}

    made: dict[int, tuple | SampleError] = {}  # this view's pre-mix images from ``premixed``

    def image_of(sid: int) -> Image.Image | tuple | SampleError:
        if premixed is not None:
            if sid not in made:
                made[sid] = premixed(sid)
            return made[sid]
        return _decode(by_id, sid, cfg, decoded)

    def augmented_of(sid: int, size: int = out_size) -> torch.Tensor:
        if (sid, size) not in augmented:
            if premixed is not None:
                augmented[sid, size] = image_of(sid)[1]
            else:
                augmented[sid, size] = apply(image_of(sid), params_of(sid), size, cfg)
        return augmented[sid, size]

    def mixed(a: int, b: int, pa, size: int) -> torch.Tensor:
        if pa.mix_mode != "none":
            return mix(augmented_of(a, size), augmented_of(b, size), pa)
        xa = augmented_of(a, size)
        return xa if uses[a] == 1 else xa.clone()  # never hand out a tensor still cached

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
                label_b = by_id[b].label if needs_partner else by_id[a].label
                target = soft_label(pa, by_id[a].label, label_b, num_classes)
                extra = mixed(a, b, pa, extra_size) if extra_size is not None else None
                yield ReplayItem(a, by_id[a].key, by_id[a].label, mixed(a, b, pa, out_size), target,
                                 epoch, view, extra)
        for sid in (a, b):
            uses[sid] -= 1
            if uses[sid] == 0:
                augmented.pop((sid, out_size), None)
                augmented.pop((sid, extra_size), None)
                params.pop(sid, None)
                made.pop(sid, None)


def replay_row(by_id: dict[int, RawSample], shard: ShardInfo, cfg: AugConfig, seed: int, epoch: int, view: int,
               sample_id: int, partner: int, out_size: int, num_classes: int, decoded: dict,
               extra_size: int | None = None) -> ReplayItem | dict:
    """One row, ``sample_id`` mixed with its planned ``partner``: the pixels and target
    :func:`replay_items` gives that row (the same plan calls), without its per-shard caches.

    Args:
        by_id: the shard's samples by sample_id.
        decoded: decode cache (sample_id -> PIL image or SampleError), e.g. an LRU per worker.

    Returns:
        The ReplayItem, or the skip record (shard, key, sample_id, epoch, view, reason) when the
        sample or its partner cannot be decoded.
    """
    def image_of(sid: int):
        return _decode(by_id, sid, cfg, decoded)

    a, b = by_id[sample_id], by_id[partner]
    record = {"shard": shard.name, "key": a.key, "sample_id": sample_id, "epoch": epoch, "view": view}
    img_a = image_of(sample_id)
    if isinstance(img_a, SampleError):
        return dict(record, reason=str(img_a))
    pa = sample_params(cfg, seed, epoch, sample_id, view, img_a.size)
    if pa.mix_mode == "none":
        render = lambda size: apply(img_a, pa, size, cfg)  # noqa: E731
        label_b = a.label
    else:
        img_b = image_of(partner)
        if isinstance(img_b, SampleError):
            return dict(record, reason=f"mix partner {b.key} (sample_id {partner}) is corrupt: {img_b}")
        pb = sample_params(cfg, seed, epoch, partner, view, img_b.size)
        render = lambda size: mix(apply(img_a, pa, size, cfg), apply(img_b, pb, size, cfg), pa)  # noqa: E731
        label_b = b.label
    target = soft_label(pa, a.label, label_b, num_classes)
    extra = render(extra_size) if extra_size is not None else None
    return ReplayItem(sample_id, a.key, a.label, render(out_size), target, epoch, view, extra)


def collate(items: Sequence[ReplayItem]) -> dict:
    """ReplayItems -> batch dict of tensors (``extra_image`` only when the items carry one)."""
    batch = {
        "image": torch.stack([it.image for it in items]),
        "target": torch.stack([it.target for it in items]),
        "label": torch.tensor([it.label for it in items], dtype=torch.int64),
        "sample_id": torch.tensor([it.sample_id for it in items], dtype=torch.int64),
        "epoch": torch.tensor([it.epoch for it in items], dtype=torch.int64),
        "view": torch.tensor([it.view for it in items], dtype=torch.int64),
    }
    if items and items[0].extra is not None:
        batch["extra_image"] = torch.stack([it.extra for it in items])
    return batch
