"""What a teacher cache is made from: the job config, its provenance attrs, teacher and writer.

Shared by the Ray job (``teacher.cache``) and the per-item work (``teacher.work``), which
both import this module and not each other: the job sits above the work, this sits below both.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib.metadata import version

from pipeline import urls
from pipeline.classmix import class_mix_warning
from pipeline.config import ConfigBase, check
from pipeline.manifest import Manifest, load_manifest
from pipeline.plan import AugConfig, fingerprint
from storage import CacheMismatchError, CacheWriter, create_cache, open_cache
from storage.tail import TailConfig
from teacher.model import TeacherConfig, build_teacher, checkpoint_sha256
from teacher.weights import resolved_tag

REPLAY_PLACES = ("local", "ray")


@dataclass
class CacheJobConfig(ConfigBase):
    """Everything that defines a teacher cache (values only; saved in the cache attrs).

    Args:
        shards: split folder holding ``manifest.json``: a path or any fsspec URL (``s3://...``;
            credentials from the environment / fsspec config, see pipeline.urls).
        out: cache path (local directory or fsspec URL).
        epochs, views: rows are (epoch, sample_id, view) for epoch < epochs, view < views.
        k: top-k logits stored per row.
        seed: augmentation plan seed.
        batch_size: teacher batch size.
        num_workers: replay processes per actor (0 = in the actor process); with
            ``replay: ray`` the number of replay tasks an actor keeps in flight.
        replay: where decoding + augmentation run: ``local`` = persistent worker processes
            beside each teacher actor; ``ray`` = Ray tasks on any node's CPUs, results through
            the object store (a GPU node with few cores fed by CPU nodes).
        actors: teacher actors; 0 = one per GPU, else CPUs // (1 + num_workers).
        max_retries: re-runs of a work item whose actor died.
        aug: the augmentation plan; teacher: the model; tail: the learned tail (storage/tail.py).
    """

    shards: str = ""
    out: str = ""
    epochs: int = 1
    views: int = 1
    k: int = 10
    seed: int = 0
    batch_size: int = 64
    num_workers: int = 2
    replay: str = "local"
    actors: int = 0
    max_retries: int = 3
    aug: AugConfig = field(default_factory=AugConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    tail: TailConfig = field(default_factory=TailConfig)

    def __post_init__(self) -> None:
        check(bool(self.shards), "shards", "set the split directory (holding manifest.json)")
        check(bool(self.out), "out", "set the cache path")
        for name in ("epochs", "views", "k", "batch_size"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, found {getattr(self, name)}")
        for name in ("num_workers", "actors", "max_retries"):
            check(getattr(self, name) >= 0, name, f"must be >= 0, found {getattr(self, name)}")
        check(self.replay in REPLAY_PLACES, "replay", f"one of {REPLAY_PLACES}, found {self.replay!r}")
        check(self.replay == "local" or self.num_workers >= 1, "num_workers",
              "replay: ray needs num_workers >= 1 (replay tasks in flight per actor)")
        check(self.k <= self.teacher.num_classes, "k",
              f"must be <= teacher.num_classes={self.teacher.num_classes}, found {self.k}")


# Job settings that do not change the stored rows: a resume may use other values.
RUNTIME_FIELDS = ("batch_size", "num_workers", "replay", "actors", "max_retries", "out")


def teacher_id(t: TeacherConfig) -> str:
    """What the cache attrs call the teacher: the timm tag its pretrained weights resolve to
    (``regnety_160.deit_in1k``, the default tag for a bare name), else the name or callable."""
    if t.pretrained:
        return resolved_tag(t.name, t.pretrained_cfg_overlay)
    return t.callable or t.name


def package_version() -> str:
    try:
        return version("kdcache")
    except Exception:  # running from a bare checkout
        return "unknown"


# Path fields of the stored job config -> the attr that says what they point to. A resume
# compares that content identity, not the spelling ("runs/x" vs "/home/me/runs/x", a moved dataset).
PATH_FIELDS = {("shards",): "manifest_sha256", ("teacher", "checkpoint"): "checkpoint_sha256",
               ("teacher", "pretrained_cfg_overlay", "file"): "checkpoint_sha256"}


def absolute_paths(cfg: CacheJobConfig) -> CacheJobConfig:
    """``cfg`` with local paths made absolute (URLs kept): Ray actors do not share the driver's
    working directory, and the job config stored in the cache must work from anywhere."""
    t = cfg.teacher
    overlay = dict(t.pretrained_cfg_overlay)
    if overlay.get("file"):
        overlay["file"] = urls.absolute(overlay["file"])
    checkpoint = t.checkpoint and urls.absolute(t.checkpoint)
    return cfg.replace(shards=urls.absolute(cfg.shards), out=urls.absolute(cfg.out),
                       teacher=t.replace(checkpoint=checkpoint, pretrained_cfg_overlay=overlay))


def cache_attrs(cfg: CacheJobConfig, manifest) -> dict:
    """Provenance stored in the cache group attrs (compared again on every resume)."""
    t = cfg.teacher
    return {
        "teacher": teacher_id(t),
        "checkpoint_sha256": checkpoint_sha256(t),
        "num_classes": t.num_classes,
        "classes": list(manifest.classes),
        "input_size": t.input_size,
        "mean": list(t.mean),
        "std": list(t.std),
        "k": cfg.k,
        "epochs": cfg.epochs,
        "views": cfg.views,
        "seed": cfg.seed,
        "aug": cfg.aug.to_dict(),
        "fingerprint": fingerprint(cfg.aug),
        "manifest_sha256": manifest.sha256,
        "num_samples": manifest.num_samples,
        "shard_size": manifest.shard_size,
        "package_version": package_version(),
        # what does not change the rows is left out, so a resume may use other batch sizes
        "job": {k: v for k, v in absolute_paths(cfg).to_dict().items() if k not in RUNTIME_FIELDS},
    }


def resume_attrs(cfg: CacheJobConfig, attrs: dict) -> dict:
    """``attrs`` with the existing cache's spelling of each path that points to the same content.

    storage compares attrs for equality on reopen; a path field whose content identity (manifest
    or checkpoint sha256) matches the cache's takes the cache's stored value, so only a real
    difference (another dataset, another teacher file, another config value) is refused. A config
    field the stored job config lacks (added by a later kdcache, e.g. ``teacher.pretrained``) is
    left out while it holds its default: there it changes nothing, so the cache resumes.
    """
    try:
        stored = open_cache(cfg.out).attrs
    except (FileNotFoundError, KeyError, CacheMismatchError):
        return attrs  # no complete cache there: create_cache creates it or names the mismatch
    out = json.loads(json.dumps(attrs))
    for (*parents, leaf), identity in PATH_FIELDS.items():
        mine, theirs = out["job"], stored.get("job", {})
        for key in parents:
            mine, theirs = mine.get(key, {}), theirs.get(key, {})
        if stored.get(identity) == attrs[identity] and leaf in theirs:
            mine[leaf] = theirs[leaf]
    defaults = json.loads(json.dumps(CacheJobConfig(shards="-", out="-").to_dict()))
    _drop_added_defaults(out["job"], stored.get("job", {}), defaults)
    _drop_added_defaults(out["aug"], stored.get("aug", {}), defaults["aug"])   # e.g. aug.max_pixels
    return out


def _drop_added_defaults(mine: dict, theirs: dict, defaults: dict) -> None:
    for key in list(mine):
        if key not in theirs:
            if key in defaults and mine[key] == defaults[key]:
                del mine[key]
        elif isinstance(mine[key], dict) and isinstance(theirs[key], dict) and isinstance(defaults.get(key), dict):
            _drop_added_defaults(mine[key], theirs[key], defaults[key])


def open_writer(cfg: CacheJobConfig, manifest, attrs: dict):
    """Create the cache, or reopen it for a resume (storage checks attrs are identical)."""
    return create_cache(
        cfg.out, shards=manifest.shards, epochs=cfg.epochs, views=cfg.views, k=cfg.k,
        num_classes=cfg.teacher.num_classes, attrs=attrs, tail_dim=cfg.tail.dim,
    )


def make_teacher(cfg: CacheJobConfig, device: str = "cpu"):
    """The job's teacher: top-``cfg.k``, fed images normalized with the plan's mean/std."""
    return build_teacher(cfg.teacher, device=device, k=cfg.k,
                         input_mean=cfg.aug.mean, input_std=cfg.aug.std)


def pending_items(writer: CacheWriter, epochs: int, num_shards: int) -> tuple[list[tuple[int, int]], int]:
    """(epoch, shard) items without a done marker, epoch-major (so students can start
    on early epochs while later ones are cached), and how many were already done."""
    done = set(writer.done_items())
    todo = [(e, s) for e in range(epochs) for s in range(num_shards) if (e, s) not in done]
    return todo, len(done)


@dataclass(frozen=True)
class OpenJob:
    """A caching job ready to run (:func:`open_job`).

    Args:
        cfg: the job config, local paths made absolute (what actors receive).
        manifest: the dataset's manifest.
        attrs: the provenance in the cache attrs (on a resume, in the existing cache's spelling).
        writer: the cache, created or reopened.
        todo: (epoch, shard) items without a done marker, epoch-major.
        done_before: items already done when the job opened.
        warning: the class-mix warning for class-sorted shards, or None.
    """

    cfg: CacheJobConfig
    manifest: Manifest
    attrs: dict
    writer: CacheWriter
    todo: list[tuple[int, int]]
    done_before: int
    warning: str | None


def open_job(cfg: CacheJobConfig) -> OpenJob:
    """Resolve ``cfg`` into everything a run needs, in one place: absolute paths, the manifest
    (checked against the teacher), the provenance, the cache and its pending items.

    Raises:
        ConfigError: the dataset's class count differs from the teacher's.
        CacheMismatchError: the cache exists with other provenance (names the field).
    """
    cfg = absolute_paths(cfg)
    manifest = load_manifest(cfg.shards)
    check(manifest.num_classes == cfg.teacher.num_classes, "teacher.num_classes",
          f"dataset {cfg.shards} has {manifest.num_classes} classes, teacher has {cfg.teacher.num_classes}")
    attrs = resume_attrs(cfg, cache_attrs(cfg, manifest))
    writer = open_writer(cfg, manifest, attrs)
    todo, done_before = pending_items(writer, cfg.epochs, len(manifest.shards))
    return OpenJob(cfg, manifest, attrs, writer, todo, done_before, class_mix_warning(manifest))
