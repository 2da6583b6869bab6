"""Re-running the caching job: a resume does not depend on how paths are spelled (compared by the
manifest and checkpoint sha256 they point to); nothing left to do says so and exits 0; a real
difference is refused in one line that says which side is the run and which the cache.
"""
from __future__ import annotations

import shutil

import pytest
import torch

ray = pytest.importorskip("ray")

from teacher.cache import HINTS, PROG, main, run_job  # noqa: E402
from teacher.job import CacheJobConfig, cache_attrs, make_teacher, open_writer  # noqa: E402
from pipeline.cli import run_cli  # noqa: E402
from pipeline.manifest import load_manifest  # noqa: E402
from teacher.work import run_item  # noqa: E402
from storage import open_cache  # noqa: E402
from teacher.model import TeacherConfig, create_model  # noqa: E402
from test_cache_job import TINY_TEACHER, ray_session  # noqa: E402,F401  (the module's embedded Ray)


def test_resume_under_another_spelling_then_nothing_to_do(ray_session, fmnist_shards, tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    ckpt = tmp_path / "weights" / "teacher.pt"
    ckpt.parent.mkdir()
    torch.save(create_model(TeacherConfig(**TINY_TEACHER)).state_dict(), ckpt)
    first = CacheJobConfig.from_dict(dict(
        shards=str(fmnist_shards / "train"), out=str(tmp_path / "c.zarr"), epochs=2, views=1, k=3,
        batch_size=64, num_workers=0, actors=1, teacher={**TINY_TEACHER, "checkpoint": str(ckpt)}))
    manifest = load_manifest(first.shards)
    writer, teacher = open_writer(first, manifest, cache_attrs(first, manifest)), make_teacher(first)
    for s in range(len(manifest.shards)):              # epoch 0 done under the absolute spelling
        run_item(first, 0, s, teacher=teacher, writer=writer, manifest=manifest)

    # The same inputs spelled otherwise: shards through a symlink, relative to the cwd; the
    # checkpoint as a byte-identical copy elsewhere.
    (tmp_path / "link").symlink_to(fmnist_shards, target_is_directory=True)
    copy = tmp_path / "elsewhere.pt"
    shutil.copyfile(ckpt, copy)
    monkeypatch.chdir(tmp_path)
    other = first.replace(shards="link/train", out="c.zarr",
                          teacher=first.teacher.replace(checkpoint="elsewhere.pt"))
    summary = run_job(other, progress=False)
    assert summary["items_done_before"] == 4 and summary["items_run"] == 4 == summary["items_total"] - 4
    stored = open_cache("c.zarr").attrs["job"]
    assert stored["shards"] == str(fmnist_shards / "train") and stored["teacher"]["checkpoint"] == str(ckpt)

    # Nothing left: one line, exit 0, and summary.json keeps the figures of the run that did the work.
    before = (tmp_path / "c.zarr" / "summary.json").read_text()
    cfg_file = tmp_path / "job.yaml"
    other.save(cfg_file)
    capsys.readouterr()
    assert run_cli(main, PROG, ["--config", str(cfg_file), "--no-progress"], hints=HINTS) == 0
    assert capsys.readouterr().out == f"cache {tmp_path / 'c.zarr'}: 8/8 items done, nothing to run\n"
    assert (tmp_path / "c.zarr" / "summary.json").read_text() == before

    # A real difference (another k) is refused in one line naming both sides, and nothing is lost.
    assert run_cli(main, PROG, ["--config", str(cfg_file), "k=5"], hints=HINTS) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (f"python -m teacher.cache: error: cache {tmp_path / 'c.zarr'}: field k: "
                      "expected 5 (this run), found 3 (in the cache)")
    assert err[1].startswith("  hint: a cache resumes only under the job config that made it")
    assert open_cache("c.zarr").done_items() == {(e, s) for e in range(2) for s in range(4)}


def test_a_cache_made_before_a_config_field_existed_resumes_while_it_holds_its_default(fmnist_shards, tmp_path):
    """``teacher.pretrained`` / ``pretrained_cfg_overlay`` / ``aug.max_pixels`` came after caches
    were made: at their defaults they change nothing, so such a cache resumes; set, they are a real
    difference. (``aug.max_pixels`` is not in the plan fingerprint either: students still match.)"""
    from teacher.job import resume_attrs
    from storage import CacheMismatchError

    torch.manual_seed(0)
    ckpt = tmp_path / "teacher.pt"
    torch.save(create_model(TeacherConfig(**TINY_TEACHER)).state_dict(), ckpt)
    cfg = CacheJobConfig.from_dict(dict(shards=str(fmnist_shards / "train"), out=str(tmp_path / "c.zarr"), epochs=1,
                                        k=3, num_workers=0, teacher={**TINY_TEACHER, "checkpoint": str(ckpt)}))
    manifest = load_manifest(cfg.shards)
    older = cache_attrs(cfg, manifest)
    for added in ("pretrained", "pretrained_cfg_overlay"):
        del older["job"]["teacher"][added]
    del older["job"]["aug"]["max_pixels"], older["aug"]["max_pixels"]
    run_item(cfg, 0, 0, writer=open_writer(cfg, manifest, older), manifest=manifest)

    open_writer(cfg, manifest, resume_attrs(cfg, cache_attrs(cfg, manifest)))       # resumes
    assert "pretrained" not in open_cache(cfg.out).attrs["job"]["teacher"]
    assert "max_pixels" not in open_cache(cfg.out).attrs["aug"]
    with pytest.raises(CacheMismatchError, match="field aug"):
        lower = cfg.replace(aug=cfg.aug.replace(max_pixels=10**6))
        open_writer(lower, manifest, resume_attrs(lower, cache_attrs(lower, manifest)))
    with pytest.raises(CacheMismatchError, match="field job.teacher.compile"):       # other fields still count
        other = cfg.replace(teacher=cfg.teacher.replace(compile=True))
        open_writer(other, manifest, resume_attrs(other, cache_attrs(other, manifest)))
    tagged = cfg.replace(teacher=cfg.teacher.replace(checkpoint=None, name="regnety_002.pycls_in1k", pretrained=True,
                                                     pretrained_cfg_overlay={"file": str(ckpt), "num_classes": 10}))
    with pytest.raises(CacheMismatchError, match="field teacher: expected 'regnety_002.pycls_in1k'"):
        open_writer(tagged, manifest, resume_attrs(tagged, cache_attrs(tagged, manifest)))
