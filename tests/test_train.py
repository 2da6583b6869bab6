"""End-to-end student training on CPU (fp32, tiny teacher/student, Fashion-MNIST shards).

* cached hard == online hard, step by step (Mixup/CutMix on), and cached soft ~ online soft
  (against a trained teacher, whose soft term is ~100x the bound);
* resume: 2 epochs == 1 epoch + resume 1 (weights, EMA, optimizer, scheduler);
* DDP under torchrun with 2 gloo processes: the rows each rank recorded are disjoint and make up
  the single process's rows, a sample's views share a step, both ranks end with the same weights,
  and metrics are reduced (the loss trajectory itself differs: other images per global batch);
* one cache serves other architectures, another tau and another resolution;
* a student waits for epochs the caching job has not finished yet;
* a short real run learns.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from teacher.job import cache_attrs, make_teacher, open_writer
from pipeline.loader import LoaderConfig, split_loader
from pipeline.plan import AugConfig
from pipeline.manifest import load_manifest
from teacher.work import run_item
from student.checkpoint import load_checkpoint
from student.train import main, train
from fmnist import require_fmnist
from teacher.model import TeacherConfig, create_model
from test_student_data import AUG, TINY_TEACHER, build_cache, student_config

REPO = Path(__file__).resolve().parents[1]


def step_losses(run_dir: Path, column: str = "train_loss") -> list[float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lr")]   # per-step rows carry the lr
    return [float(r[column]) for r in rows]


@pytest.fixture(scope="module")
def cache(fmnist_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train_cache") / "tiny.zarr"
    build_cache(fmnist_shards, out, epochs=2, k=3)
    return out


def test_cached_hard_equals_online_hard(fmnist_shards, cache, tmp_path):
    """Same seed, fp32: the per-step losses of the cached and the online teacher agree."""
    common = ("data.batch_size=8", "loss.mode=hard")      # 32 steps, Mixup/CutMix + RandAugment on
    train(student_config(fmnist_shards, cache, tmp_path / "cached", *common))
    # teacher.k=3: the online teacher emulates the cache's top-3 (its default is the full distribution)
    train(student_config(fmnist_shards, cache, tmp_path / "online", *common, "teacher.mode=online", "teacher.k=3"))
    cached, live = step_losses(tmp_path / "cached"), step_losses(tmp_path / "online")
    assert len(cached) == len(live) == 32
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(live), rtol=1e-5, atol=1e-5)
    d1, d2 = step_losses(tmp_path / "cached", "train_distill"), step_losses(tmp_path / "online", "train_distill")
    torch.testing.assert_close(torch.tensor(d1), torch.tensor(d2), rtol=1e-5, atol=1e-5)


def test_online_teacher_at_another_size_scores_its_own_replay(fmnist_shards, cache, tmp_path):
    """A 35 px student with the 28 px teacher online: the loader replays the plan at 28 px for the
    teacher (as the caching job did), so online hard targets equal the cached ones step by step."""
    common = ("data.batch_size=16", "loss.mode=hard", "data.img_size=35", "data.max_batches=8")
    train(student_config(fmnist_shards, cache, tmp_path / "cached", *common))
    train(student_config(fmnist_shards, cache, tmp_path / "online", *common, "teacher.mode=online"))
    d1, d2 = step_losses(tmp_path / "cached", "train_distill"), step_losses(tmp_path / "online", "train_distill")
    assert len(d1) == 8
    torch.testing.assert_close(torch.tensor(d1), torch.tensor(d2), rtol=1e-5, atol=1e-5)


def trained_teacher_state(shards_root: Path, epochs: int = 30) -> dict:
    """The tiny teacher trained on the train split's eval transform (120 AdamW steps, ~1 s on
    CPU): train top-1 ~0.76, mean top-1 probability ~0.65, its soft targets far from uniform
    and different from row to row, which a random init's are not (its KL term is ~2e-4)."""
    torch.manual_seed(0)
    model = create_model(TeacherConfig.from_dict(TINY_TEACHER))
    aug = AugConfig.from_dict({**AUG, "enabled": False})
    lcfg = LoaderConfig(batch_size=64, out_size=28, num_workers=0)
    batches = list(split_loader(load_manifest(shards_root / "train"), aug, lcfg))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for b in batches:
            loss = torch.nn.functional.cross_entropy(model(b["image"]), b["label"])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.state_dict()


@pytest.fixture(scope="module")
def trained_cache(fmnist_shards, tmp_path_factory) -> Path:
    """A 2-epoch k=3 cache of the trained tiny teacher (the online teacher loads the same weights)."""
    out = tmp_path_factory.mktemp("trained_cache") / "tiny.zarr"
    build_cache(fmnist_shards, out, epochs=2, k=3, teacher_state=trained_teacher_state(fmnist_shards))
    return out


