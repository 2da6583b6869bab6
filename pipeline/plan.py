"""The replayable augmentation plan: DeiT's training transform as two pure functions.

``sample_params(cfg, seed, epoch, sample_id, view, src_size)`` draws every random
decision of DeiT's transform (timm ``create_transform(224, is_training=True,
auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic', re_prob=0.25,
re_mode='pixel')`` followed by per-sample timm ``Mixup(0.8, cutmix 1.0, switch 0.5)``)
from a Philox generator keyed on exactly those integers; ``apply(image, params,
out_size, cfg)`` performs them.  No global RNG is touched, so the same
(seed, epoch, sample_id, view) gives bit-identical pixels in any process, worker,
batch or shard order — the teacher job and the student loader replay the same image.
``apply`` is ``finish(augment(...))``: ``augment`` is the uint8 PIL stage (crop, flip,
RandAugment) that decode workers run, ``finish`` the float stage (normalize, erase) that
can run where the images are batched, so workers and the object store carry uint8.

Geometry is resolution independent: the crop box is stored in normalized *source*
coordinates and the erase / CutMix boxes in normalized *output* coordinates, so a
student at 160 px sees the content the teacher saw at 224 px.  Pixel-sized magnitudes
(RandAugment translate = fraction of the side, erase box, CutMix box) therefore scale
with ``out_size``; boxes are rounded to whole pixels at the size they are applied.

Mixing needs a partner without knowing the batch: :func:`mix_pairs` pairs the samples
of one shard with a seeded per-(seed, epoch, view, shard) permutation.  Mixing happens
after ``apply`` (as timm's Mixup runs after the per-image transform): :func:`mix` builds
the mixed image, :func:`soft_label` the matching target.

``fingerprint(cfg)`` hashes the config plus the pixels produced on canonical inputs, so
a cache made by a different implementation, config or library version is refused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from pipeline.config import ConfigBase, check
from pipeline.decode import DEFAULT_MAX_PIXELS, canonical_decodes
from pipeline.randaugment import apply_op, parse_rand_augment

# Domain tags keep the per-sample and per-shard streams apart even for equal integers.
_SAMPLE_TAG = 0x6B645F73  # "kd_s"
_PAIR_TAG = 0x6B645F70  # "kd_p"

_RRC_ATTEMPTS = 10  # torchvision / timm RandomResizedCrop
_ERASE_ATTEMPTS = 10  # timm RandomErasing
_ERASE_AREA = (0.02, 1 / 3)  # timm RandomErasing defaults (min_area, max_area)
_ERASE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))
_EVAL_CROP_PCT = 0.875  # timm DEFAULT_CROP_PCT

_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_RE_MODES = ("pixel", "rand", "const")
EVAL_RESIZES = ("crop", "deit")
MIX_MODES = ("none", "mixup", "cutmix")


@dataclass
class AugConfig(ConfigBase):
    """DeiT training augmentation (defaults = DeiT-B recipe).

    ``enabled=False`` gives the eval transform instead: center crop of ``crop_pct=0.875``
    of the shorter side, resize to ``out_size``, normalize; no flip/RandAugment/erase/mix.
    ``eval_resize="deit"`` performs that eval crop as DeiT's ``Resize(int(out_size / 0.875))``
    (short side, PIL) then ``CenterCrop(out_size)`` on whole pixels: the same scale, < 1 px
    of offset apart. It is read only with ``enabled=False`` and left out of the fingerprint of
    training configs (eval is never cached), so it changes no cached row.
    ``auto_augment`` None or "" disables RandAugment; only ``rand-...`` strings are
    supported.  ``mixup_alpha = cutmix_alpha = 0`` or ``mix_prob = 0`` disables mixing.
    ``exif_transpose`` and ``max_pixels`` are the decoding rule (``pipeline.decode``): apply EXIF
    orientation; refuse an image with more pixels (from its header, before decoding) as a bad sample.
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    hflip: float = 0.5
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.25
    re_mode: str = "pixel"
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    enabled: bool = True
    exif_transpose: bool = True
    eval_resize: str = "crop"
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        self.scale, self.ratio = tuple(self.scale), tuple(self.ratio)
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        check(len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1], "scale",
              f"need 0 < min <= max, found {self.scale}")
        check(len(self.ratio) == 2 and 0 < self.ratio[0] <= self.ratio[1], "ratio",
              f"need 0 < min <= max, found {self.ratio}")
        check(self.interpolation in _INTERPOLATIONS, "interpolation",
              f"one of {sorted(_INTERPOLATIONS)}, found {self.interpolation!r}")
        for name in ("hflip", "re_prob", "mix_prob", "switch_prob"):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and 0.0 <= value <= 1.0, name,
                  f"a probability in [0, 1], found {value!r}")
        for name in ("mixup_alpha", "cutmix_alpha"):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and value >= 0.0, name, f"must be >= 0, found {value!r}")
        check(self.eval_resize in EVAL_RESIZES, "eval_resize",
              f"one of {EVAL_RESIZES}, found {self.eval_resize!r}")
        check(isinstance(self.max_pixels, int) and self.max_pixels > 0, "max_pixels",
              f"a positive pixel count (width x height), found {self.max_pixels!r}")
        check(self.re_mode in _RE_MODES, "re_mode", f"one of {_RE_MODES}, found {self.re_mode!r}")
        check(len(self.mean) == 3, "mean", f"3 values, found {self.mean}")
        check(len(self.std) == 3 and all(s > 0 for s in self.std), "std", f"3 positive values, found {self.std}")
        if self.auto_augment:
            try:
                parse_rand_augment(self.auto_augment)
            except ValueError as err:
                check(False, "auto_augment", str(err))


