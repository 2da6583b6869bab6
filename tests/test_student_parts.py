"""Student building blocks: models, optim/schedule/EMA, checkpoint, evaluate, metrics."""
import csv
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from student.checkpoint import (
    CheckpointError,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    restore,
    rng_state,
    save_checkpoint,
)
from student.evaluate import evaluate
from student.metrics import MetricsLogger, plot_curves
from student.models import build_student, eval_heads, is_distilled, load_for_finetune
from student.optim import build_ema, build_optimizer, build_scheduler, scaled_lr

TINY = dict(patch_size=4, embed_dim=96, depth=4, num_heads=3)
DEIT = "deit_tiny_distilled_patch16_224"


def _tiny(img_size=32, num_classes=10):
    torch.manual_seed(0)
    return build_student(DEIT, num_classes, img_size, model_kwargs=TINY)


# --- models -------------------------------------------------------------------------------

def test_distilled_deit_train_tuple_eval_fused():
    model = _tiny()
    assert is_distilled(model)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    cls, dist = model(x)
    assert cls.shape == dist.shape == (2, 10)
    model.eval()
    with torch.no_grad():
        fused = model(x)
        heads = eval_heads(model, x)
    assert torch.is_tensor(fused) and fused.shape == (2, 10)
    torch.testing.assert_close(heads["fused"], fused)
    torch.testing.assert_close(heads["fused"], (heads["cls"] + heads["dist"]) / 2)


def test_non_distilled_heads():
    model = build_student("deit_tiny_patch16_224", 10, 32, model_kwargs=TINY).eval()
    assert not is_distilled(model)
    heads = eval_heads(model, torch.randn(2, 3, 32, 32))
    assert set(heads) == {"cls", "fused"} and heads["cls"] is heads["fused"]
    convnet = build_student("resnet18", 10, 32)  # no img_size kwarg for convnets
    assert convnet(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_load_for_finetune_32_to_48(tmp_path):
    small = _tiny(32)
    big = build_student(DEIT, 10, 48, model_kwargs=TINY)
    assert small.pos_embed.shape[1] == 2 + 8 * 8 and big.pos_embed.shape[1] == 2 + 12 * 12
    result = load_for_finetune(big, small.state_dict())
    assert result["reinitialised"] == [] and len(result["loaded"]) == len(big.state_dict())
    assert result["resized"] == {"pos_embed": ((1, 2 + 8 * 8, 96), (1, 2 + 12 * 12, 96))}
    torch.testing.assert_close(big.pos_embed[:, :2], small.pos_embed[:, :2])  # prefix tokens kept
    torch.testing.assert_close(big.blocks[0].attn.qkv.weight, small.blocks[0].attn.qkv.weight)
    big.eval()
    assert big(torch.randn(1, 3, 48, 48)).shape == (1, 10)
    # Through build_student(checkpoint=...) with a new class count: heads are re-initialised.
    save_checkpoint(tmp_path / "c.pt", model=small)
    other = build_student(DEIT, 5, 48, model_kwargs=TINY, checkpoint=str(tmp_path / "c.pt"))
    torch.testing.assert_close(other.patch_embed.proj.weight, small.patch_embed.proj.weight)
    assert other.head.out_features == 5


# --- optim --------------------------------------------------------------------------------

def test_scaled_lr():
    assert scaled_lr(5e-4, 1024) == pytest.approx(1e-3)
    assert scaled_lr(5e-4, 128, accum_steps=4) == pytest.approx(5e-4)
    assert scaled_lr(5e-4, 1024, base_batch=256) == pytest.approx(2e-3)   # optim.base_batch


def test_optimizer_no_decay_on_norm_and_bias():
    model = _tiny()
    opt = build_optimizer(model, "adamw", lr=1e-3, weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW)
    by_wd = {g["weight_decay"]: sum(p.numel() for p in g["params"]) for g in opt.param_groups}
    assert set(by_wd) == {0.0, 0.05}
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert id(model.blocks[0].norm1.weight) in no_decay and id(model.head.bias) in no_decay
    assert id(model.blocks[0].attn.qkv.weight) not in no_decay


def test_scheduler_warmup_then_cosine():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, epochs=10, updates_per_epoch=10, warmup_epochs=2, min_lr=0.01, warmup_lr=0.1)
    lrs = []
    for t in range(100):
        sched.step_update(t)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.1)
    warm = lrs[:20]
    assert all(b > a for a, b in zip(warm, warm[1:]))  # linear warmup over 2 epochs
    assert lrs[10] == pytest.approx(0.1 + (1.0 - 0.1) * 10 / 20)
    # After warmup: cosine from 1.0 to min_lr over the 10 epochs (timm: t counted from 0).
    for t in (20, 50, 80, 99):
        want = 0.01 + 0.5 * (1.0 - 0.01) * (1 + math.cos(math.pi * t / 100))
        assert lrs[t] == pytest.approx(want, rel=1e-6)
    assert all(b <= a for a, b in zip(lrs[20:], lrs[21:]))


