"""The augmentation plan: replay, distributions, pairing, fingerprint, resolution."""
from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from collections import Counter, namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline import plan as P
from pipeline import randaugment as RA
from pipeline.config import ConfigError
from timm.data import auto_augment as taa

ROOT = Path(__file__).resolve().parents[1]
Shard = namedtuple("Shard", "name index first_id count")  # stand-in for shards.ShardInfo


@pytest.fixture(scope="module")
def chelsea() -> Image.Image:
    skdata = pytest.importorskip("skimage.data")
    return Image.fromarray(skdata.chelsea())  # 451x300 RGB photo, bundled (offline)


# ---------------------------------------------------------------- replay

_REPLAY_SCRIPT = r"""
import hashlib, json, sys
from collections import namedtuple
import skimage.data
from PIL import Image
from pipeline import plan as P
Shard = namedtuple("Shard", "name index first_id count")
cfg, img, shard = P.AugConfig(), Image.fromarray(skimage.data.chelsea()), Shard("s", 1, 10, 7)
out = {}
for seed, epoch, view in [(0, 0, 0), (0, 1, 0), (0, 0, 2), (3, 5, 1)]:
    for sid, partner in P.mix_pairs(seed, epoch, view, shard):
        pa = P.sample_params(cfg, seed, epoch, sid, view, img.size)
        pb = P.sample_params(cfg, seed, epoch, partner, view, img.size)
        x = P.mix(P.apply(img, pa, 96, cfg), P.apply(img, pb, 96, cfg), pa)
        out[f"{seed},{epoch},{sid},{view}"] = hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()
print(json.dumps({"pixels": out, "fingerprint": P.fingerprint(P.AugConfig())}))
"""


def _run_python(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def fresh_process() -> dict:
    """Replay hashes and the default fingerprint computed by a separate interpreter."""
    return json.loads(_run_python(_REPLAY_SCRIPT))


def test_pixels_bit_identical_in_fresh_process(fresh_process):
    first = fresh_process["pixels"]
    # this process: different call order and unrelated global RNG use must not matter
    random.seed(123), np.random.seed(5), torch.manual_seed(9)
    exec_ns: dict = {}
    exec(compile(_REPLAY_SCRIPT.rsplit("\nprint(", 1)[0], "<replay>", "exec"), exec_ns)
    assert exec_ns["out"] == first
    assert len(set(first.values())) == len(first)  # 28 distinct images


def test_no_global_rng_touched(chelsea):
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    cfg = P.AugConfig(re_prob=1.0)
    for sid in range(20):
        P.apply(chelsea, P.sample_params(cfg, 1, 2, sid, 0, chelsea.size), 64, cfg)
    P.mix_pairs(1, 2, 0, Shard("s", 0, 0, 9))
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    for path in (ROOT / "pipeline/plan.py", ROOT / "pipeline/randaugment.py"):
        src = path.read_text()
        for bad in ("import random", "np.random.rand", "np.random.seed", "torch.rand", "torch.manual_seed"):
            assert bad not in src, f"{path.name} uses {bad}"


def test_params_differ_by_epoch_view_seed_sample():
    cfg = P.AugConfig()
    base = P.sample_params(cfg, 0, 0, 0, 0, (500, 375))
    assert P.sample_params(cfg, 0, 0, 0, 0, (500, 375)) == base
    for key in [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)]:
        other = P.sample_params(cfg, *key, (500, 375))
        assert other.crop != base.crop and other.noise_seed != base.noise_seed, key
    with pytest.raises(ValueError, match="non-negative"):
        P.sample_params(cfg, -1, 0, 0, 0, (10, 10))


# ---------------------------------------------------------------- distributions

N_DRAWS = 4000


@pytest.fixture(scope="module")
def draws():
    cfg = P.AugConfig()
    return [P.sample_params(cfg, 11, 0, i, 0, (500, 375)) for i in range(N_DRAWS)]


