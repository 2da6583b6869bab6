"""Weights the timm way (``teacher.pretrained`` / ``model.pretrained``), offline.

Every test runs with ``HF_HUB_OFFLINE=1`` and ``HF_HOME`` / ``TORCH_HOME`` in a temporary folder
(set before Ray starts, so actors inherit them; huggingface_hub's constants are patched too, as it
reads them at import). timm's weights come from files the tests write: through timm's
``pretrained_cfg_overlay={"file": ...}``, or laid out as a Hugging Face cache entry, which timm's
hub path reads offline. Shown:

* teacher: pretrained through the overlay file scores exactly like ``teacher.checkpoint`` with that
  file and has its sha256; hub weights have ``state_dict:<sha256>``; a head or normalization that
  contradicts timm's pretrained_cfg is refused; missing hub weights are a one-line user error;
* a cache made through the Ray job with pretrained weights holds the rows of the checkpoint-made
  cache and records the tag and sha256; students (cached with an expected teacher, online) and the
  audit refuse another file naming ``checkpoint_sha256``; a student trains from it;
* student: ``model.pretrained`` through an overlay file loads what ``model.checkpoint`` with that
  file loads (head re-initialised, position embedding resized, the same report).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import timm
import torch

ray = pytest.importorskip("ray")

from teacher.audit import audit  # noqa: E402
from teacher.cache import run_job  # noqa: E402
from pipeline.config import ConfigError  # noqa: E402
from teacher.job import CacheJobConfig, cache_attrs, make_teacher, open_writer  # noqa: E402
from teacher.model import checkpoint_sha256  # noqa: E402
from pipeline.manifest import load_manifest  # noqa: E402
from pipeline.urls import file_sha256  # noqa: E402
from teacher.work import run_item  # noqa: E402
from storage import CacheMismatchError, open_cache  # noqa: E402
from student.data import open_checked_cache  # noqa: E402
from student.models import build_student  # noqa: E402
from student.targets import build_targets_fn  # noqa: E402
from student.train import train  # noqa: E402
from teacher.model import TeacherConfig, TeacherLoadError, build_teacher, create_model  # noqa: E402
from teacher.weights import WeightsError, state_dict_sha256  # noqa: E402
from test_cache_job import TINY_TEACHER, assert_same_rows  # noqa: E402
from test_cli import assert_one_line_error, run  # noqa: E402
from test_student_data import student_config  # noqa: E402

TAG = "regnety_002.pycls_in1k"          # in timm.list_pretrained(); its pretrained_cfg: 1000 classes, ImageNet mean/std
STUDENT_TAG = "deit_tiny_distilled_patch16_224.fb_in1k"
TINY_VIT = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


@pytest.fixture(scope="module", autouse=True)
def offline_hub(tmp_path_factory):
    """HF_HUB_OFFLINE=1 and every hub/torch cache in a temporary folder; nothing lands there."""
    import huggingface_hub.constants as hf

    assert TAG in timm.list_pretrained("regnety_002*") and STUDENT_TAG in timm.list_pretrained("deit_tiny*")
    home = tmp_path_factory.mktemp("hf_offline")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"HF_HUB_OFFLINE": "1", "HF_HOME": str(home / "hf"),
                           "HF_HUB_CACHE": str(home / "hf" / "hub"), "TORCH_HOME": str(home / "torch")}.items():
            mp.setenv(key, value)
        mp.setattr(hf, "HF_HUB_OFFLINE", True)
        mp.setattr(hf, "HF_HOME", str(home / "hf"))
        mp.setattr(hf, "HF_HUB_CACHE", str(home / "hf" / "hub"))
        yield home
    assert [p for p in home.rglob("*") if p.is_file()] == [], "something was fetched into the hub/torch cache"


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory) -> tuple[str, str]:
    """Two different sets of tiny teacher weights (10 classes), saved as plain state dicts."""
    root = tmp_path_factory.mktemp("weights")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = root / f"regnety_002-{seed}.pth"
        torch.save(create_model(TeacherConfig(**TINY_TEACHER)).state_dict(), path)
        paths.append(str(path))
    return paths[0], paths[1]


def teacher_override(teacher: dict) -> str:
    """``teacher.model={...}`` (JSON is YAML flow syntax)."""
    return "teacher.model=" + json.dumps(teacher)


def pretrained_teacher(file: str | None, **kw) -> dict:
    """TINY_TEACHER with timm's weights for TAG: a file through the overlay (None: the hub)."""
    overlay = {"num_classes": 10} | ({"file": file} if file else {})
    return {**TINY_TEACHER, "name": TAG, "pretrained": True, "pretrained_cfg_overlay": overlay, **kw}