# --- checkpoint ---------------------------------------------------------------------------

def _train_steps(model, opt, sched, ema, n, start=0):
    torch.manual_seed(1)
    for t in range(start, start + n):
        cls, dist = model(torch.randn(2, 3, 32, 32))
        (cls.sum() + dist.sum()).backward()
        opt.step()
        opt.zero_grad()
        sched.step_update(t + 1)
        ema.update(model, step=t + 1)


def test_checkpoint_round_trip(tmp_path):
    model = _tiny()
    opt = build_optimizer(model, lr=1e-3)
    sched = build_scheduler(opt, epochs=4, updates_per_epoch=3, warmup_epochs=1)
    ema = build_ema(model, decay=0.9)
    _train_steps(model, opt, sched, ema, 3)
    path = save_checkpoint(
        checkpoint_path(tmp_path, 1), model=model, optimizer=opt, scheduler=sched, ema=ema,
        epoch=1, step=3, data={"epoch": 1, "batches_done": 0},
    )
    assert latest_checkpoint(tmp_path) == path
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no leftover temp file

    state = load_checkpoint(path)
    model2 = _tiny()
    opt2 = build_optimizer(model2, lr=1e-3)
    sched2 = build_scheduler(opt2, epochs=4, updates_per_epoch=3, warmup_epochs=1)
    ema2 = build_ema(model2, decay=0.9)
    restore(state, path, model=model2, optimizer=opt2, scheduler=sched2, ema=ema2)
    assert state["epoch"] == 1 and state["step"] == 3 and state["data"]["batches_done"] == 0
    for a, b in zip(ema.module.parameters(), ema2.module.parameters()):
        torch.testing.assert_close(a, b)
    # Continuing both runs gives identical weights (optimizer moments and lr restored).
    _train_steps(model, opt, sched, ema, 2, start=3)
    _train_steps(model2, opt2, sched2, ema2, 2, start=3)
    for a, b in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(a, b)
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]

    save_checkpoint(checkpoint_path(tmp_path, 2), epoch=2)
    assert latest_checkpoint(tmp_path).name == "checkpoint-000002.pt"


def test_checkpoint_errors_name_the_file(tmp_path):
    assert latest_checkpoint(tmp_path / "absent") is None
    with pytest.raises(CheckpointError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="optimizer"):
        restore({"model": {}}, bad, optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1))