def test_crop_distribution(draws):
    w, h = 500, 375
    normal = [p for p in draws if not p.crop_fallback]
    assert len(normal) > 0.97 * N_DRAWS  # fallback is rare for a 4:3 image
    for p in normal:
        l, t, r, b = p.crop
        cw, ch = (r - l) * w, (b - t) * h
        assert 0 <= l < r <= 1 and 0 <= t < b <= 1
        assert round(cw) == pytest.approx(cw, abs=1e-6)  # whole source pixels as torchvision
        assert 0.08 * 0.97 <= cw * ch / (w * h) <= 1.0  # rounding to pixels may dip a hair below
        assert 3 / 4 * 0.97 <= cw / ch <= 4 / 3 * 1.03
    # uniform area in [0.08, 1] restricted to boxes that fit: mean well inside the range
    areas = [(p.crop[2] - p.crop[0]) * (p.crop[3] - p.crop[1]) for p in normal]
    assert 0.40 < float(np.mean(areas)) < 0.55
    lefts = [p.crop[0] / max(1e-9, 1 - (p.crop[2] - p.crop[0])) for p in normal if p.crop[2] - p.crop[0] < 0.9]
    assert 0.45 < float(np.mean(lefts)) < 0.55  # position uniform over the free range


def test_flip_erase_mix_rates(draws):
    flip = np.mean([p.flip for p in draws])
    erase = np.mean([p.erase is not None for p in draws])
    modes = Counter(p.mix_mode for p in draws)
    assert abs(flip - 0.5) < 0.03
    assert abs(erase - 0.25) < 0.03
    assert modes["none"] == 0 and abs(modes["cutmix"] / N_DRAWS - 0.5) < 0.03
    for p in draws:
        if p.erase is not None:
            l, t, r, b = p.erase
            area, aspect = (r - l) * (b - t), (b - t) / (r - l)
            assert 0 <= l < r < 1 and 0 <= t < b < 1
            assert 0.02 - 1e-9 <= area <= 1 / 3 + 1e-9 and 0.3 - 1e-9 <= aspect <= 1 / 0.3 + 1e-9


def test_lam_distribution(draws):
    mixup = np.array([p.lam for p in draws if p.mix_mode == "mixup"])
    a = 0.8
    assert abs(mixup.mean() - 0.5) < 0.03
    assert abs(mixup.var() - 1 / (4 * (2 * a + 1))) < 0.01  # Var Beta(a, a)
    for p in draws:
        if p.mix_mode == "cutmix":
            l, t, r, b = p.mix_box
            assert 0 <= l <= r <= 1 and 0 <= t <= b <= 1
            assert p.lam == pytest.approx(1 - (r - l) * (b - t))
    cut = np.array([p.lam for p in draws if p.mix_mode == "cutmix"])
    assert 0.5 < cut.mean() < 0.7  # Beta(1,1) raw lam, pushed up by clipping correction


def test_rand_augment_distribution(draws):
    ops = [op for p in draws for op in p.ops]
    assert len(ops) == 2 * N_DRAWS
    counts = Counter(op.name for op in ops)
    assert set(counts) == set(RA.RAND_INCREASING_TRANSFORMS)
    expected = len(ops) / len(RA.RAND_INCREASING_TRANSFORMS)
    assert all(abs(c - expected) < 0.2 * expected for c in counts.values())
    assert abs(np.mean([op.applied for op in ops]) - 0.5) < 0.02
    assert abs(np.mean([op.negate for op in ops]) - 0.5) < 0.02
    mags = np.array([op.magnitude for op in ops])
    assert mags.min() >= 0 and mags.max() <= 10
    assert abs(mags.mean() - 9.0) < 0.05 and abs(mags.std() - 0.5) < 0.05