def test_overlay_file_scores_like_the_checkpoint_and_has_its_sha256(teacher_files):
    file, other = teacher_files
    by_file = build_teacher(TeacherConfig(**TINY_TEACHER, checkpoint=file))
    cfg = TeacherConfig(**pretrained_teacher(file))
    by_tag = build_teacher(cfg)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(by_tag.forward_logits(images), by_file.forward_logits(images))
    assert by_tag.checkpoint_sha256 == by_file.checkpoint_sha256 == file_sha256(file) == checkpoint_sha256(cfg)
    other_tag = build_teacher(TeacherConfig(**pretrained_teacher(other)))
    assert other_tag.checkpoint_sha256 == file_sha256(other) != by_tag.checkpoint_sha256
    assert not torch.equal(other_tag.forward_logits(images), by_file.forward_logits(images))


def _hub_cache_entry(hub: Path, tag: str, state_dict: dict) -> Path:
    """Lay ``state_dict`` out as the Hugging Face cache entry of ``timm/<tag>`` (what a download leaves)."""
    from safetensors.torch import save_file

    repo = hub / f"models--timm--{tag}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    path = repo / "snapshots" / commit / "model.safetensors"
    path.parent.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path


def test_hub_weights_come_from_the_hf_cache_offline_with_a_state_dict_identity(teacher_files, tmp_path,
                                                                               monkeypatch):
    import huggingface_hub.constants as hf

    file, _ = teacher_files
    sd = torch.load(file, weights_only=True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cached = _hub_cache_entry(tmp_path / "hub", TAG, sd)
    cfg = TeacherConfig(**pretrained_teacher(None))
    by_hub = build_teacher(cfg)
    by_file = build_teacher(TeacherConfig(**TINY_TEACHER, checkpoint=file))
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(by_hub.forward_logits(images), by_file.forward_logits(images))
    # timm does not say which file it read: the identity is the loaded state dict's, not a file's
    assert by_hub.checkpoint_sha256 == state_dict_sha256(sd) == checkpoint_sha256(cfg)
    assert by_hub.checkpoint_sha256.startswith("state_dict:")
    assert by_hub.checkpoint_sha256.removeprefix("state_dict:") not in (file_sha256(file), file_sha256(str(cached)))
    torch.manual_seed(5)
    assert state_dict_sha256(create_model(TeacherConfig(**TINY_TEACHER)).state_dict()) != by_hub.checkpoint_sha256


def test_contradicting_pretrained_cfg_and_missing_weights_are_refused(teacher_files):
    file, _ = teacher_files
    with pytest.raises(TeacherLoadError, match=r"has 1000 classes, teacher.num_classes is 10.*overlay.num_classes"):
        build_teacher(TeacherConfig(**{**pretrained_teacher(None), "pretrained_cfg_overlay": {"file": file}}))
    with pytest.raises(TeacherLoadError, match=r"says mean \(0.5, 0.5, 0.5\), teacher.mean is \(0.485"):
        build_teacher(TeacherConfig(**pretrained_teacher(file) | {
            "pretrained_cfg_overlay": {"file": file, "num_classes": 10, "mean": (0.5, 0.5, 0.5)}}))
    with pytest.raises(WeightsError, match=r"teacher.pretrained: timm's weights for regnety_002.pycls_in1k are not "
                                           r"in the Hugging Face cache .*HF_HUB_OFFLINE=1.*pretrained_cfg_overlay.file"):
        build_teacher(TeacherConfig(**pretrained_teacher(None)))
    with pytest.raises(WeightsError, match=r"teacher.pretrained_cfg_overlay.file: .*absent.pth not found"):
        build_teacher(TeacherConfig(**pretrained_teacher(file + ".absent.pth")))
    with pytest.raises(WeightsError, match=r"Invalid pretrained tag \(nope\).*list_pretrained\('regnety_002\*'\)"):
        build_teacher(TeacherConfig(**pretrained_teacher(file, name="regnety_002.nope")))
    with pytest.raises(ConfigError, match="pretrained: .*excludes checkpoint"):
        TeacherConfig(**pretrained_teacher(file, checkpoint=file))
    with pytest.raises(ConfigError, match="pretrained_cfg_overlay: is read only with pretrained: true"):
        TeacherConfig(**TINY_TEACHER, pretrained_cfg_overlay={"file": file})


def test_missing_hub_weights_are_one_line_user_errors(fmnist_shards, tmp_path, offline_hub):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch")}
    proc = run("teacher.cache", "--config", "configs/cache/fmnist_regnety002.yaml", f"shards={fmnist_shards / 'train'}",
               f"out={tmp_path / 'c.zarr'}", "teacher.checkpoint=null", f"teacher.name={TAG}", "teacher.pretrained=true",
               "teacher.mean=[0.485, 0.456, 0.406]", "teacher.std=[0.229, 0.224, 0.225]",
               "teacher.pretrained_cfg_overlay={num_classes: 10}", env=env)
    assert_one_line_error(proc, "teacher.cache", f"teacher.pretrained: timm's weights for {TAG} are not in the "
                          "Hugging Face cache", "teacher.pretrained_cfg_overlay.file=PATH", "teacher.checkpoint=PATH")
    proc = run("student.train", "--config", "configs/student/fmnist_none.yaml", f"data.train={fmnist_shards / 'train'}",
               "data.val=null", "cache.path=null", "data.seed=0", "data.aug={}", f"run.out={tmp_path / 'run'}",
               f"model.name={STUDENT_TAG}", "model.pretrained=true", env=env)
    assert_one_line_error(proc, "student.train", f"model.pretrained: timm's weights for {STUDENT_TAG} are not",
                          "model.checkpoint=PATH")
    assert not (tmp_path / "c.zarr").exists() and not (tmp_path / "hf").exists() and not (tmp_path / "torch").exists()


# ----------------------------------------------------------------------------- a cache made from a tag

@pytest.fixture(scope="module")
def tag_cache(fmnist_shards, teacher_files, tmp_path_factory, offline_hub):
    """The Ray job with TAG's weights through the overlay file (relative path: actors get it absolute),
    and the same job with the file as teacher.checkpoint, run item by item without Ray."""
    file, _ = teacher_files
    root = tmp_path_factory.mktemp("tag_cache")
    common = dict(shards=str(fmnist_shards / "train"), epochs=1, views=1, k=5, seed=0, batch_size=64,
                  num_workers=0, actors=1, max_retries=0)
    relative = os.path.relpath(file)
    by_tag = CacheJobConfig.from_dict({**common, "out": str(root / "tag.zarr"),
                                       "teacher": pretrained_teacher(relative)})
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2,
             log_to_driver=False)
    try:
        run_job(by_tag, progress=False)
    finally:
        ray.shutdown()
    by_file = CacheJobConfig.from_dict({**common, "out": str(root / "file.zarr"),
                                        "teacher": {**TINY_TEACHER, "checkpoint": file}})
    manifest = load_manifest(by_file.shards)
    teacher, writer = make_teacher(by_file), open_writer(by_file, manifest, cache_attrs(by_file, manifest))
    for shard in range(len(manifest.shards)):
        run_item(by_file, 0, shard, teacher=teacher, writer=writer, manifest=manifest)
    return Path(by_tag.out), Path(by_file.out)


