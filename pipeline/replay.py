"""Replay the augmentation plan over one shard: the per-shard step both sides share.

:func:`replay_items` turns one shard's RawSamples into augmented, mixed items for one
(epoch, view), named with the output sizes by a :class:`ReplayRequest`, and an explicit list of
mix pairs (from ``pipeline.schedule``: ``shard_pairs`` for the caching job, ``Unit.pairs`` for a
loader); :func:`replay_row` gives one such row alone. Every pre-mix image is augmented once and
each mixed image is built from the sample and its planned partner in the same shard. Pixels
depend only on (seed, epoch, sample_id, view), the pairs and the plan config, never on the
order, batch size, worker count or process. Corrupt samples are never dropped silently: they
become skip records (shard, key, sample_id, epoch, view, reason) or a SampleError.

The loader that reads shards and batches these items is ``pipeline.loader``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from pipeline.plan import AugConfig, AugParams, apply, mix, sample_params, soft_label
from pipeline.decode import decode_image
from pipeline.errors import SampleError, ShardError
from pipeline.manifest import ShardInfo
from pipeline.shards import RawSample

SkipSink = list | Callable[[dict], None] | None


@dataclass(frozen=True)
class ReplayRequest:
    """The plan inputs of one replay: which (epoch, view) of the plan, at which sizes.

    Values only; the shard's samples, the pairs, the skip sink and the caches are passed beside it.

    Attributes:
        cfg: the augmentation plan config.
        seed, epoch, view: the plan's keys (non-negative integers).
        out_size: image side of ``ReplayItem.image``.
        num_classes: length of ``ReplayItem.target``.
        extra_size: also render every item at this size into ``ReplayItem.extra`` (the same
            plan, boxes in normalized coordinates, at another resolution); None: no extra image.
    """

    cfg: AugConfig
    seed: int
    epoch: int
    view: int
    out_size: int
    num_classes: int
    extra_size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.cfg, AugConfig):
            raise TypeError(f"ReplayRequest.cfg: expected an AugConfig, found {type(self.cfg).__name__}")
        for name in ("seed", "epoch", "view"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"ReplayRequest.{name}: expected a non-negative integer, found {value!r}")
        for name in ("out_size", "num_classes", "extra_size"):
            value = getattr(self, name)
            if not (value is None and name == "extra_size") and (not _is_int(value) or value < 1):
                raise ValueError(f"ReplayRequest.{name}: expected a positive integer, found {value!r}")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


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


def _skip_record(request: ReplayRequest, shard: ShardInfo, key: str, sid: int, reason: str) -> dict:
    """Why row ``sid`` is not replayed: {shard, key, sample_id, epoch, view, reason}."""
    return {"shard": shard.name, "key": key, "sample_id": sid, "epoch": request.epoch, "view": request.view,
            "reason": reason}


def _partner_corrupt(key: str, sid: int, error: SampleError) -> str:
    return f"mix partner {key} (sample_id {sid}) is corrupt: {error}"


def _decode(request: ReplayRequest, by_id: dict, decoded: dict, sid: int):
    """The decoded image of ``sid`` (or its SampleError), through the ``decoded`` cache."""
    if sid not in decoded:
        try:
            decoded[sid] = decode_image(by_id[sid], request.cfg.exif_transpose, request.cfg.max_pixels)
        except SampleError as exn:
            decoded[sid] = exn
    return decoded[sid]


class _Augmented:
    """Pre-mix images made here: decoded through the shared ``decoded`` cache, then planned
    and augmented once per sample and size (until :meth:`forget`)."""

    def __init__(self, request: ReplayRequest, by_id: dict[int, RawSample], decoded: dict):
        self.request, self.by_id, self.decoded = request, by_id, decoded
        self._params: dict[int, AugParams] = {}
        self._tensors: dict[tuple[int, int], torch.Tensor] = {}

    def source(self, sid: int) -> Image.Image | SampleError:
        return _decode(self.request, self.by_id, self.decoded, sid)

    def params(self, sid: int) -> AugParams:
        if sid not in self._params:
            r = self.request
            self._params[sid] = sample_params(r.cfg, r.seed, r.epoch, sid, r.view, self.source(sid).size)
        return self._params[sid]

    def augmented(self, sid: int, size: int) -> torch.Tensor:
        if (sid, size) not in self._tensors:
            self._tensors[sid, size] = apply(self.source(sid), self.params(sid), size, self.request.cfg)
        return self._tensors[sid, size]

    def forget(self, sid: int) -> None:
        self._tensors.pop((sid, self.request.out_size), None)
        self._tensors.pop((sid, self.request.extra_size), None)
        self._params.pop(sid, None)


class _Premixed:
    """Pre-mix images made elsewhere (``pipeline.premix``): ``premixed(sid)`` gives
    (params, apply's float image at out_size) or the sample's SampleError, asked once per sample."""

    def __init__(self, premixed: Callable[[int], tuple[AugParams, torch.Tensor] | SampleError]):
        self.premixed = premixed
        self._made: dict[int, tuple[AugParams, torch.Tensor] | SampleError] = {}

    def source(self, sid: int) -> tuple[AugParams, torch.Tensor] | SampleError:
        if sid not in self._made:
            self._made[sid] = self.premixed(sid)
        return self._made[sid]

    def params(self, sid: int) -> AugParams:
        return self.source(sid)[0]

    def augmented(self, sid: int, size: int) -> torch.Tensor:
        return self.source(sid)[1]

    def forget(self, sid: int) -> None:
        self._made.pop(sid, None)


def _mixed(images: _Augmented | _Premixed, a: int, b: int, pa: AugParams, size: int, last_use: bool
           ) -> torch.Tensor:
    """Row ``a``'s image at ``size`` from the cached pre-mix images (``last_use``: no later pair
    needs ``a``'s tensor, so an unmixed row may hand it out)."""
    if pa.mix_mode != "none":
        return mix(images.augmented(a, size), images.augmented(b, size), pa)
    xa = images.augmented(a, size)
    return xa if last_use else xa.clone()  # never hand out a tensor still cached


def _replay_pair(request: ReplayRequest, shard: ShardInfo, by_id: dict[int, RawSample],
                 images: _Augmented | _Premixed, a: int, b: int, last_use: bool) -> ReplayItem | dict:
    """Row ``a`` mixed with its partner ``b``, or the skip record when either is corrupt."""
    img_a = images.source(a)
    if isinstance(img_a, SampleError):
        return _skip_record(request, shard, by_id[a].key, a, str(img_a))
    pa = images.params(a)
    needs_partner = pa.mix_mode != "none"
    img_b = images.source(b) if needs_partner else None
    if isinstance(img_b, SampleError):
        return _skip_record(request, shard, by_id[a].key, a, _partner_corrupt(by_id[b].key, b, img_b))
    label_b = by_id[b].label if needs_partner else by_id[a].label
    target = soft_label(pa, by_id[a].label, label_b, request.num_classes)
    size, extra_size = request.out_size, request.extra_size
    extra = _mixed(images, a, b, pa, extra_size, last_use) if extra_size is not None else None
    return ReplayItem(a, by_id[a].key, by_id[a].label, _mixed(images, a, b, pa, size, last_use), target,
                      request.epoch, request.view, extra)


def replay_items(
    request: ReplayRequest,
    samples: Sequence[RawSample],
    shard: ShardInfo,
    pairs: Sequence[tuple[int, int]],
    *,
    skipped: SkipSink = None,
    decoded: dict | None = None,
    premixed: Callable[[int], tuple[AugParams, torch.Tensor] | SampleError] | None = None,
) -> Iterator[ReplayItem]:
    """Augmented, mixed items of one shard for one (epoch, view), in mix-pair order.

    Args:
        request: the plan inputs (:class:`ReplayRequest`).
        samples: the whole shard, in shard order (as from ``read_shard``).
        shard: its manifest entry (pairing is keyed on index/first_id/count).
        pairs: the (sample_id, partner_id) pairs to replay, e.g. ``schedule.shard_pairs`` (every
            row of the shard) or a slice of them; pixels do not depend on the slicing.
        skipped: list to append skip records to, or a callback taking one record dict
            ``{shard, key, sample_id, epoch, view, reason}``; None raises SampleError instead.
            A corrupt sample's own item, and any item that mixes it in, are skipped.
        decoded: optional dict used as a decode cache (sample_id -> PIL image or SampleError),
            e.g. shared across the views of one shard so each image is decoded once.
        premixed: optional source of pre-mix images made elsewhere, e.g. by decode workers
            (``pipeline.premix``): ``sid -> (params, apply's float image at out_size)`` or the
            sample's SampleError; then nothing is decoded or augmented here, only mixed
            (not with ``request.extra_size``).

    Yields:
        ReplayItem per usable sample; each pre-mix image is augmented exactly once.
    """
    if len(samples) != shard.count:
        raise ShardError(f"shard {shard.name}: {len(samples)} samples given, manifest says {shard.count}")
    if premixed is not None and request.extra_size is not None:
        raise ValueError("replay_items: premixed images come at out_size only; extra_size needs a replay here")
    by_id = {s.sample_id: s for s in samples}
    if premixed is not None:
        images = _Premixed(premixed)
    else:
        images = _Augmented(request, by_id, {} if decoded is None else decoded)
    uses = Counter(i for pair in pairs for i in pair)   # drop tensors once no pair needs them
    for a, b in pairs:
        item = _replay_pair(request, shard, by_id, images, a, b, last_use=uses[a] == 1)
        if isinstance(item, dict):
            _report(skipped, item)
        else:
            yield item
        for sid in (a, b):
            uses[sid] -= 1
            if uses[sid] == 0:
                images.forget(sid)


def replay_row(request: ReplayRequest, by_id: dict[int, RawSample], shard: ShardInfo, sample_id: int,
               partner: int, decoded: dict) -> ReplayItem | dict:
    """One row, ``sample_id`` mixed with its planned ``partner``: the pixels and target
    :func:`replay_items` gives that row (the same code), without its per-shard caches.

    Args:
        request: the plan inputs (:class:`ReplayRequest`).
        by_id: the shard's samples by sample_id.
        shard: its manifest entry.
        decoded: decode cache (sample_id -> PIL image or SampleError), e.g. an LRU per worker.

    Returns:
        The ReplayItem, or the skip record (shard, key, sample_id, epoch, view, reason) when the
        sample or its partner cannot be decoded.
    """
    # a fresh _Augmented: the same plan calls as replay_items, with nothing cached past this row
    return _replay_pair(request, shard, by_id, _Augmented(request, by_id, decoded), sample_id, partner,
                        last_use=True)


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