# The online teacher emulates the cache (teacher.k=3, same tail codes); the cache adds only its
# quantization: top-k probabilities and the tail mass on storage/encoding.py's grid (|dp| <= 1/320
# for p >= 1/8, relative 2.5% below). With the trained teacher the soft term (alpha=0.5, tau=2,
# DeiT's /(B*C) normalisation) is 0.13-0.20 per step (mean 0.17) and the largest cached-vs-online
# gap of that term over the 32 steps is 5.5e-4 (mean 2.5e-4; measured on CPU, torch 2.15). The
# bound sits 3.6x above that gap and 25x below the smallest term the test accepts: a zeroed term
# fails SOFT_TERM_MIN; cached targets joined one row off give a gap of 1.7e-2. lr 3e-3 because a
# student whose output does not yet depend on its input scores the batch-mean KL the same
# whichever row got which target (at lr 1e-3 the off-by-one gap was only 6.8e-3).
SOFT_BOUND = 2e-3
SOFT_TERM_MIN = 25 * SOFT_BOUND


def test_cached_soft_close_to_online_soft(fmnist_shards, trained_cache, tmp_path):
    """Cached soft targets ~ the online teacher's, step by step, on a term large enough to tell."""
    common = ("data.batch_size=8", "loss.mode=soft", "loss.tau=2.0", "optim.lr=3.0e-3")
    train(student_config(fmnist_shards, trained_cache, tmp_path / "cached", *common))
    train(student_config(fmnist_shards, trained_cache, tmp_path / "online", *common,
                         "teacher.mode=online", "teacher.k=3"))
    term = {run: torch.tensor(step_losses(tmp_path / run, "train_distill")) for run in ("cached", "online")}
    loss = {run: torch.tensor(step_losses(tmp_path / run)) for run in ("cached", "online")}
    assert len(term["cached"]) == len(term["online"]) == 32
    for run, t in term.items():
        assert t.min() >= SOFT_TERM_MIN, f"{run}: soft term {t.min():.2e} too small to check against {SOFT_BOUND}"
    gap = (term["cached"] - term["online"]).abs().max()
    assert gap <= SOFT_BOUND, f"cached vs online soft term: largest gap {gap:.2e} > {SOFT_BOUND}"
    assert (loss["cached"] - loss["online"]).abs().max() <= SOFT_BOUND


def test_resume_is_exact(fmnist_shards, cache, tmp_path):
    """2 epochs in one go == 1 epoch + --resume for the 2nd (drop path + EMA on)."""
    _check_exact_resume(fmnist_shards, cache, tmp_path, "cpu")


@pytest.mark.gpu
def test_resume_is_exact_on_gpu(fmnist_shards, cache, tmp_path):
    """The same on CUDA: drop path draws from the GPU's RNG, which the checkpoint must hold."""
    ckpt = _check_exact_resume(fmnist_shards, cache, tmp_path, "cuda")
    assert len(ckpt["rng"]["cuda"]) == torch.cuda.device_count()


def _check_exact_resume(fmnist_shards, cache, tmp_path, device: str) -> dict:
    opts = ("run.epochs=2", "optim.ema=true", "optim.ema_decay=0.9", "model.drop_path_rate=0.1",
            "optim.warmup_epochs=1", "data.max_batches=6", "run.eval_every=0", "data.val=null",
            f"run.device={device}")
    train(student_config(fmnist_shards, cache, tmp_path / "full", *opts))
    half = student_config(fmnist_shards, cache, tmp_path / "split", *opts)
    half.save(tmp_path / "split.yaml")
    main(["--config", str(tmp_path / "split.yaml"), "run.stop_epoch=1"])    # as if preempted after epoch 1
    main(["--config", str(tmp_path / "split.yaml"), "--resume"])
    a = load_checkpoint(tmp_path / "full" / "checkpoint-000002.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint-000002.pt")
    assert (a["epoch"], a["step"], a["update"]) == (b["epoch"], b["step"], b["update"]) == (2, 12, 12)
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f"{key}.{name} differs after resume"
    assert a["scheduler"] == b["scheduler"]
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert step_losses(tmp_path / "full") == step_losses(tmp_path / "split")
    assert set(a["rng"]) == ({"cpu", "cuda"} if device == "cuda" else {"cpu"})
    return a


@pytest.fixture(scope="module")
def cache3(fmnist_shards, tmp_path_factory) -> Path:
    """1 cache epoch x 3 views (repeated augmentation), k=3."""
    out = tmp_path_factory.mktemp("train_cache3") / "tiny3.zarr"
    build_cache(fmnist_shards, out, epochs=1, views=3, k=3)
    return out


