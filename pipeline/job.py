"""What a teacher cache is made from: the job config, its provenance attrs, teacher and writer.

Shared by the Ray job (``pipeline.cache``) and the per-item work (``pipeline.work``), which
both import this module and not each other: the job sits above the work, this sits below both.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import ConfigBase, check
from pipeline.plan import AugConfig, fingerprint
from teacher.model import TeacherConfig, build_teacher, file_sha256

REPLAY_PLACES = ("local", "ray")


@dataclass
class CacheJobConfig(ConfigBase):
    """Everything that defines a teacher cache (values only; saved in the cache attrs).

    Args:
        shards: split directory with ``manifest.json`` (see pipeline.shards).
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
        aug: the augmentation plan; teacher: the model.
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


def checkpoint_sha256(t: TeacherConfig) -> str:
    """Same value as ``Teacher.checkpoint_sha256``, without building the model."""
    if t.checkpoint:
        return file_sha256(t.checkpoint)
    return f"callable:{t.callable}" if t.callable else "random"


def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("kdcache")
    except Exception:  # running from a bare checkout
        return "unknown"


def cache_attrs(cfg: CacheJobConfig, manifest) -> dict:
    """Provenance stored in the cache group attrs (compared again on every resume)."""
    t = cfg.teacher
    return {
        "teacher": t.name if not t.callable else t.callable,
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
        "job": {k: v for k, v in cfg.to_dict().items() if k not in RUNTIME_FIELDS},
    }


def open_writer(cfg: CacheJobConfig, manifest, attrs: dict):
    """Create the cache, or reopen it for a resume (storage checks attrs are identical)."""
    from storage import create_cache

    return create_cache(
        cfg.out, shards=manifest.shards, shard_size=manifest.shard_size,
        num_samples=manifest.num_samples, epochs=cfg.epochs, views=cfg.views, k=cfg.k,
        num_classes=cfg.teacher.num_classes, attrs=attrs,
    )


def check_manifest(cfg: CacheJobConfig, manifest) -> None:
    check(manifest.num_classes == cfg.teacher.num_classes, "teacher.num_classes",
          f"dataset {cfg.shards} has {manifest.num_classes} classes, teacher has {cfg.teacher.num_classes}")


def make_teacher(cfg: CacheJobConfig, device: str = "cpu"):
    """The job's teacher: top-``cfg.k``, fed images normalized with the plan's mean/std."""
    return build_teacher(cfg.teacher, device=device, k=cfg.k,
                         input_mean=cfg.aug.mean, input_std=cfg.aug.std)
