"""What ``--resume`` may change and what it refuses, and when a fresh run may use a folder.

A resumed run continues the *same* run. The config saved in the checkpoint is compared with the
one given now, key by key: keys that only say how the run is executed or watched
(:data:`MAY_CHANGE`) may differ; any other difference (model, loss, teacher, data, augmentation
plan and loader order such as ``data.sampler`` / ``interleave``, optimizer,
schedule, run length, seed) would silently turn it into another run, so it is refused, naming
the keys, unless ``--force-resume``.

``run.epochs`` is refused too: the cosine schedule spans it, so a longer run is another
schedule (to stop early, use ``run.stop_epoch``). Paths are compared by what they point to:
``data.train`` by its manifest sha256 and ``cache.path`` by the cache's provenance (teacher
checkpoint sha256, plan fingerprint, k, seed), so a moved dataset or a copied cache resumes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from pipeline.config import ConfigError
from student.checkpoint import latest_checkpoint

# Dotted keys (or section prefixes) that may change on --resume.
MAY_CHANGE = (
    "data.train", "data.val",                     # by identity (manifest sha256) / eval only
    "data.num_workers", "data.eval_batch_size", "data.eval_resize",
    "cache.path",                                 # by identity (the cache's provenance)
    "cache.wait", "cache.poll_s", "cache.timeout_s",
    "run.out", "run.resume", "run.stop_epoch", "run.eval_every", "run.save_every", "run.keep_last",
    "run.best_metric", "run.progress", "run.log_every", "run.plot", "run.device", "run.threads",
)
# Cache attrs that decide what its rows are.
CACHE_IDENTITY = ("teacher", "checkpoint_sha256", "fingerprint", "k", "seed", "manifest_sha256")


class ResumeError(ConfigError):
    """--resume with a config that changes what the run means (names the keys)."""

    hint = "start a new run.out for a new run, or pass --force-resume to continue this one anyway"


def run_identity(train_manifest_sha256: str, cache_attrs: dict | None) -> dict:
    """What ``data.train`` and ``cache.path`` point to (saved in every checkpoint)."""
    cache = {k: cache_attrs.get(k) for k in CACHE_IDENTITY} if cache_attrs is not None else None
    return {"data.train": {"manifest_sha256": train_manifest_sha256}, "cache.path": cache}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def _may_change(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in MAY_CHANGE)


def resume_changes(saved: dict, current: dict, saved_identity: dict | None = None,
                   identity: dict | None = None) -> list[str]:
    """``"key: old -> new"`` for every difference that changes what the run means.

    Args:
        saved, current: ``TrainConfig.to_dict()`` of the checkpoint and of this run.
        saved_identity, identity: :func:`run_identity` of both (None: not compared).
    """
    old, new = _flatten(saved), _flatten(current)
    missing = object()
    changes = [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
               for k in sorted(set(old) | set(new))
               if not _may_change(k) and old.get(k, missing) != new.get(k, missing)]
    if saved_identity is not None and identity is not None:
        for key in sorted(set(saved_identity) | set(identity)):
            a, b = saved_identity.get(key), identity.get(key)
            if a is None or b is None:
                if a != b:
                    changes.append(f"{key}: {'none' if a is None else 'set'} -> {'none' if b is None else 'set'}")
            elif a != b:
                fields = sorted(f for f in set(a) | set(b) if a.get(f) != b.get(f))
                changes.append(f"{key} points to other content ({', '.join(fields)} differ)")
    return changes


def check_resume(checkpoint: dict, path: Path, current: dict, identity: dict, force: bool,
                 log: Callable[[str], Any]) -> None:
    """Refuse (ResumeError) to resume ``checkpoint`` under a config that changes the run, unless ``force``."""
    changes = resume_changes(checkpoint.get("config", {}), current, checkpoint.get("identity"), identity)
    if not changes:
        return
    if force:
        log(f"--force-resume: continuing {path} although {'; '.join(changes)}")
        return
    raise ResumeError(f"--resume: {path} was trained with another config: {'; '.join(changes)}")


def check_fresh_run_dir(run_dir: Path) -> None:
    """A new run must not write over another run's checkpoints (and mix their metrics)."""
    latest = latest_checkpoint(run_dir)
    if latest is not None:
        err = ConfigError(f"run.out {run_dir} already holds {latest.name} of an earlier run")
        err.hint = "--resume continues it; choose another run.out (or delete the folder) to start over"
        raise err