class _Payload:
    """Unpickling this runs code: it creates ``marker`` (what a hostile checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_load_checkpoint_refuses_a_pickle_payload_without_running_it(tmp_path):
    marker = tmp_path / "payload_ran"
    hostile = tmp_path / "hostile.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "epoch": 1, "extra": _Payload(marker)}, hostile)
    legacy = tmp_path / "legacy.pt"  # the pre-zip torch format: a bare pickle stream
    torch.save({"model": {"w": torch.zeros(2)}, "extra": _Payload(marker)}, legacy,
               _use_new_zipfile_serialization=False)
    for path in (hostile, legacy):
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        assert not marker.exists(), f"loading {path.name} ran the payload"
        msg = str(err.value)
        assert str(path) in msg and "refused" in msg and "\n" not in msg
    # the payload is real: full unpickling runs it (what load_checkpoint never does)
    torch.load(hostile, weights_only=False)
    assert marker.exists()


def test_save_checkpoint_stores_only_allowlisted_types(tmp_path):
    with pytest.raises(CheckpointError, match=r"c\.pt: state\['data'\]\['when'\] is a pathlib"):
        save_checkpoint(tmp_path / "c.pt", epoch=1, data={"when": Path("/x")})
    assert not list(tmp_path.iterdir())  # nothing written, not even a temp file
    model = _tiny()
    save_checkpoint(tmp_path / "ok.pt", model=model, optimizer=build_optimizer(model, lr=1e-3), rng=rng_state(),
                    config={"a": [1, 2.5, None, "s"]}, size=torch.Size([2]))
    assert load_checkpoint(tmp_path / "ok.pt")["config"] == {"a": [1, 2.5, None, "s"]}


# --- evaluate -----------------------------------------------------------------------------

class _FixedHeads(nn.Module):
    """Distilled-looking model whose heads output fixed logits per sample (feature = index)."""

    def __init__(self, cls_logits, dist_logits):
        super().__init__()
        self.cls_logits, self.dist_logits = cls_logits, dist_logits
        self.head = nn.Identity()
        self.head_dist = nn.Identity()
        self.head_drop = nn.Identity()

    def set_distilled_training(self, enable=True):
        pass

    def forward_features(self, idx):
        return torch.stack([self.cls_logits[idx], self.dist_logits[idx]], dim=1)


def test_evaluate_top1_top5_per_head():
    c = 6
    labels = torch.tensor([0, 1, 2, 3])
    cls = torch.tensor([
        [9, 1, 0, 0, 0, 0],  # top-1 right
        [9, 0, 8, 7, 6, 5],  # label 1 ranked last: top-5 wrong
        [9, 0, 8, 0, 0, 0],  # label 2 second: top-5 right
        [0, 0, 0, 9, 0, 0],  # right
    ], dtype=torch.float)
    # Ranking 1, 0, 2, 3, 4, 5 for every sample: top-1 right only for sample 1, top-5 always.
    dist = torch.tensor([4.0, 5, 3, 2, 1, 0]).expand(4, c)
    model = _FixedHeads(cls, dist)
    loader = [
        {"image": torch.tensor([0, 1]), "label": labels[:2], "sample_id": torch.tensor([10, 11])},
        {"image": torch.tensor([2, 3]), "label": labels[2:], "sample_id": torch.tensor([12, 13])},
    ]
    r = evaluate(model, loader, "cpu", return_predictions=True)
    assert r["num_samples"] == 4
    assert r["top1_cls"] == 50.0 and r["top5_cls"] == 75.0
    assert r["top1_dist"] == 25.0 and r["top5_dist"] == 100.0
    fused = (cls + dist) / 2
    assert r["top1_fused"] == 100.0 * float((fused.argmax(-1) == labels).float().mean())
    want_loss = float(nn.functional.cross_entropy(fused, labels))
    assert r["loss"] == pytest.approx(want_loss, rel=1e-6)
    p = r["predictions"]
    assert p["sample_id"].tolist() == [10, 11, 12, 13]
    assert p["cls"].tolist() == [0, 0, 0, 3] and p["dist"].tolist() == [1, 1, 1, 1]


def test_evaluate_real_tiny_model_restores_train_mode():
    model = _tiny().train()
    loader = [{"image": torch.randn(3, 3, 32, 32), "label": torch.tensor([0, 1, 2]), "sample_id": torch.arange(3)}]
    r = evaluate(model, loader, "cpu")
    assert model.training
    ema_r = evaluate(build_ema(model, 0.9), loader, "cpu")  # wrappers are unwrapped
    assert "top1_dist" in ema_r
    assert {"top1_cls", "top1_dist", "top1_fused", "top5_fused", "loss"} <= set(r)


# --- metrics ------------------------------------------------------------------------------

def test_metrics_csv_resume_and_plot(tmp_path):
    log = MetricsLogger(tmp_path)
    for step in range(1, 6):
        log.log(step, 0, train_loss=1.0 / step, lr=1e-3 * step)
    log.log(5, 1, top1_cls=40.0, top1_dist=42.0, top1_fused=45.0)  # new columns mid-run
    log.close()
    # Resume from step 3: rows logged after the checkpoint are dropped, header kept.
    log = MetricsLogger(tmp_path, resume_step=3)
    log.log(4, 0, train_loss=0.2, lr=4e-3)
    log.close()
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert list(rows[0]) == ["step", "epoch", "train_loss", "lr", "top1_cls", "top1_dist", "top1_fused"]
    assert (tmp_path / "tb").is_dir() and any((tmp_path / "tb").iterdir())
    plot_curves(tmp_path / "metrics.csv", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    MetricsLogger(tmp_path / "rank1", enabled=False).log(1, 0, loss=1.0)
    assert not (tmp_path / "rank1").exists()