@dataclass(frozen=True)
class OpParams:
    """One RandAugment layer: op name, whether it fires, magnitude (0..10) and sign."""

    name: str
    applied: bool
    magnitude: float
    negate: bool


@dataclass(frozen=True)
class AugParams:
    """Every random decision for one (seed, epoch, sample_id, view); values only.

    Attributes:
        key: (seed, epoch, sample_id, view) the params were drawn for.
        src_size: (w, h) of the source image the crop was drawn for.
        crop: (left, top, right, bottom) in normalized source coordinates.
        crop_fallback: True when all RRC attempts failed and the center crop was used.
        flip: horizontal flip after the crop.
        ops: RandAugment layers in order (empty when disabled).
        erase: (left, top, right, bottom) in normalized output coordinates, or None.
        noise_seed: seed of the torch.Generator that fills the erased box.
        mix_mode: 'none' | 'mixup' | 'cutmix' (partner from :func:`mix_partner`).
        lam: weight of this sample in its mixed image/label; for CutMix the
            area-corrected value of the normalized (clipped) box; 1.0 for 'none'.
        mix_box: CutMix box (left, top, right, bottom) in normalized output coords, or None.
    """

    key: tuple[int, int, int, int]
    src_size: tuple[int, int]
    crop: tuple[float, float, float, float]
    crop_fallback: bool
    flip: bool
    ops: tuple[OpParams, ...]
    erase: tuple[float, float, float, float] | None
    noise_seed: int
    mix_mode: str
    lam: float
    mix_box: tuple[float, float, float, float] | None


# --------------------------------------------------------------------------- sampling


def _generator(tag: int, *ints: int) -> np.random.Generator:
    for i in ints:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)) or i < 0:
            raise ValueError(f"plan RNG key must be non-negative integers, found {ints}")
    key = np.random.SeedSequence((tag, *[int(i) for i in ints])).generate_state(2, np.uint64)
    return np.random.Generator(np.random.Philox(key=key))


