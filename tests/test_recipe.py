"""DeiT's recipe: README's table equals ``student.recipe``; the options that give DeiT's exact
behaviour (per-epoch lr stepping, fp16 + scaler, DeiT's eval resize, drop_last) do what DeiT does."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.scheduler import CosineLRScheduler
from torchvision import transforms

from pipeline.config import ConfigError, load_config
from pipeline.plan import AugConfig, augment, fingerprint, sample_params
from pipeline.manifest import load_manifest
from student.config import TrainConfig
from student.data import TrainData, make_val_loader, resolve_plan
from student.loop import precision_choice, resolve_precision
from student.optim import build_scheduler, end_epoch, lr_of_update
from student.recipe import (README_CONFIG, markdown_table, readme_rows, recipe_inputs, recipe_rows)

REPO = Path(__file__).resolve().parents[1]
ELEMENTS = ["optimizer", "lr rule", "warmup", "schedule", "lr stepping", "weight decay", "drop path",
            "label smoothing", "RandomResizedCrop", "flip", "RandAugment", "random erasing", "Mixup/CutMix",
            "repeated augmentation", "EMA", "AMP dtype", "distillation loss", "eval transform", "drop_last",
            "EXIF orientation"]
DEIT_OPTIONS = ["optim.lr_step=epoch", "run.amp=fp16", "data.eval_resize=deit", "data.drop_last=true"]


def _cfg(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, REPO / README_CONFIG, list(overrides))


# --- the table ---------------------------------------------------------------------------------

def test_readme_table_is_the_function_output():
    text = (REPO / "README.md").read_text()
    found = re.search(r"<!-- recipe-table -->\n(.*?)\n<!-- /recipe-table -->", text, re.S)
    assert found, "README.md lost its recipe table markers"
    assert found.group(1) == markdown_table(readme_rows()), \
        "README's recipe table differs from student/recipe.py: paste `python -m student.recipe`'s output"


def test_rows_cover_deits_recipe_and_say_why():
    rows = readme_rows()
    assert [r.element for r in rows] == ELEMENTS
    for r in rows:
        assert r.deit and r.kdcache and r.note and r.option, r
    unequal = {r.element for r in rows if not r.equal}
    # The README config is DeiT-S's: only the documented differences remain.
    assert unequal == {"lr stepping", "AMP dtype", "eval transform", "drop_last", "EXIF orientation", "Mixup/CutMix"}


def test_each_student_option_gives_deits_behaviour():
    aug = AugConfig(exif_transpose=False)
    base = {r.element: r.equal for r in recipe_rows(_cfg(), aug, 3)}
    deit = {r.element: r.equal for r in recipe_rows(_cfg(*DEIT_OPTIONS), aug, 3)}
    assert not any(base[e] for e in ("lr stepping", "AMP dtype", "eval transform", "drop_last"))
    assert all(deit[e] for e in ELEMENTS if e != "Mixup/CutMix")   # the one departure with no option
    # and the rows follow the config: a changed value is reported as different
    changed = {r.element: r.equal for r in recipe_rows(
        _cfg("optim.weight_decay=0.1", "data.sampler=one_view", "loss.mode=none"), AugConfig(re_prob=0.5), 3)}
    assert not changed["weight decay"] and not changed["repeated augmentation"]
    assert not changed["distillation loss"] and not changed["random erasing"]


def test_recipe_inputs_without_a_cache_yet(tmp_path):
    aug, views, where = recipe_inputs(_cfg(f"cache.path={tmp_path / 'absent.zarr'}"))
    assert aug == AugConfig() and views == 1 and "no cache" in where


def test_options_are_validated():
    for bad, key in (("optim.lr_step=batch", "optim.lr_step"), ("data.eval_resize=resize", "data.eval_resize")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            _cfg(bad)


# --- lr stepping -------------------------------------------------------------------------------

def _deit_lrs(epochs, updates, warmup, lr, warmup_lr, min_lr):
    """DeiT's main.py on timm's scheduler, literally: built in epochs, step(epoch) after each epoch."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = CosineLRScheduler(opt, t_initial=epochs, lr_min=min_lr, warmup_lr_init=warmup_lr, warmup_t=warmup,
                              cycle_limit=1, t_in_epochs=True)
    out = []
    for epoch in range(epochs):
        out += [opt.param_groups[0]["lr"]] * updates
        sched.step(epoch)
    return out