def test_level_args_match_timm(monkeypatch):
    hparams = {"translate_pct": 0.45, "translate_const": 100}
    for negate, roll in ((False, 0.1), (True, 0.9)):  # timm negates when random.random() > 0.5
        monkeypatch.setattr(taa.random, "random", lambda: roll)
        for name in RA.RAND_INCREASING_TRANSFORMS + RA.RAND_TRANSFORMS:
            for magnitude in (0.0, 3.3, 9.0, 10.0):
                fn = taa.LEVEL_TO_ARG[name]
                want = fn(magnitude, hparams) if fn else ()
                assert RA.level_args(name, magnitude, negate) == pytest.approx(want), (name, magnitude)


def test_posterize_zero_bits_is_black(chelsea):
    # PosterizeIncreasing at the clipped maximum magnitude keeps 0 bits; Pillow 13 raises there
    img = chelsea.resize((32, 32))
    out = RA.apply_op(img, "PosterizeIncreasing", 10.0, False, (124, 116, 104), Image.Resampling.BICUBIC)
    assert out.size == img.size and np.array(out).max() == 0
    out = RA.apply_op(img, "PosterizeIncreasing", 9.0, False, (124, 116, 104), Image.Resampling.BICUBIC)
    assert np.array_equal(np.array(out), np.array(img) & 0x80)  # keeps 4 - int(3.6) = 1 bit


def test_crop_matches_torchvision_resized_crop(chelsea):
    from torchvision.transforms import functional as TF
    cfg = P.AugConfig(hflip=0.0, auto_augment=None, re_prob=0.0)
    p = P.sample_params(cfg, 0, 0, 3, 0, chelsea.size)
    w, h = chelsea.size
    l, t, r, b = p.crop
    i, j, ch, cw = round(t * h), round(l * w), round((b - t) * h), round((r - l) * w)
    ref = TF.resized_crop(chelsea, i, j, ch, cw, [112, 112], TF.InterpolationMode.BICUBIC)
    ours = P.apply(chelsea, p, 112, cfg)
    scale, bias = P._norm_affine(cfg.mean, cfg.std)
    ref_t = torch.from_numpy(np.array(ref)).permute(2, 0, 1).float() * scale + bias
    # identical box; only edge taps differ (resize(box=) may read pixels just outside the crop)
    assert (ours - ref_t)[:, 4:-4, 4:-4].abs().max() < 0.1
    assert (ours - ref_t).abs().mean() < 0.02


# ---------------------------------------------------------------- pairing


@pytest.mark.parametrize("count", [1, 2, 7, 64])
def test_mix_pairs(count):
    shard = Shard("train-000003.tar", 3, 3 * 64, count)
    pairs = P.mix_pairs(0, 4, 1, shard)
    firsts = [a for a, _ in pairs]
    ids = list(range(shard.first_id, shard.first_id + count))
    assert sorted(firsts) == ids
    partner = dict(pairs)
    assert all(b in partner for b in partner.values())
    one_way = [a for a, b in pairs if partner[b] != a]
    assert len(one_way) == (count % 2 if count > 1 else 0)
    if count == 1:
        assert pairs == [(shard.first_id, shard.first_id)]
    else:
        assert all(a != b for a, b in pairs)
    for a, b in pairs:
        assert P.mix_partner(0, 4, 1, shard, a) == b
    assert P.mix_pairs(0, 4, 1, shard) == pairs
    if count > 2:
        assert P.mix_pairs(0, 5, 1, shard) != pairs
        assert P.mix_pairs(0, 4, 2, shard) != pairs
        assert P.mix_pairs(1, 4, 1, shard) != pairs
    with pytest.raises(ValueError, match="train-000003.tar"):
        P.mix_partner(0, 4, 1, shard, shard.first_id + count)


# ---------------------------------------------------------------- mix / labels


