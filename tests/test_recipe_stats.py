"""The plan's random decisions follow timm's own samplers (DeiT's augmentation), statistically.

20 000 plans from ``pipeline.plan.sample_params`` against 20 000 draws of timm 1.0's own code,
built the way DeiT builds it: ``create_transform(224, is_training=True,
auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic', re_prob=0.25, re_mode='pixel')``
(RandomResizedCrop ``get_params``, the flip, ``RandAugment`` with its ``AugmentOp`` s,
``RandomErasing``) and DeiT's ``Mixup(0.8, 1.0, prob 1, switch 0.5, mode='batch')``
(``_params_per_batch`` + ``cutmix_bbox_and_lam``; ``mode='elem'``'s ``_params_per_elem`` too:
the plan draws per sample, DeiT per batch, with the same per-sample distributions). The constants come from timm's objects, the
draws from timm's code (its ``random`` / ``np.random`` seeded here), so nothing is restated.

Two-sample Kolmogorov-Smirnov and two-proportion z tests at about 1e-6 per check (seeds fixed:
deterministic), so an equal sampler never fails, while a changed constant does:
:func:`test_a_changed_constant_fails` runs the same checks on plans drawn with changed constants
(magnitude std 0.5 -> 1.0, reprob 0.25 -> 0.5, switch 0.5 -> 0.3, ...) and requires each to fail.
"""
from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest
import torch
import timm.data.auto_augment as taa
import timm.data.random_erasing as tre
from PIL import Image
from timm.data import Mixup, create_transform
from timm.data.auto_augment import RandAugment
from timm.data.mixup import cutmix_bbox_and_lam
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import RandomHorizontalFlip

from pipeline.plan import AugConfig, sample_params

N = 20_000
OUT = 224
SIZES = [(500, 375), (375, 500), (640, 480), (300, 300), (120, 400)]  # includes an RRC fallback-prone shape
KS_C = math.sqrt(-math.log(1e-6 / 2) / 2)   # two-sample KS critical constant at alpha = 1e-6 (2.69)
Z_MAX = 5.0                                  # two-proportion z: two-sided p ~ 6e-7


# --- statistics --------------------------------------------------------------------------------

def ks_ok(a, b) -> tuple[bool, str]:
    """Two-sample Kolmogorov-Smirnov: sup |F_a - F_b| under the alpha = 1e-6 critical value."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    d = np.max(np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)))
    crit = KS_C * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))
    return bool(d < crit), f"KS D={d:.4f} (critical {crit:.4f}, n={len(a)}/{len(b)})"


def rate_ok(k1: int, n1: int, k2: int, n2: int) -> tuple[bool, str]:
    """Two-proportion z test: |z| < Z_MAX."""
    p = (k1 + k2) / (n1 + n2)
    se = math.sqrt(max(p * (1 - p), 1e-12) * (1 / n1 + 1 / n2))
    z = (k1 / n1 - k2 / n2) / se
    return bool(abs(z) < Z_MAX), f"rate {k1 / n1:.4f} vs {k2 / n2:.4f} (z={z:.1f}, n={n1}/{n2})"


def mean_std_ok(a, b) -> tuple[bool, str]:
    """Means within 5 standard errors, standard deviations within 5 % of each other."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    z = (a.mean() - b.mean()) / math.sqrt(a.var() / len(a) + b.var() / len(b))
    ratio = a.std() / b.std()
    return bool(abs(z) < Z_MAX and abs(ratio - 1) < 0.05), \
        f"mean {a.mean():.4f} vs {b.mean():.4f} (z={z:.1f}), std {a.std():.4f} vs {b.std():.4f}"


# --- timm's side: DeiT's transform, drawn by timm's code ----------------------------------------

def deit_transform():
    tf = create_transform(OUT, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
                          re_prob=0.25, re_mode="pixel", re_count=1)
    parts = {type(t): t for t in tf.transforms}
    return (parts[RandomResizedCropAndInterpolation], parts[RandomHorizontalFlip], parts[RandAugment],
            parts[RandomErasing])


