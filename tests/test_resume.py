"""Run folders over time: --resume refuses a changed meaning (naming the keys) unless forced,
accepts what may change (workers, logging, a moved dataset with the same content), says when
there is nothing to do; a fresh run does not write over another run; checkpoint retention
keeps the last run.keep_last plus best.pt.
"""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.cli import run_cli
from pipeline.config import ConfigError
from student.checkpoint import load_checkpoint, mark_best, prune_checkpoints, save_checkpoint
from student.resume import ResumeError, resume_changes
from student.train import main, train
from test_student_data import build_cache, student_config

FAST = ("data.max_batches=2", "run.eval_every=1", "optim.warmup_epochs=0")


@pytest.fixture(scope="module")
def cache(fmnist_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume_cache") / "c.zarr"
    build_cache(fmnist_shards, out, epochs=2, k=3)
    return out


def _half_run(fmnist_shards, cache, run_dir: Path, *extra: str) -> Path:
    """Epoch 1 of 2 (as if preempted); returns the config file a --resume reads."""
    cfg = student_config(fmnist_shards, cache, run_dir, "run.epochs=2", *FAST, *extra)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    cfg.save(path)
    main(["--config", str(path), "run.stop_epoch=1"])
    return path


def test_resume_refuses_a_changed_loss_unless_forced(fmnist_shards, cache, tmp_path, capsys):
    cfg_path = _half_run(fmnist_shards, cache, tmp_path / "run")
    with pytest.raises(ResumeError) as err:
        main(["--config", str(cfg_path), "--resume", "loss.tau=3.0", "model.drop_path_rate=0.1"])
    assert "loss.tau: 1.0 -> 3.0" in str(err.value) and "model.drop_path_rate: 0.0 -> 0.1" in str(err.value)
    # through the CLI helper: one line + the hint, exit 2
    capsys.readouterr()
    assert run_cli(main, "python -m student.train", ["--config", str(cfg_path), "--resume", "loss.tau=3.0"]) == 2
    err_text = capsys.readouterr().err
    assert "loss.tau: 1.0 -> 3.0" in err_text and "--force-resume" in err_text and "Traceback" not in err_text
    # run.epochs is the schedule: refused too
    with pytest.raises(ResumeError, match=r"run\.epochs: 2 -> 3"):
        main(["--config", str(cfg_path), "--resume", "run.epochs=3"])
    # --force-resume continues, saying what changed
    metrics = main(["--config", str(cfg_path), "--force-resume", "loss.tau=3.0"])
    assert metrics["train_images"] == 32
    assert "--force-resume: continuing" in capsys.readouterr().out
    assert load_checkpoint(tmp_path / "run" / "checkpoint-000002.pt")["config"]["loss"]["tau"] == 3.0


def test_resume_accepts_what_may_change_and_moved_data(fmnist_shards, cache, tmp_path, capsys):
    cfg_path = _half_run(fmnist_shards, cache, tmp_path / "run")
    moved = tmp_path / "moved"                      # the same shards elsewhere: same manifest sha256
    shutil.copytree(fmnist_shards, moved)
    main(["--config", str(cfg_path), "--resume", f"data.train={moved / 'train'}", f"data.val={moved / 'val'}",
          "run.log_every=5", "data.num_workers=1", "run.keep_last=3", "cache.poll_s=1e-1"])
    assert "resume:" in capsys.readouterr().out
    # other content under the same key is refused: another dataset (a run without a cache here,
    # since the cache guard would refuse other shards first)
    other = tmp_path / "other"
    shutil.copytree(fmnist_shards, other)
    manifest = other / "train" / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"source"', '"source_note": "edited", "source"', 1))
    cfg2 = _half_run(fmnist_shards, None, tmp_path / "run2", "loss.mode=none", "data.seed=0", "data.aug={}")
    with pytest.raises(ResumeError, match=r"data\.train points to other content \(manifest_sha256"):
        main(["--config", str(cfg2), "--resume", f"data.train={other / 'train'}"])


def test_finished_run_resumes_to_nothing_and_a_new_run_refuses_its_folder(fmnist_shards, cache, tmp_path, capsys):
    cfg = student_config(fmnist_shards, cache, tmp_path / "run", *FAST)
    train(cfg)
    capsys.readouterr()
    assert train(cfg.replace(run=cfg.run.replace(resume=True))) == {}
    assert "1/1 epochs done, nothing to run" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"already holds checkpoint-000001\.pt") as err:
        train(cfg)
    assert "--resume continues it" in err.value.hint


def test_retention_keeps_last_n_and_best(fmnist_shards, cache, tmp_path):
    run_dir = tmp_path / "run"
    train(student_config(fmnist_shards, cache, run_dir, "run.epochs=5", "run.keep_last=2", *FAST,
                         "optim.lr=3e-3"))
    kept = sorted(p.name for p in run_dir.glob("*.pt"))
    assert kept == ["best.pt", "checkpoint-000004.pt", "checkpoint-000005.pt"], kept
    with open(run_dir / "metrics.csv", newline="") as f:
        val = [(float(r["val_top1_fused"]), int(r["epoch"])) for r in csv.DictReader(f) if r.get("val_top1_fused")]
    best_value = max(v for v, _ in val)
    first_best = min(e for v, e in val if v == best_value)
    best = load_checkpoint(run_dir / "best.pt")
    assert best["epoch"] == first_best and best["best"] == {"metric": "val_top1_fused", "value": best_value,
                                                            "epoch": first_best}
    latest = load_checkpoint(run_dir / "checkpoint-000005.pt")
    assert latest["best"]["epoch"] == first_best          # carried along, so a resume keeps it


def test_prune_and_mark_best_unit(tmp_path):
    for n in range(1, 6):
        save_checkpoint(tmp_path / f"checkpoint-{n:06d}.pt", epoch=n, w=torch.full((2,), float(n)))
    mark_best(tmp_path / "checkpoint-000002.pt")
    deleted = prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in deleted] == [f"checkpoint-{n:06d}.pt" for n in (1, 2, 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "checkpoint-000004.pt", "checkpoint-000005.pt"]
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 2            # survives its numbered file
    mark_best(tmp_path / "checkpoint-000005.pt")
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 5
    with pytest.raises(ValueError, match="keep_last"):
        prune_checkpoints(tmp_path, keep_last=0)


def test_resume_changes_rules():
    base = {"model": {"name": "a", "model_kwargs": {"depth": 2}}, "data": {"num_workers": 1, "train": "x"},
            "run": {"log_every": 10, "epochs": 5, "stop_epoch": None}}
    same = {"model": {"name": "a", "model_kwargs": {"depth": 2}}, "data": {"num_workers": 4, "train": "/abs/x"},
            "run": {"log_every": 1, "epochs": 5, "stop_epoch": 3}}
    assert resume_changes(base, same) == []
    changed = {**same, "model": {"name": "a", "model_kwargs": {"depth": 3}}}
    assert resume_changes(base, changed) == ["model.model_kwargs.depth: 2 -> 3"]
    ident = {"data.train": {"manifest_sha256": "m"}, "cache.path": {"checkpoint_sha256": "t1", "k": 3}}
    other = {"data.train": {"manifest_sha256": "m"}, "cache.path": {"checkpoint_sha256": "t2", "k": 3}}
    assert resume_changes(base, same, ident, other) == ["cache.path points to other content (checkpoint_sha256 differ)"]
    assert resume_changes(base, same, ident, {**ident, "cache.path": None}) == ["cache.path: set -> none"]