def test_mix_and_soft_label(chelsea):
    cfg = P.AugConfig()
    base = P.sample_params(cfg, 0, 0, 0, 0, chelsea.size)
    a, b = torch.zeros(3, 224, 224), torch.ones(3, 224, 224)
    mixup = dataclasses.replace(base, mix_mode="mixup", lam=0.25, mix_box=None)
    assert torch.allclose(P.mix(a, b, mixup), torch.full_like(a, 0.75))
    box = (0.1, 0.2, 0.6, 0.9)
    cut = dataclasses.replace(base, mix_mode="cutmix", lam=1 - 0.5 * 0.7, mix_box=box)
    for size in (160, 224):
        out = P.mix(a[:, :size, :size], b[:, :size, :size], cut)
        assert out[0].mean().item() == pytest.approx(1 - cut.lam, abs=2 / size)
    none = dataclasses.replace(base, mix_mode="none", lam=1.0, mix_box=None)
    assert P.mix(a, b, none) is a
    y = P.soft_label(cut, 2, 4, 5)
    assert y.sum().item() == pytest.approx(1.0) and y[2].item() == pytest.approx(cut.lam)
    assert P.soft_label(cut, 1, 1, 3).tolist() == pytest.approx([0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="label 5"):
        P.soft_label(cut, 5, 0, 5)


# ---------------------------------------------------------------- real photo, resolution


def test_real_photo_full_plan(chelsea):
    cfg = P.AugConfig(re_prob=1.0)
    for sid in range(8):
        p = P.sample_params(cfg, 0, 0, sid, 0, chelsea.size)
        x = P.apply(chelsea, p, 224, cfg)
        assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and torch.isfinite(x).all()
    gray = chelsea.convert("L")  # non-RGB input is converted, not rejected
    assert P.apply(gray, p, 32, cfg).shape == (3, 32, 32)


def _down(x: torch.Tensor, size: int = 32) -> torch.Tensor:
    return F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True)[0]


def test_same_normalized_box_same_content_across_sizes(chelsea):
    cfg = P.AugConfig(re_prob=0.0)
    p = P.sample_params(cfg, 0, 0, 1, 0, chelsea.size)
    # geometric ops whose pixel magnitude scales with the output size
    ops = (P.OpParams("TranslateXRel", True, 6.0, True), P.OpParams("Rotate", True, 5.0, False))
    p = dataclasses.replace(p, ops=ops, erase=None)
    small, large = _down(P.apply(chelsea, p, 160, cfg)), _down(P.apply(chelsea, p, 224, cfg))
    other = _down(P.apply(chelsea, dataclasses.replace(p, crop=(0.0, 0.0, 0.5, 0.5)), 224, cfg))
    same_err = (small - large).abs().mean().item()
    assert same_err < 0.05
    assert (other - large).abs().mean().item() > 5 * same_err
    # erase and cutmix boxes land on the same normalized region at both sizes
    pe = dataclasses.replace(p, erase=(0.25, 0.25, 0.75, 0.5), noise_seed=1)
    for size in (160, 224):
        diff = (P.apply(chelsea, pe, size, cfg) != P.apply(chelsea, p, size, cfg)).any(0).float()
        assert diff.mean().item() == pytest.approx(0.5 * 0.25, abs=2 / size)


def test_eval_mode_is_deterministic_center_crop(chelsea):
    cfg = P.AugConfig(enabled=False)
    p0 = P.sample_params(cfg, 0, 0, 0, 0, chelsea.size)
    p1 = P.sample_params(cfg, 9, 3, 17, 2, chelsea.size)
    assert (p0.flip, p0.ops, p0.erase, p0.mix_mode, p0.lam) == (False, (), None, "none", 1.0)
    assert p0.crop == p1.crop
    l, t, r, b = p0.crop
    w, h = chelsea.size
    assert (r - l) * w == pytest.approx(0.875 * min(w, h)) and (b - t) * h == pytest.approx(0.875 * min(w, h))
    assert torch.equal(P.apply(chelsea, p0, 64, cfg), P.apply(chelsea, p1, 64, cfg))


# ---------------------------------------------------------------- fingerprint