def test_cache_from_a_tag_records_it_and_holds_the_checkpoint_rows(tag_cache, teacher_files):
    by_tag, by_file = tag_cache
    file, _ = teacher_files
    attrs = open_cache(by_tag).attrs
    assert attrs["teacher"] == TAG and attrs["checkpoint_sha256"] == file_sha256(file)
    job_teacher = attrs["job"]["teacher"]
    assert job_teacher["pretrained"] is True and job_teacher["checkpoint"] is None
    assert job_teacher["pretrained_cfg_overlay"] == {"num_classes": 10, "file": file}   # made absolute
    assert open_cache(by_file).attrs["checkpoint_sha256"] == attrs["checkpoint_sha256"]
    assert_same_rows(str(by_tag), str(by_file))
    report = audit(str(by_tag), samples=32)          # the teacher rebuilt from the attrs: timm, the overlay file
    assert report[0]["rows"] == 32 and report[0]["top1_agree"] == 1.0


def test_rerun_with_the_overlay_file_moved_resumes_and_another_file_is_refused(tag_cache, teacher_files,
                                                                               tmp_path):
    by_tag, _ = tag_cache
    file, other = teacher_files
    job = {**open_cache(by_tag).attrs["job"], "out": str(by_tag), "num_workers": 0}
    moved = tmp_path / "moved.pth"
    shutil.copy(file, moved)
    summary = run_job(CacheJobConfig.from_dict({**job, "teacher": pretrained_teacher(str(moved))}), progress=False)
    assert summary["items_run"] == 0 and summary["items_done_before"] == summary["items_total"]
    with pytest.raises(CacheMismatchError, match="field checkpoint_sha256"):
        run_job(CacheJobConfig.from_dict({**job, "teacher": pretrained_teacher(other)}), progress=False)