def _audit(run_dir: Path, rank: int) -> tuple[dict, dict[int, list[tuple[int, int, int, int]]]]:
    """(rank-<r>.json, {epoch: [(step, cache_epoch, sample_id, view)]}) that the run wrote."""
    info = json.loads((run_dir / f"rank-{rank}.json").read_text())
    rows: dict[int, list] = {}
    with open(run_dir / f"rank-{rank}.csv", newline="") as f:
        for r in csv.DictReader(f):
            rows.setdefault(int(r["epoch"]), []).append(
                (int(r["step"]), int(r["cache_epoch"]), int(r["sample_id"]), int(r["view"])))
    return info, rows


def test_ddp_reads_the_same_rows_and_reduces_metrics(fmnist_shards, cache3, tmp_path):
    """torchrun --nproc_per_node 2 (gloo) at a real learning rate, on a 3-view cache.

    What the run itself recorded (``run.rank_audit``): it ran with 2 ranks; every epoch the two
    ranks trained on disjoint rows whose union is exactly the single process's rows; the views of
    a sample sat in one optimizer step (on the two ranks, as RASampler places them); after
    training both ranks hold identical weights (DDP's all-reduce). The loss trajectories are not
    equal step by step (a global batch holds other images than the single process's batch).
    """
    from student.data import make_val_loader, open_checked_cache
    from student.evaluate import evaluate
    from student.models import build_student

    opts = ["data.batch_size=32", "optim.lr=1.0e-3", "run.epochs=2", "run.eval_every=1", "run.rank_audit=true"]
    single = student_config(fmnist_shards, cache3, tmp_path / "single", *opts)
    plan = open_checked_cache(single, load_manifest(single.data.train))[1]
    cfg_path = tmp_path / "ddp.yaml"
    single.replace(run=single.run.replace(out=str(tmp_path / "ddp"))).save(cfg_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "student.train", "--config", str(cfg_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train(single)

    (one_info, one), (info0, r0), (info1, r1) = _audit(tmp_path / "single", 0), *(_audit(tmp_path / "ddp", r) for r in (0, 1))
    assert one_info["world_size"] == 1 and info0["world_size"] == info1["world_size"] == 2
    assert info0["weights_sha256"] == info1["weights_sha256"] != one_info["weights_sha256"]
    for epoch in (0, 1):
        a, b = ({row[1:] for row in r[epoch]} for r in (r0, r1))
        assert len(a) == len(r0[epoch]) and len(b) == len(r1[epoch]) and abs(len(a) - len(b)) <= 1
        assert not a & b and a | b == {row[1:] for row in one[epoch]} and len(a | b) == 256
        steps: dict = {}
        for r in (r0, r1):
            for step, _, sid, _ in r[epoch]:
                steps.setdefault(sid, []).append(step)
        whole = [s for s in steps.values() if len(s) == 3]
        assert len(whole) > 70 and sum(len(set(s)) == 1 for s in whole) / len(whole) >= 0.9
    for run in ("single", "ddp"):
        epochs = _epoch_rows(tmp_path / run)
        assert [float(r["train_images"]) for r in epochs] == [256.0, 256.0]   # reduced over ranks
    # the same number of steps: 2 epochs x 256 / 32 (only rank 0 writes step rows)
    assert len(step_losses(tmp_path / "ddp")) == len(step_losses(tmp_path / "single")) == 2 * 256 // 32
    # val metrics are reduced over the ranks' disjoint halves: re-evaluating the DDP checkpoint
    # in one process over the whole val split gives the very same figure
    ckpt = load_checkpoint(tmp_path / "ddp" / "checkpoint-000002.pt")
    model = build_student(single.model.name, 10, single.data.img_size, 0.0, single.model.model_kwargs)
    model.load_state_dict(ckpt["model"])
    whole = evaluate(model, make_val_loader(single, plan.aug), "cpu")
    assert abs(whole["top1_fused"] - float(_epoch_rows(tmp_path / "ddp")[-1]["val_top1_fused"])) < 1e-6


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _epoch_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("train_images")]


@pytest.mark.parametrize("overrides", [
    ("loss.mode=hard",),                                                           # DeiT, dist token
    ("model.name=vit_tiny_patch16_224", "loss.mode=soft", "loss.tau=3.0", "loss.alpha=0.1"),  # no dist token
    ("data.img_size=35", "loss.mode=soft"),                                        # other resolution
    ("model.name=resnet10t", "model.model_kwargs={}", "loss.mode=hard"),          # a convnet
])
def test_one_cache_serves_many_students(fmnist_shards, cache, tmp_path, overrides):
    metrics = train(student_config(fmnist_shards, cache, tmp_path, "data.max_batches=4", *overrides))
    assert metrics["train_images"] == 64 and torch.isfinite(torch.tensor(metrics["train_loss"]))
    assert 0.0 <= metrics["val_top1_fused"] <= 100.0


def test_waits_for_epochs_still_being_cached(fmnist_shards, tmp_path, capsys, monkeypatch):
    """Epoch 1 is not cached when training starts; a thread caches it once the student waits."""
    from storage import CacheReader

    out = tmp_path / "partial.zarr"
    job = build_cache(fmnist_shards, out, items=[(0, s) for s in range(4)])
    waiting = threading.Event()
    wait_done = CacheReader.wait_done

    def noting_wait(self, *args, **kwargs):
        waiting.set()
        return wait_done(self, *args, **kwargs)

    monkeypatch.setattr(CacheReader, "wait_done", noting_wait)

    def finish_epoch_1():
        waiting.wait(timeout=120)   # (if the student never waits, the assertions below say so)
        time.sleep(0.5)
        manifest = load_manifest(job.shards)
        writer = open_writer(job, manifest, cache_attrs(job, manifest))
        teacher = make_teacher(job)
        for s in range(len(manifest.shards)):
            run_item(job, 1, s, teacher=teacher, writer=writer, manifest=manifest)

    marker = threading.Thread(target=finish_epoch_1)
    marker.start()
    try:
        metrics = train(student_config(fmnist_shards, out, tmp_path / "run", "run.epochs=2", "cache.wait=true",
                                       "cache.poll_s=0.1", "cache.timeout_s=60", "data.max_batches=4"))
    finally:
        marker.join()
    assert metrics["train_images"] == 64
    out = capsys.readouterr().out
    assert "waiting for teacher cache" in out and "epoch 1 shard" in out, out[-2000:]


def test_short_fmnist_run_learns(tmp_path):
    """1 536 Fashion-MNIST images, 6 epochs (~15 s), tiny DeiT: val top-1 far above the 10% of chance."""
    from pipeline.make_shards import main as make_shards

    fm = require_fmnist()
    root = tmp_path / "fm"
    make_shards(["fmnist", "--out", str(root), "--dir", fm, "--limit-train", "1536", "--limit-val", "500",
                 "--shard-size", "256"])
    light = {"scale": [0.6, 1.0], "auto_augment": None, "re_prob": 0.0, "mixup_alpha": 0.0, "cutmix_alpha": 0.0,
             "hflip": 0.5}
    cache_path = tmp_path / "fm.zarr"
    build_cache(root, cache_path, epochs=1, k=1, aug=light)
    cfg = student_config(root, cache_path, tmp_path / "run", "loss.mode=none", "run.epochs=6", "run.eval_every=0",
                         "data.batch_size=32", "optim.lr=2.0e-3", "optim.warmup_epochs=1", "loss.label_smoothing=0.0",
                         "run.log_every=10", "run.plot=true",
                         "model.model_kwargs={patch_size: 7, embed_dim: 64, depth: 2, num_heads: 4}")
    metrics = train(cfg)
    assert metrics["val_top1_fused"] > 45.0, metrics    # measured ~58 %; chance is 10 %
    assert (tmp_path / "run" / "curves.png").exists() and (tmp_path / "run" / "config.yaml").exists()


def test_finetune_at_higher_resolution(fmnist_shards, cache, tmp_path):
    """A 28 px checkpoint fine-tunes at 42 px (4x4 -> 6x6 patch grid, pos-embed interpolated)."""
    train(student_config(fmnist_shards, cache, tmp_path / "base", "data.max_batches=2", "data.val=null"))
    ckpt = tmp_path / "base" / "checkpoint-000001.pt"
    metrics = train(student_config(fmnist_shards, cache, tmp_path / "ft", "data.max_batches=2", "data.img_size=42",
                                   f"model.checkpoint={ckpt}"))
    weights = load_checkpoint(tmp_path / "ft" / "checkpoint-000001.pt")["model"]
    assert weights["pos_embed"].shape[1] == 2 + 36 and metrics["train_images"] == 32


def test_non_finite_loss_names_the_step():
    from student.loop import LoopParts, LoopState, Precision, StepConfig, train_epoch

    model = torch.nn.Linear(4, 3)
    batch = {"image": torch.randn(2, 4), "target": torch.full((2, 3), 1 / 3)}

    def nan_loss(outputs, target, teacher):
        return {"loss": outputs.sum() * float("nan"), "base": outputs.sum(), "distill": outputs.sum()}

    state = LoopState(epoch=3, step=41)
    with pytest.raises(FloatingPointError, match="epoch 3 step 41"):
        parts = LoopParts(model, nan_loss, lambda b: None, torch.optim.SGD(model.parameters(), 0.1), Precision(),
                          torch.device("cpu"))
        train_epoch(parts, StepConfig(num_batches=1), [dict(batch)], state)