def _random_resized_crop(rng: np.random.Generator, w: int, h: int, scale, ratio):
    """torchvision/timm ``RandomResizedCrop.get_params`` in integer pixels, normalized.

    Always consumes the same number of draws so later decisions do not shift.
    """
    u = rng.random((_RRC_ATTEMPTS, 4))
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for ua, ur, ui, uj in u.tolist():
        target_area = area * (scale[0] + (scale[1] - scale[0]) * ua)
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * ur)
        cw = int(round(math.sqrt(target_area * aspect)))
        ch = int(round(math.sqrt(target_area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = min(int(ui * (h - ch + 1)), h - ch)  # randint(0, h - ch)
            left = min(int(uj * (w - cw + 1)), w - cw)
            return (left / w, top / h, (left + cw) / w, (top + ch) / h), False
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        cw, ch = int(round(h * max(ratio))), h
    else:
        cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
    return (left / w, top / h, (left + cw) / w, (top + ch) / h), True


def _center_crop(w: int, h: int) -> tuple[float, float, float, float]:
    """Eval crop: a centered square of crop_pct x the shorter side (resolution independent)."""
    side = _EVAL_CROP_PCT * min(w, h)
    fw, fh = side / w, side / h
    return ((1 - fw) / 2, (1 - fh) / 2, (1 + fw) / 2, (1 + fh) / 2)


def _rand_augment(rng: np.random.Generator, auto_augment: str | None) -> tuple[OpParams, ...]:
    if not auto_augment:
        return ()
    spec = parse_rand_augment(auto_augment)
    n = spec.num_layers
    u = rng.random((n, 4)).tolist()  # op choice (with replacement), applied, sign, uniform magnitude
    z = rng.standard_normal(n).tolist()
    layers = []
    for (uc, up, us, um), zi in zip(u, z):
        magnitude = spec.magnitude
        if spec.magnitude_std == math.inf:
            magnitude = magnitude * um  # timm: mstd > 100 means uniform(0, m)
        elif spec.magnitude_std > 0:
            magnitude = magnitude + spec.magnitude_std * zi
        magnitude = max(0.0, min(magnitude, spec.magnitude_max))
        name = spec.ops[min(int(uc * len(spec.ops)), len(spec.ops) - 1)]
        layers.append(OpParams(name, up < spec.prob, magnitude, us < 0.5))
    return tuple(layers)


def _erase_box(rng: np.random.Generator, prob: float):
    """timm RandomErasing (count 1) on a square output, in normalized units."""
    u = rng.random(1 + 4 * _ERASE_ATTEMPTS).tolist()
    if not u[0] < prob:
        return None
    for k in range(_ERASE_ATTEMPTS):
        ua, ur, ut, ul = u[1 + 4 * k: 5 + 4 * k]
        area = _ERASE_AREA[0] + (_ERASE_AREA[1] - _ERASE_AREA[0]) * ua
        aspect = math.exp(_ERASE_LOG_ASPECT[0] + (_ERASE_LOG_ASPECT[1] - _ERASE_LOG_ASPECT[0]) * ur)
        eh, ew = math.sqrt(area * aspect), math.sqrt(area / aspect)
        if ew < 1 and eh < 1:
            top, left = ut * (1 - eh), ul * (1 - ew)
            return (left, top, left + ew, top + eh)
    return None


def _mixing(rng: np.random.Generator, cfg: AugConfig):
    """Per-sample timm Mixup decision: mode, lam, CutMix box (normalized, clipped)."""
    u_apply, u_switch, ucx, ucy = rng.random(4).tolist()
    if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
        mode = "cutmix" if u_switch < cfg.switch_prob else "mixup"
    elif cfg.mixup_alpha > 0:
        mode = "mixup"
    elif cfg.cutmix_alpha > 0:
        mode = "cutmix"
    else:
        return "none", 1.0, None
    if not u_apply < cfg.mix_prob:
        return "none", 1.0, None
    alpha = cfg.cutmix_alpha if mode == "cutmix" else cfg.mixup_alpha
    lam = float(rng.beta(alpha, alpha))  # last draw: its variable consumption shifts nothing
    if mode == "mixup":
        return mode, lam, None
    cut = math.sqrt(1.0 - lam)
    box = (min(max(ucx - cut / 2, 0.0), 1.0), min(max(ucy - cut / 2, 0.0), 1.0),
           min(max(ucx + cut / 2, 0.0), 1.0), min(max(ucy + cut / 2, 0.0), 1.0))
    lam = 1.0 - (box[2] - box[0]) * (box[3] - box[1])  # timm correct_lam, on the normalized box
    return mode, lam, box


def sample_params(cfg: AugConfig, seed: int, epoch: int, sample_id: int, view: int,
                  src_size: Sequence[int]) -> AugParams:
    """Draw all decisions for (seed, epoch, sample_id, view) of a ``src_size=(w, h)`` image.

    The generator is ``Philox`` keyed by ``SeedSequence((tag, seed, epoch, sample_id, view))``;
    draws happen in a fixed order with fixed counts (crop, flip, RandAugment, erase,
    noise seed, mix), so e.g. the crop does not depend on the RandAugment setting.
    """
    w, h = int(src_size[0]), int(src_size[1])
    if w <= 0 or h <= 0:
        raise ValueError(f"sample {sample_id}: src_size must be positive (w, h), found {tuple(src_size)}")
    key = (seed, epoch, sample_id, view)
    rng = _generator(_SAMPLE_TAG, *key)
    if not cfg.enabled:
        return AugParams(key, (w, h), _center_crop(w, h), False, False, (), None, 0, "none", 1.0, None)
    crop, fallback = _random_resized_crop(rng, w, h, cfg.scale, cfg.ratio)
    flip = bool(rng.random() < cfg.hflip)
    ops = _rand_augment(rng, cfg.auto_augment)
    erase = _erase_box(rng, cfg.re_prob)
    noise_seed = int(rng.integers(0, 2**63 - 1))
    mode, lam, box = _mixing(rng, cfg)
    return AugParams(key, (w, h), crop, fallback, flip, ops, erase, noise_seed, mode, lam, box)


# --------------------------------------------------------------------------- pairing


# Version of the pairing rule below (and of pipeline.schedule's cut that defines the groups);
# part of the fingerprint, so changing either refuses caches made with the old one.
PAIRING_RULE = "shard-group-pairs-v1"


@lru_cache(maxsize=256)
def _pairing(seed: int, epoch: int, view: int, index: int, first_id: int, count: int,
             members: tuple[int, ...] | None, group: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids in pairing order, partner of each id in that order) for one shard or shard group."""
    if members is None:
        ids = np.arange(first_id, first_id + count, dtype=np.int64)
        key = (seed, epoch, view, index, first_id, count)
    else:
        ids = np.asarray(members, dtype=np.int64)
        key = (seed, epoch, view, index, first_id, count, 1 + group)
    order = ids[_generator(_PAIR_TAG, *key).permutation(len(ids))]
    partner = np.empty_like(order)
    even = len(order) - len(order) % 2
    partner[0:even:2], partner[1:even:2] = order[1:even:2], order[0:even:2]
    if len(order) % 2:
        partner[-1] = order[0]  # odd one out borrows the first id (one-way pair)
    order.setflags(write=False)
    partner.setflags(write=False)
    return order, partner


def _pairing_for(seed, epoch, view, shard, members, group):
    first, count = int(shard.first_id), int(shard.count)
    if members is not None:
        members = tuple(int(m) for m in members)
        if not members or min(members) < first or max(members) >= first + count:
            raise ValueError(f"shard {getattr(shard, 'name', shard.index)}: mix-pair members must be a "
                             f"non-empty subset of [{first}, {first + count})")
    return _pairing(int(seed), int(epoch), int(view), int(shard.index), first, count, members, int(group))


def mix_pairs(seed: int, epoch: int, view: int, shard, members: Sequence[int] | None = None,
              group: int = 0) -> list[tuple[int, int]]:
    """(sample_id, partner_id) for every sample of ``shard`` (needs .index/.first_id/.count).

    A seeded per-(seed, epoch, view, shard) permutation is cut into consecutive mutual
    pairs; with an odd count the last id is paired with the first id of the
    permutation (one-way); a one-sample shard pairs the sample with itself.  Every id
    appears exactly once as first element; the list is in permutation order.

    ``members`` restricts the pairing to a subset of the shard's ids, ``group`` names that
    subset in the seed: ``pipeline.schedule`` cuts a few shards of each epoch into groups that
    go to different student epochs, and a partner must come from the same group.
    """
    order, partner = _pairing_for(seed, epoch, view, shard, members, group)
    return list(zip(order.tolist(), partner.tolist()))


def mix_partner(seed: int, epoch: int, view: int, shard, sample_id: int,
                members: Sequence[int] | None = None, group: int = 0) -> int:
    """The sample whose image is mixed into ``sample_id``'s (see :func:`mix_pairs`)."""
    order, partner = _pairing_for(seed, epoch, view, shard, members, group)
    hit = np.nonzero(order == sample_id)[0]
    if not len(hit):
        raise ValueError(f"shard {getattr(shard, 'name', shard.index)}: sample_id {sample_id} "
                         f"is not among the paired ids")
    return int(partner[hit[0]])


# --------------------------------------------------------------------------- pixels


@lru_cache(maxsize=16)
def _norm_affine(mean: tuple, std: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 -> normalized float as one multiply-add: x * scale + bias."""
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    return 1.0 / (255.0 * std_t), -mean_t / std_t


def _fill(mean: tuple) -> tuple[int, int, int]:
    return tuple(min(255, round(255 * m)) for m in mean)  # timm's hparams img_mean


def _to_pixels(box: tuple[float, float, float, float], size: int) -> tuple[int, int, int, int]:
    return tuple(min(max(int(round(v * size)), 0), size) for v in box)


def augment(image: Image.Image, params: AugParams, out_size: int, cfg: AugConfig) -> np.ndarray:
    """The uint8 stage of :func:`apply`: crop+resize, flip and RandAugment.

    Returns an HWC uint8 array [out_size, out_size, 3]. It is 4x smaller than the float
    image, so decode workers hand this to the process that batches (see :func:`finish`).
    The crop is ``image.resize(..., box=<float box>)`` from the normalized box, so any
    ``out_size`` shows the same content; translate (a fraction of the side) scales with it.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    w, h = image.size
    resample = _INTERPOLATIONS[cfg.interpolation]
    if not cfg.enabled and cfg.eval_resize == "deit":
        return np.array(_deit_eval_resize(image, out_size, resample), dtype=np.uint8)
    left, top, right, bottom = params.crop
    img = image.resize((out_size, out_size), resample=resample,
                       box=(left * w, top * h, right * w, bottom * h))
    if params.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if params.ops:
        fill = _fill(cfg.mean)
        for op in params.ops:
            if op.applied:
                img = apply_op(img, op.name, op.magnitude, op.negate, fill, resample)
    return np.array(img, dtype=np.uint8)


def _deit_eval_resize(image: Image.Image, out_size: int, resample) -> Image.Image:
    """DeiT's eval transform on PIL: torchvision ``Resize(int(out_size / 0.875))`` of the short
    side (long side truncated, as torchvision computes it) then ``CenterCrop(out_size)``."""
    w, h = image.size
    short = int(out_size / _EVAL_CROP_PCT)
    if w <= h:
        size = (short, int(short * h / w))
    else:
        size = (int(short * w / h), short)
    img = image.resize(size, resample=resample)
    left = int(round((size[0] - out_size) / 2.0))
    top = int(round((size[1] - out_size) / 2.0))
    return img.crop((left, top, left + out_size, top + out_size))


def finish(pixels: np.ndarray, params: AugParams, cfg: AugConfig) -> torch.Tensor:
    """The float stage of :func:`apply`: normalize ``augment``'s uint8 pixels, then erase.

    Returns float32 [3, H, W]; the erase box scales with the size.
    """
    scale, bias = _norm_affine(cfg.mean, cfg.std)
    if not pixels.flags.writeable:  # e.g. zero-copy from Ray's object store; torch wants writable
        pixels = pixels.copy()
    x = torch.from_numpy(pixels).permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format)
    x.mul_(scale).add_(bias)
    if params.erase is not None:
        _erase(x, params.erase, params.noise_seed, cfg.re_mode)
    return x


def apply(image: Image.Image, params: AugParams, out_size: int, cfg: AugConfig) -> torch.Tensor:
    """Perform ``params`` on ``image``: crop+resize, flip, RandAugment, normalize, erase.

    Returns a float32 tensor [3, out_size, out_size], normalized with ``cfg.mean/std``;
    no mixing (see :func:`mix`). Equal to ``finish(augment(...))``, the two stages that
    may run in different processes.
    """
    return finish(augment(image, params, out_size, cfg), params, cfg)


def _erase(x: torch.Tensor, box: tuple, noise_seed: int, mode: str) -> None:
    size = x.shape[-1]
    left, top, right, bottom = box
    ew = min(int(round((right - left) * size)), size)
    eh = min(int(round((bottom - top) * size)), size)
    x0 = min(int(round(left * size)), size - ew)
    y0 = min(int(round(top * size)), size - eh)
    if ew == 0 or eh == 0:
        return
    if mode == "const":
        x[:, y0:y0 + eh, x0:x0 + ew] = 0.0
        return
    gen = torch.Generator().manual_seed(noise_seed)
    shape = (x.shape[0], eh, ew) if mode == "pixel" else (x.shape[0], 1, 1)
    x[:, y0:y0 + eh, x0:x0 + ew] = torch.empty(shape, dtype=x.dtype).normal_(generator=gen)


def mix(a: torch.Tensor, b: torch.Tensor, params_a: AugParams) -> torch.Tensor:
    """The mixed image of sample ``a`` with its partner's augmented image ``b``.

    mixup: ``lam * a + (1 - lam) * b``; cutmix: ``a`` with ``params_a.mix_box`` (rounded
    to pixels at this size) pasted from ``b``; 'none': ``a`` itself (not a copy).
    """
    if params_a.mix_mode == "none":
        return a
    if a.shape != b.shape:
        raise ValueError(f"sample {params_a.key[2]}: cannot mix shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if params_a.mix_mode == "mixup":
        return a * params_a.lam + b * (1.0 - params_a.lam)
    h, w = a.shape[-2:]
    left, top, right, bottom = params_a.mix_box
    x0, x1 = _to_pixels((left, right), w)
    y0, y1 = _to_pixels((top, bottom), h)
    out = a.clone()
    out[..., y0:y1, x0:x1] = b[..., y0:y1, x0:x1]
    return out


def soft_label(params_a: AugParams, label_a: int, label_b: int, num_classes: int) -> torch.Tensor:
    """``lam * onehot(label_a) + (1 - lam) * onehot(label_b)`` as float32 [num_classes].

    For CutMix ``lam`` is corrected by the normalized box area, so the label is the same
    at every resolution (the rounded pixel box may differ from it by < 1 px per edge).
    No label smoothing here (the loss applies it).
    """
    for label in (label_a, label_b):
        if not 0 <= label < num_classes:
            raise ValueError(f"sample {params_a.key[2]}: label {label} outside [0, {num_classes})")
    target = torch.zeros(num_classes, dtype=torch.float32)
    target[label_a] += params_a.lam
    target[label_b] += 1.0 - params_a.lam
    return target


# --------------------------------------------------------------------------- fingerprint

FINGERPRINT_SIZE = 64  # fixed; independent of any student resolution


def _canonical_images() -> tuple[Image.Image, Image.Image]:
    """Two small synthetic RGB images built with integer arithmetic only (exact everywhere)."""
    out = []
    for w, h, k in ((96, 72, 3), (80, 100, 5)):
        y, x = np.mgrid[0:h, 0:w]
        rgb = np.stack([(x * 7 + y * k) % 256, (x * y + 11 * k) % 256,
                        ((x // 8 + y // 8) % 2) * 180 + (x + y) % 60], axis=-1)
        out.append(Image.fromarray(rgb.astype(np.uint8), "RGB"))
    return out[0], out[1]


def _fingerprint_cases(cfg: AugConfig, img: Image.Image) -> list[AugParams]:
    """A few drawn plans plus forced ones so every op, erase and both mix modes are exercised."""
    cases = [sample_params(cfg, 0, epoch, 7, view, img.size) for epoch in range(3) for view in range(2)]
    if not cfg.enabled:
        return cases
    base = cases[0]
    if cfg.auto_augment:
        spec = parse_rand_augment(cfg.auto_augment)
        for name in spec.ops:
            ops = (OpParams(name, True, spec.magnitude, False), OpParams(name, True, spec.magnitude / 2, True))
            cases.append(dataclasses.replace(base, ops=ops))
    cases.append(dataclasses.replace(base, erase=(0.1, 0.2, 0.6, 0.5), noise_seed=12345))
    cases.append(dataclasses.replace(base, mix_mode="mixup", lam=0.3, mix_box=None))
    cases.append(dataclasses.replace(base, mix_mode="cutmix", lam=1 - 0.5 * 0.4,
                                     mix_box=(0.25, 0.1, 0.75, 0.5)))
    return cases


def fingerprint(cfg: AugConfig) -> str:
    """sha256 hex of the config plus the plan's pixels/labels on canonical inputs.

    Covers decoding (``pipeline.decode.canonical_decodes``), sample_params, apply (every
    RandAugment op, erase), mix, soft_label at FINGERPRINT_SIZE px and the mix-pairing rule,
    so a config change or a library upgrade that changes pixels changes the fingerprint.
    ``max_pixels`` is left out: it decides which images are refused as bad, not the pixels of
    any other; a refused row is marked invalid in the cache and the student drops invalid rows
    and rows it cannot decode, so caches made under another limit (or before it) stay valid.
    """
    described = {k: v for k, v in cfg.to_dict().items() if k != "max_pixels"}
    if cfg.enabled or cfg.eval_resize == "crop":
        # Training rows never read eval_resize, and "crop" is the transform fingerprinted before
        # the option existed: leaving it out keeps every existing cache's fingerprint.
        described.pop("eval_resize")
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    digest.update(PAIRING_RULE.encode())
    for pixels in canonical_decodes(cfg.exif_transpose):
        digest.update(repr(pixels.shape).encode())
        digest.update(pixels.tobytes())
    img_a, img_b = _canonical_images()
    partner = apply(img_b, sample_params(cfg, 0, 0, 8, 0, img_b.size), FINGERPRINT_SIZE, cfg)
    for params in _fingerprint_cases(cfg, img_a):
        digest.update(repr(params).encode())
        x = apply(img_a, params, FINGERPRINT_SIZE, cfg)
        digest.update(mix(x, partner, params).contiguous().numpy().tobytes())
        digest.update(soft_label(params, 1, 3, 5).numpy().tobytes())
    return digest.hexdigest()