def test_students_and_audit_refuse_another_teacher_file(fmnist_shards, tag_cache, teacher_files, tmp_path):
    by_tag, _ = tag_cache
    file, other = teacher_files
    manifest = load_manifest(fmnist_shards / "train")

    def cfg(*overrides):
        return student_config(fmnist_shards, by_tag, tmp_path, *overrides)

    # cached students naming the teacher they expect: the same weights (a tag or the file) pass
    for same in (pretrained_teacher(file), {**TINY_TEACHER, "checkpoint": file}):
        open_checked_cache(cfg(teacher_override(same)), manifest)
    for another in (pretrained_teacher(other), {**TINY_TEACHER, "checkpoint": other}):
        with pytest.raises(CacheMismatchError, match=r"field checkpoint_sha256: expected '[0-9a-f]{64}' \(this run\)"):
            open_checked_cache(cfg(teacher_override(another)), manifest)
    # online students: the cache's own teacher (rebuilt from its attrs) passes, another file does not
    online = cfg("teacher.mode=online")
    reader, plan = open_checked_cache(online, manifest)
    build_targets_fn(online, plan, reader, 10, "cpu", log=lambda line: None)
    online_other = cfg("teacher.mode=online", teacher_override(pretrained_teacher(other)))
    with pytest.raises(CacheMismatchError, match="field checkpoint_sha256: .*this run's online teacher"):
        build_targets_fn(online_other, plan, reader, 10, "cpu", log=lambda line: None)
    with pytest.raises(CacheMismatchError, match=r"field checkpoint_sha256: the teacher's weights \(teacher.checkpoint"):
        audit(str(by_tag), samples=8, checkpoint=other)


def test_an_actor_whose_node_holds_other_weights_refuses(tag_cache, teacher_files):
    """The driver hashed its weights into the attrs; an actor loading others (another node's file
    or Hugging Face cache) stops before writing."""
    from teacher.cache import TeacherWorker

    by_tag, _ = tag_cache
    _, other = teacher_files
    attrs = open_cache(by_tag).attrs
    job = {**attrs["job"], "out": str(by_tag), "num_workers": 0, "teacher": pretrained_teacher(other)}
    with pytest.raises(CacheMismatchError, match="field checkpoint_sha256: this actor's teacher has"):
        TeacherWorker(job, attrs)