def timm_draws(n: int = N) -> dict:
    """n draws of every decision of DeiT's transform and Mixup, by timm's own samplers."""
    rrc, flip, ra, erase = deit_transform()
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    out: dict = {"crop": [], "flip": [], "ops": [], "applied": [], "magnitude": [], "negate": [],
                 "erase": [], "erased": 0, "mix": []}
    images = [Image.new("L", s) for s in SIZES]
    for k in range(n):
        img = images[k % len(SIZES)]
        top, left, h, w = rrc.get_params(img, rrc.scale, rrc.ratio)
        out["crop"].append((img.size, left, top, w, h))
        out["flip"].append(bool(torch.rand(1) < flip.p))      # torchvision RandomHorizontalFlip's draw

    # RandAugment: timm's op choice and AugmentOp.__call__ (prob, magnitude, clipping) with the
    # pixel work replaced by recorders; _randomly_negate recorded where timm's level fns call it.
    current = {}

    def level_recorder(op):
        level_fn = op.level_fn

        def record(magnitude, hparams):
            out["applied"][-1].append(current["name"])
            out["magnitude"].append(magnitude)
            return level_fn(magnitude, hparams) if level_fn is not None else ()
        return record

    class Chosen:
        def __init__(self, op):
            self.op, self.name = op, op.name

        def __call__(self, img):
            current["name"] = self.name
            out["ops"].append(self.name)
            return self.op(img)

    negate = taa._randomly_negate

    def recorded_negate(v):
        result = negate(v)
        out["negate"].append((current["name"], result != v))
        return result

    saved = [(op, op.level_fn, op.aug_fn) for op in ra.ops]
    try:
        for op in ra.ops:
            op.level_fn, op.aug_fn = level_recorder(op), (lambda img, *a, **k: img)
        taa._randomly_negate = recorded_negate
        chosen = RandAugment([Chosen(op) for op in ra.ops], ra.num_layers, ra.choice_weights)
        for _ in range(n):
            out["applied"].append([])
            chosen(None)
    finally:
        taa._randomly_negate = negate
        for op, level_fn, aug_fn in saved:
            op.level_fn, op.aug_fn = level_fn, aug_fn
    out["num_layers"] = ra.num_layers

    # RandomErasing's draws for a 3 x 224 x 224 image (timm's _erase, told the size; the stub it
    # writes into is 1 x 1, so no pixels are filled): the box size recorded where timm fills it.
    pixels, zero = tre._get_pixels, torch.zeros(())

    def recorded_pixels(per_pixel, rand_color, patch_size, dtype=torch.float32, device="cpu"):
        out["erase"].append(patch_size[1:])
        return zero

    tre._get_pixels = recorded_pixels
    try:
        stub = torch.zeros(3, 1, 1)
        for _ in range(n):
            erase._erase(stub, 3, OUT, OUT, stub.dtype)
    finally:
        tre._get_pixels = pixels

    # Mixup as DeiT's main.py builds it (mode='batch'): one draw per batch; CutMix's lam corrected
    # by the clipped box, as timm's _mix_batch does.
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                  label_smoothing=0.1, num_classes=1000)
    for _ in range(n):
        lam, use_cutmix = mixup._params_per_batch()
        if use_cutmix:
            _, lam = cutmix_bbox_and_lam((3, OUT, OUT), lam, correct_lam=True)
        out["mix"].append(("cutmix" if use_cutmix else "mixup", float(lam)))
    # The same Mixup per element (timm mode='elem', the kdcache plan's per-sample coupling):
    # the same per-sample distributions, drawn in one call as timm's _mix_elem does.
    lams, cutmix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="elem",
                         label_smoothing=0.1, num_classes=1000)._params_per_elem(n)
    out["mix_elem"] = [("cutmix", cutmix_bbox_and_lam((3, OUT, OUT), float(lam), correct_lam=True)[1]) if c
                       else ("mixup", float(lam)) for lam, c in zip(lams, cutmix)]
    return out