def _our_lrs(lr_step, epochs, updates, warmup, lr, warmup_lr, min_lr):
    """student.loop's calls: step_update after each update, end_epoch after each epoch."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = build_scheduler(opt, epochs, updates, warmup, min_lr, warmup_lr, "cosine", lr_step)
    out, update = [], 0
    for epoch in range(epochs):
        for _ in range(updates):
            out.append(opt.param_groups[0]["lr"])
            update += 1
            sched.step_update(num_updates=update)
        end_epoch(sched, epoch, lr_step)
    return out


def test_per_epoch_lr_stepping_is_deits():
    args = (12, 7, 3, 1e-3, 1e-6, 1e-5)
    deit = _deit_lrs(*args)
    ours = _our_lrs("epoch", *args)
    assert ours == pytest.approx(deit, rel=1e-12)
    # one epoch late: epochs 0 and 1 at the warmup lr; epoch e + 1 starts where the per-update
    # schedule (the default) starts epoch e
    assert deit[0] == deit[13] == pytest.approx(1e-6) and deit[14] > 1e-6
    per_update = _our_lrs("update", *args)
    assert per_update != pytest.approx(deit)
    assert [deit[7 * (e + 1)] for e in range(11)] == pytest.approx([per_update[7 * e] for e in range(11)], rel=1e-12)
    assert len(set(per_update[7:14])) == 7 and len(set(deit[7:14])) == 1  # per update: moves within an epoch
    # the dry run's landmarks come from the same rule
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    for step in ("epoch", "update"):
        sched = build_scheduler(opt, 12, 7, 3, 1e-5, 1e-6, "cosine", step)
        want = deit if step == "epoch" else per_update
        assert [lr_of_update(sched, opt, t, 7, step) for t in range(84)] == pytest.approx(want, rel=1e-12)


# --- precision ---------------------------------------------------------------------------------

def test_precision_choice():
    assert precision_choice("auto", "cuda") == (torch.bfloat16, False)
    assert precision_choice("auto", "cpu") == (None, False)
    assert precision_choice("bf16", "cuda") == (torch.bfloat16, False)
    assert precision_choice("fp16", "cuda") == (torch.float16, True)   # DeiT: autocast + NativeScaler
    assert precision_choice("none", "cuda") == (None, False)
    with pytest.raises(ValueError, match="run.amp"):
        precision_choice("fp8", "cuda")
    p = resolve_precision("fp16", torch.device("cpu"))
    assert p.dtype == torch.float16 and isinstance(p.scaler, torch.amp.GradScaler)
    assert resolve_precision("bf16", torch.device("cpu")).scaler is None


# --- eval transform ----------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(500, 375), (375, 500), (333, 333), (640, 427), (97, 301)])
def test_deit_eval_resize_is_torchvisions(size):
    rng = np.random.default_rng(size[0])
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    aug = AugConfig(enabled=False, eval_resize="deit")
    ours = augment(img, sample_params(aug, 0, 0, 0, 0, img.size), 224, aug)
    deit = transforms.Compose([transforms.Resize(int(224 / 0.875), interpolation=transforms.InterpolationMode.BICUBIC),
                               transforms.CenterCrop(224)])(img)
    np.testing.assert_array_equal(ours, np.asarray(deit))


def test_eval_resize_changes_no_training_fingerprint(fmnist_shards, tmp_path):
    train = AugConfig()
    assert fingerprint(train) == fingerprint(AugConfig(eval_resize="deit"))
    assert fingerprint(AugConfig(enabled=False)) != fingerprint(AugConfig(enabled=False, eval_resize="deit"))
    cfg = load_config(TrainConfig, None, [f"data.train={fmnist_shards / 'train'}", f"data.val={fmnist_shards / 'val'}",
                                          "data.seed=0", "data.aug={}", "loss.mode=none", "data.eval_resize=deit",
                                          "data.num_workers=0"])
    loader = make_val_loader(cfg, resolve_plan(cfg, None).aug)
    assert loader.aug.eval_resize == "deit" and not loader.aug.enabled


# --- drop_last ---------------------------------------------------------------------------------

@pytest.mark.parametrize("drop_last, steps", [(False, 6), (True, 5)])
def test_drop_last_yields_full_batches_only(fmnist_shards, drop_last, steps):
    cfg = load_config(TrainConfig, None, [f"data.train={fmnist_shards / 'train'}", "data.seed=0",
                                          "data.aug={auto_augment: null}", "loss.mode=none", "data.batch_size=48",
                                          "data.num_workers=0", f"data.drop_last={str(drop_last).lower()}"])
    manifest = load_manifest(cfg.data.train)  # 256 rows: 5 x 48 + 16
    data = TrainData(cfg, manifest, resolve_plan(cfg, None), None)
    sizes = [len(b["label"]) for b in data.batches(0)]
    assert data.num_batches() == steps == len(sizes)
    assert sizes == ([48] * 5 if drop_last else [48] * 5 + [16])


def test_drop_last_with_no_full_batch_names_the_rows(fmnist_shards):
    cfg = load_config(TrainConfig, None, [f"data.train={fmnist_shards / 'train'}", "data.seed=0", "data.aug={}",
                                          "loss.mode=none", "data.batch_size=512", "data.drop_last=true"])
    data = TrainData(cfg, load_manifest(cfg.data.train), resolve_plan(cfg, None), None)
    with pytest.raises(ValueError, match=r"256 rows .* batch of\s+512"):
        data.num_batches()


def test_training_steps_the_lr_as_deit_and_resumes_so(fmnist_shards, tmp_path):
    """student.train with optim.lr_step=epoch: the per-step lr of metrics.csv is DeiT's loop's, also
    across a --resume at an epoch boundary (the optimizer state carries the lr set by end_epoch)."""
    import csv
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_student_data import student_config
    from student.train import main, train

    opts = ("data.seed=0", "data.aug={auto_augment: null}", "loss.mode=none", "data.val=null", "run.epochs=3",
            "data.max_batches=2", "optim.warmup_epochs=1", "optim.lr_step=epoch", "run.eval_every=0")

    def lrs(run_dir):
        with open(run_dir / "metrics.csv", newline="") as f:
            return [float(r["lr"]) for r in csv.DictReader(f) if r.get("lr")]

    train(student_config(fmnist_shards, None, tmp_path / "full", *opts))
    assert lrs(tmp_path / "full") == pytest.approx(_deit_lrs(3, 2, 1, 1e-3, 1e-6, 1e-4), rel=1e-9)
    student_config(fmnist_shards, None, tmp_path / "split", *opts).save(tmp_path / "split.yaml")
    main(["--config", str(tmp_path / "split.yaml"), "run.stop_epoch=2"])
    main(["--config", str(tmp_path / "split.yaml"), "--resume"])
    assert lrs(tmp_path / "split") == lrs(tmp_path / "full")