def test_student_fine_tunes_from_a_tag_on_the_tag_cache(fmnist_shards, tag_cache, teacher_files, tmp_path, capsys):
    """A cached student expecting the tag's teacher, starting from a student tag's weights (overlay file)."""
    by_tag, _ = tag_cache
    file, _ = teacher_files
    torch.manual_seed(0)
    weights = tmp_path / "student.pth"
    torch.save(timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, img_size=28, patch_size=7,
                                 embed_dim=32, depth=2, num_heads=2).state_dict(), weights)
    overlay = f"model.pretrained_cfg_overlay={{file: {weights}, num_classes: 10, input_size: [3, 28, 28]}}"
    metrics = train(student_config(fmnist_shards, by_tag, tmp_path / "run", "data.max_batches=2", "data.val=null",
                                   f"model.name={STUDENT_TAG}", "model.pretrained=true", overlay,
                                   teacher_override(pretrained_teacher(file))))
    assert metrics["train_images"] == 32
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("model.pretrained")]
    assert line.startswith(f"model.pretrained {STUDENT_TAG}: loaded ") and "re-initialised" not in line, line


# ----------------------------------------------------------------------------- students

def test_student_pretrained_loads_what_the_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "deit.pth"
    torch.save(timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, img_size=32,
                                 **TINY_VIT).state_dict(), path)
    overlay = {"file": str(path), "num_classes": 10, "input_size": (3, 32, 32)}
    built = {}
    for how, kw in {"checkpoint": {"checkpoint": str(path)},
                    "pretrained": {"pretrained": True, "pretrained_cfg_overlay": overlay}}.items():
        lines: list[str] = []
        torch.manual_seed(1)              # the same init for what is re-initialised (the heads)
        built[how] = (build_student(STUDENT_TAG, 5, 48, 0.0, TINY_VIT, log=lines.append, **kw), lines)
    (a, (line_a,)), (b, (line_b,)) = built["checkpoint"], built["pretrained"]
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert line_a.startswith(f"model.checkpoint {path}: loaded ")
    assert line_b.startswith(f"model.pretrained {STUDENT_TAG}: loaded ")
    assert line_a.split(": ", 1)[1] == line_b.split(": ", 1)[1]            # the same report
    assert "resized pos_embed (1, 66, 32) -> (1, 146, 32)" in line_b and "re-initialised head.weight" in line_b
    src = torch.load(path, weights_only=True)
    assert torch.equal(sd_b["blocks.1.mlp.fc2.weight"], src["blocks.1.mlp.fc2.weight"])


def test_student_pretrained_refusals(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "deit.pth"
    torch.save(timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, img_size=32,
                                 **TINY_VIT).state_dict(), path)
    overlay = {"file": str(path), "num_classes": 10, "input_size": (3, 32, 32)}
    with pytest.raises(WeightsError, match=r"model.pretrained: the weights of .* do not fit .*Unexpected key.*blocks\.1"):
        build_student(STUDENT_TAG, 10, 32, 0.0, {**TINY_VIT, "depth": 1}, pretrained=True,
                      pretrained_cfg_overlay=overlay)
    with pytest.raises(WeightsError, match=rf"model.pretrained: timm's weights for {STUDENT_TAG} are not in"):
        build_student(STUDENT_TAG, 10, 32, 0.0, TINY_VIT, pretrained=True)
    with pytest.raises(ConfigError, match="model.pretrained: .*excludes model.checkpoint"):
        student_config(Path("/d"), None, tmp_path, "data.seed=0", "data.aug={}", "loss.mode=none",
                       "model.pretrained=true", f"model.checkpoint={path}")
    with pytest.raises(ConfigError, match="model.pretrained_cfg_overlay: is read only with model.pretrained: true"):
        student_config(Path("/d"), None, tmp_path, "data.seed=0", "data.aug={}", "loss.mode=none",
                       f"model.pretrained_cfg_overlay={{file: {path}}}")