# --- the plan's side ---------------------------------------------------------------------------

def plan_draws(cfg: AugConfig, n: int = N) -> list:
    return [sample_params(cfg, 0, 0, k, 0, SIZES[k % len(SIZES)]) for k in range(n)]


def crop_stats(crops):
    """(area fraction, log aspect w/h, horizontal centre fraction) of pixel crops (size, left, top, w, h)."""
    area = np.array([w * h / (s[0] * s[1]) for s, _, _, w, h in crops])
    aspect = np.log([w / h for _, _, _, w, h in crops])
    centre = np.array([(left + w / 2) / s[0] for s, left, _, w, _ in crops])
    return area, aspect, centre


def compare(plans: list, ref: dict) -> dict[str, tuple[bool, str]]:
    """Every check of the plan's draws against timm's: name -> (passed, detail)."""
    checks = {}
    crops = []
    for p in plans:
        w, h = p.src_size
        left, top = round(p.crop[0] * w), round(p.crop[1] * h)
        crops.append((p.src_size, left, top, round(p.crop[2] * w) - left, round(p.crop[3] * h) - top))
    ours, theirs = crop_stats(crops), crop_stats(ref["crop"])
    for name, a, b in zip(("rrc area", "rrc log aspect", "rrc centre x"), ours, theirs):
        checks[name] = ks_ok(a, b)
    fb_ours = sum(p.crop_fallback for p in plans)
    fb_timm = sum(1 for (s, left, top, w, h) in ref["crop"]
                  if (left, top) == ((s[0] - w) // 2, (s[1] - h) // 2) and (w == s[0] or h == s[1]))
    checks["rrc fallback"] = rate_ok(fb_ours, len(plans), fb_timm, len(ref["crop"]))
    checks["flip rate"] = rate_ok(sum(p.flip for p in plans), len(plans), sum(ref["flip"]), len(ref["flip"]))

    layers = [op for p in plans for op in p.ops]
    checks["randaugment layers"] = (all(len(p.ops) == ref["num_layers"] for p in plans),
                                    f"{Counter(len(p.ops) for p in plans)} layers vs timm's {ref['num_layers']}")
    ours_ops, timm_ops = Counter(op.name for op in layers), Counter(ref["ops"])
    worst = max(((rate_ok(ours_ops[k], len(layers), timm_ops[k], len(ref["ops"])), k) for k in timm_ops),
                key=lambda t: (t[0][0], -abs(float(t[0][1].split("z=")[1].split(",")[0]))))
    checks["randaugment op choice"] = (set(ours_ops) == set(timm_ops) and all(
        rate_ok(ours_ops[k], len(layers), timm_ops[k], len(ref["ops"]))[0] for k in timm_ops),
        f"{len(ours_ops)} vs {len(timm_ops)} ops; least equal {worst[1]}: {worst[0][1]}")
    applied = [op for op in layers if op.applied]
    timm_applied = [name for plan in ref["applied"] for name in plan]
    checks["randaugment op prob"] = rate_ok(len(applied), len(layers), len(timm_applied), len(ref["ops"]))
    mags, timm_mags = [op.magnitude for op in applied], ref["magnitude"]
    checks["magnitude distribution"] = ks_ok(mags, timm_mags)
    checks["magnitude mean/std"] = mean_std_ok(mags, timm_mags)
    cap = max(timm_mags)  # timm clips at magnitude_max (10): the draws above land exactly on it
    checks["magnitude clipped"] = rate_ok(sum(m == cap for m in mags), len(mags), sum(m == cap for m in timm_mags),
                                          len(timm_mags))
    negated = {name for name, _ in ref["negate"]}  # the ops whose level fn calls timm's _randomly_negate
    signed = [op.negate for op in applied if op.name in negated]
    checks["magnitude sign"] = rate_ok(sum(signed), len(signed), sum(neg for _, neg in ref["negate"]),
                                       len(ref["negate"]))

    boxes = [p.erase for p in plans if p.erase is not None]
    checks["erase prob"] = rate_ok(len(boxes), len(plans), len(ref["erase"]), len(plans))
    checks["erase area"] = ks_ok([(r - l) * (b - t) for l, t, r, b in boxes],
                                 [h * w / OUT ** 2 for h, w in ref["erase"]])
    checks["erase log aspect"] = ks_ok([math.log((b - t) / (r - l)) for l, t, r, b in boxes],
                                       [math.log(h / w) for h, w in ref["erase"]])

    mixed = [p for p in plans if p.mix_mode != "none"]
    timm_mixed = [(m, lam) for m, lam in ref["mix"] if lam != 1.0 or m == "cutmix"]
    checks["mix prob"] = rate_ok(len(mixed), len(plans), len(timm_mixed), len(ref["mix"]))
    for key, suffix in (("mix", ""), ("mix_elem", " (timm elem)")):
        draws = ref[key]
        checks["cutmix switch" + suffix] = rate_ok(sum(p.mix_mode == "cutmix" for p in plans), len(plans),
                                                   sum(m == "cutmix" for m, _ in draws), len(draws))
        for mode in ("mixup", "cutmix"):
            checks[f"{mode} lambda{suffix}"] = ks_ok([p.lam for p in plans if p.mix_mode == mode],
                                                     [lam for m, lam in draws if m == mode])
    return checks


@pytest.fixture(scope="module")
def reference() -> dict:
    return timm_draws()


def _failures(checks: dict) -> list[str]:
    return [f"{name}: {detail}" for name, (ok, detail) in checks.items() if not ok]


def test_plan_samples_as_timm_does(reference):
    checks = compare(plan_draws(AugConfig()), reference)
    assert len(checks) == 22
    assert not _failures(checks), "\n".join(_failures(checks))


# A changed constant and the check that must catch it (the others may fail too).
MUTANTS = {
    "magnitude std 0.5 -> 1.0": ({"auto_augment": "rand-m9-mstd1.0-inc1"}, "magnitude mean/std"),
    "magnitude 9 -> 10": ({"auto_augment": "rand-m10-mstd0.5-inc1"}, "magnitude distribution"),
    "op prob 0.5 -> 0.6": ({"auto_augment": "rand-m9-mstd0.5-inc1-p0.6"}, "randaugment op prob"),
    "reprob 0.25 -> 0.5": ({"re_prob": 0.5}, "erase prob"),
    "switch 0.5 -> 0.3": ({"switch_prob": 0.3}, "cutmix switch"),
    "mixup alpha 0.8 -> 1.0": ({"mixup_alpha": 1.0}, "mixup lambda"),
    "cutmix alpha 1.0 -> 0.7": ({"cutmix_alpha": 0.7}, "cutmix lambda"),
    "flip 0.5 -> 0.45": ({"hflip": 0.45}, "flip rate"),
    "scale min 0.08 -> 0.12": ({"scale": (0.12, 1.0)}, "rrc area"),
    "ratio (3/4, 4/3) -> (2/3, 3/2)": ({"ratio": (2 / 3, 3 / 2)}, "rrc log aspect"),
}


@pytest.mark.slow  # 10 x 20 000 plans (~10 s on an idle 2-core machine)
def test_a_changed_constant_fails(reference):
    """Each changed constant fails its check: the tolerances are tight enough to guard the recipe."""
    missed = []
    for name, (change, check) in MUTANTS.items():
        checks = compare(plan_draws(AugConfig(**change), n=N), reference)
        if checks[check][0]:
            missed.append(f"{name}: {check} passed ({checks[check][1]})")
    assert not missed, "\n".join(missed)
