"""Where teacher targets for a batch come from: ``targets_fn(batch) -> TeacherTargets | None``.

* cached: the rows joined from the cache by :class:`student.data.TrainData` (top-k, tail mass,
  tail codes turned into the tail shape with the cache's basis);
* online: the teacher scores the same replayed (mixed) images in the loop. By default the
  student gets the full teacher distribution (k = C): DeiT's own online distillation, the
  baseline a cache is measured against. ``teacher.k`` emulates a cache of that k instead —
  the same ``targets_from_logits`` the caching job stores (with the cache's tail basis when
  there is one), so a cached and an emulating online student differ only by the storage
  quantization;
* none: no teacher (``loss.mode=none``).

A soft student logs, at start, the fidelity the caching job recorded for its cache at the
student's τ, and warns (naming a k that would do) when it is poor (teacher/fidelity.py).
"""
from __future__ import annotations

from typing import Callable

import torch

from pipeline.config import ConfigError
from storage import CacheMismatchError
from teacher.fidelity import advice
from teacher.model import TeacherConfig, build_teacher
from storage.targets import TeacherTargets, targets_from_logits


def no_targets(batch: dict) -> None:
    return None


class CachedTargets:
    """Targets joined from the cache (keys set by ``student.data``), tail shape from the cache's basis."""

    def __init__(self, tail=None):
        self.tail = tail

    def __call__(self, batch: dict) -> TeacherTargets:
        shape = None
        if self.tail is not None:
            shape = self.tail.shape(batch["teacher_tail_code"])
        return TeacherTargets(batch["teacher_logprobs"], batch["teacher_indices"], batch.get("teacher_log_tail"), shape)


class OnlineTargets:
    """Run the teacher in the loop on the replayed images.

    Args:
        logits_fn: images ``[B,3,H,W]`` -> teacher logits ``[B,C]`` (e.g. ``Teacher.forward_logits``).
        k: entries kept; None or C keeps the full distribution exactly (DeiT's online teacher).
        input_size: teacher resolution. When the student trains at another size the loader
            replays the plan a second time at this size (``batch["extra_image"]``, as the caching
            job renders it), so the online teacher scores exactly what a cached one scored.
        tail: the emulated cache's TailModel (only with k < C), or None for a uniform tail.
    """

    def __init__(self, logits_fn, k: int | None = None, input_size: int | None = None, tail=None):
        self.logits_fn = logits_fn
        self.k = k
        self.input_size = input_size
        self.tail = tail

    @torch.no_grad()
    def __call__(self, batch: dict) -> TeacherTargets:
        images = batch.get("extra_image", batch["image"])
        if self.input_size is not None and images.shape[-1] != self.input_size:
            raise ValueError(f"online teacher takes {self.input_size} px images, the batch holds "
                             f"{images.shape[-1]} px ones (replay them at the teacher's size: extra_size)")
        logits = self.logits_fn(images).float()
        return targets_from_logits(logits, self.k or logits.shape[-1], self.tail)


def build_targets_fn(cfg, plan, reader, num_classes: int, device, log: Callable[[str], None] = print):
    """``(targets_fn, joins_cache)`` for ``cfg.loss.mode`` / ``cfg.teacher.mode``.

    Online mode builds the teacher from ``teacher.model`` or, by default, from the caching
    job's teacher config stored in the cache attrs; it keeps the full distribution unless
    ``teacher.k`` asks to emulate a cache.
    """
    if cfg.loss.mode == "none":
        return no_targets, False
    if cfg.teacher.mode == "cached":
        if cfg.loss.mode == "soft":
            report_fidelity(reader, cfg.loss.tau, log)
        return CachedTargets(reader.tail_model()), True
    tcfg = cfg.teacher.model
    if tcfg is None:
        tcfg = TeacherConfig.from_dict(_job_teacher(reader.attrs, cfg.cache.path))
    k = min(cfg.teacher.k or num_classes, num_classes)
    tail = reader.tail_model() if reader is not None and k < num_classes else None
    # Fed the plan's normalization, exactly like teacher.job.make_teacher.
    teacher = build_teacher(tcfg, device=str(device), k=k, input_mean=plan.aug.mean, input_std=plan.aug.std)
    if reader is not None and teacher.checkpoint_sha256 != reader.attrs.get("checkpoint_sha256"):
        raise CacheMismatchError(
            f"cache {cfg.cache.path}: field checkpoint_sha256: expected {teacher.checkpoint_sha256} (this run's "
            f"online teacher), found {reader.attrs.get('checkpoint_sha256')} (in the cache)")
    if teacher.checkpoint_sha256 == "random":
        log(f"warning: online teacher {tcfg.name} has no checkpoint (random init, not the cache's weights)")
    log(f"online teacher: {'full distribution (k = C)' if k == num_classes else f'emulating a top-{k} cache'}")
    return OnlineTargets(teacher.forward_logits, k, tcfg.input_size, tail), False


def report_fidelity(reader, tau: float, log: Callable[[str], None] = print) -> dict | None:
    """Log the cache's recorded fidelity at ``tau`` (and a warning naming a better k when poor).

    Returns:
        The cache's fidelity summary (storage.fidelity.summarize), or None when none is recorded.
    """
    summary = reader.fidelity()
    if summary is None:
        log(f"teacher cache {reader.path}: no fidelity recorded (items written without full logits); "
            f"run python -m teacher.audit {reader.path} --tau {tau:g}")
        return None
    line, poor = advice(summary, reader.k, tau)
    log(("warning: " if poor else "") + line)
    return summary


def _job_teacher(attrs: dict, path) -> dict:
    job = attrs.get("job") or {}
    if "teacher" not in job:
        raise ConfigError(f"teacher.model: cache {path} holds no job config with a teacher section; "
                          f"set teacher.model for online mode")
    return job["teacher"]