_ALT_VALUES = dict(
    scale=(0.2, 1.0), ratio=(0.5, 2.0), interpolation="bilinear", hflip=0.3, auto_augment="rand-m7-mstd0.5-inc1",
    re_prob=0.1, re_mode="const", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), mixup_alpha=0.2,
    cutmix_alpha=0.0, mix_prob=0.5, switch_prob=0.7, enabled=False, exif_transpose=False, eval_resize="deit",
    max_pixels=1_000_000,
)
# Fields read only by the eval transform: they change the fingerprint of an eval config, never a
# training config's (eval is not cached, and existing caches keep their fingerprints).
_EVAL_ONLY = ("eval_resize",)


def test_fingerprint_stable_across_processes(fresh_process):
    fp = P.fingerprint(P.AugConfig())
    assert len(fp) == 64 and fresh_process["fingerprint"] == fp


# Fields that change which samples are refused, never the pixels of the others (fingerprint docstring).
_NOT_PIXELS = ("max_pixels",)


def test_fingerprint_changes_with_every_field():
    names = [f.name for f in dataclasses.fields(P.AugConfig)]
    assert sorted(names) == sorted(_ALT_VALUES), "add the new field to _ALT_VALUES"
    base = P.fingerprint(P.AugConfig())
    seen = {base}
    for name in _NOT_PIXELS:
        assert P.fingerprint(P.AugConfig(**{name: _ALT_VALUES[name]})) == base, name
    for name in (n for n in names if n not in _NOT_PIXELS):
        if name in _EVAL_ONLY:
            assert P.fingerprint(P.AugConfig(**{name: _ALT_VALUES[name]})) == base, name
            fp = P.fingerprint(P.AugConfig(enabled=False, **{name: _ALT_VALUES[name]}))
        else:
            fp = P.fingerprint(P.AugConfig(**{name: _ALT_VALUES[name]}))
        assert fp not in seen, name
        seen.add(fp)


def test_fingerprint_changes_when_pixels_change(monkeypatch):
    base = P.fingerprint(P.AugConfig())
    rotate = taa.NAME_TO_OP["Rotate"]
    monkeypatch.setitem(taa.NAME_TO_OP, "Rotate", lambda img, deg, **kw: rotate(img, deg + 0.5, **kw))
    assert P.fingerprint(P.AugConfig()) != base
    monkeypatch.undo()
    assert P.fingerprint(P.AugConfig()) == base
    monkeypatch.setattr(P, "_norm_affine", lambda mean, std: (1 / (255 * torch.tensor(std).view(3, 1, 1)),
                                                             torch.zeros(3, 1, 1)))
    assert P.fingerprint(P.AugConfig()) != base


# ---------------------------------------------------------------- config


def test_config_round_trip(tmp_path):
    import yaml
    from pipeline.config import load_config
    cfg = P.AugConfig(scale=(0.3, 0.9), auto_augment=None, mixup_alpha=0.0)
    assert P.AugConfig.from_dict(cfg.to_dict()) == cfg
    assert P.AugConfig.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    cfg.save(tmp_path / "aug.yaml")
    assert load_config(P.AugConfig, tmp_path / "aug.yaml") == cfg
    assert load_config(P.AugConfig, None, ["re_prob=0.5"]).re_prob == 0.5


@pytest.mark.parametrize("field,value", [
    ("scale", (0.5, 0.1)), ("ratio", (0.0, 1.0)), ("interpolation", "cubic"), ("hflip", 1.5),
    ("re_prob", -0.1), ("re_mode", "noise"), ("std", (0.1, 0.0, 0.1)), ("mixup_alpha", -1.0),
    ("mix_prob", 2.0), ("switch_prob", -1.0), ("auto_augment", "v0"), ("auto_augment", "rand-m9-q3"),
])
def test_bad_config_names_field(field, value):
    with pytest.raises(ConfigError, match=f"^{field}:"):
        P.AugConfig(**{field: value})
    with pytest.raises(ConfigError, match="mixup_alfa"):
        P.AugConfig.from_dict({"mixup_alfa": 0.1})
