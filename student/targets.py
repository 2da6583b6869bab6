"""Where teacher targets for a batch come from: ``targets_fn(batch) -> TeacherTargets | None``.

* cached: the rows joined from the cache by :class:`student.data.TrainData`;
* online: the teacher scores the same replayed (mixed) images in the loop, and its logits go
  through the same ``topk_from_logits`` -> rebuild path as the caching job, so a cached and an
  online student differ only by the cache's quantization;
* none: no teacher (``loss.mode=none``).
"""
from __future__ import annotations

import torch

from teacher.targets import TeacherTargets, topk_from_logits


def no_targets(batch: dict) -> None:
    return None


def cached_targets(batch: dict) -> TeacherTargets:
    """Targets joined from the cache (keys set by ``student.data.join_cache``)."""
    return TeacherTargets(batch["teacher_logprobs"], batch["teacher_indices"])


class OnlineTargets:
    """Run the teacher in the loop on the replayed images.

    Args:
        logits_fn: images ``[B,3,H,W]`` -> teacher logits ``[B,C]`` (e.g. ``Teacher.forward_logits``).
        k: entries kept, the cache's k (k == C keeps the full distribution exactly).
        input_size: teacher resolution. When the student trains at another size the loader
            replays the plan a second time at this size (``batch["extra_image"]``, as the caching
            job renders it), so the online teacher scores exactly what a cached one scored.
    """

    def __init__(self, logits_fn, k: int, input_size: int | None = None):
        self.logits_fn = logits_fn
        self.k = k
        self.input_size = input_size

    @torch.no_grad()
    def __call__(self, batch: dict) -> TeacherTargets:
        images = batch.get("extra_image", batch["image"])
        if self.input_size is not None and images.shape[-1] != self.input_size:
            raise ValueError(f"online teacher takes {self.input_size} px images, the batch holds "
                             f"{images.shape[-1]} px ones (replay them at the teacher's size: extra_size)")
        logits = self.logits_fn(images)
        return TeacherTargets(*topk_from_logits(logits.float(), self.k))


def build_targets_fn(cfg, plan, reader, num_classes: int, device):
    """``(targets_fn, joins_cache)`` for ``cfg.loss.mode`` / ``cfg.teacher.mode``.

    Online mode builds the teacher from ``teacher.model`` or, by default, from the caching
    job's teacher config stored in the cache attrs, and keeps the cache's k.
    """
    if cfg.loss.mode == "none":
        return no_targets, False
    if cfg.teacher.mode == "cached":
        return cached_targets, True
    from teacher.model import TeacherConfig, build_teacher  # online only: keeps cached runs light

    tcfg = cfg.teacher.model
    if tcfg is None:
        tcfg = TeacherConfig.from_dict(_job_teacher(reader.attrs, cfg.cache.path))
    k = min(cfg.teacher.k or plan.k, num_classes)
    # Fed the plan's normalization, exactly like pipeline.cache.make_teacher.
    teacher = build_teacher(tcfg, device=str(device), k=k, input_mean=plan.aug.mean, input_std=plan.aug.std)
    if reader is not None and teacher.checkpoint_sha256 != reader.attrs.get("checkpoint_sha256"):
        raise ValueError(f"cache {cfg.cache.path}: field checkpoint_sha256: online teacher has "
                         f"{teacher.checkpoint_sha256}, the cache was scored with {reader.attrs.get('checkpoint_sha256')}")
    if teacher.checkpoint_sha256 == "random":
        print(f"warning: online teacher {tcfg.name} has no checkpoint (random init, not the cache's weights)")
    return OnlineTargets(teacher.forward_logits, k, tcfg.input_size), False


def _job_teacher(attrs: dict, path) -> dict:
    job = attrs.get("job") or {}
    if "teacher" not in job:
        raise KeyError(f"cache {path}: attrs hold no job config with a teacher section; set teacher.model")
    return job["teacher"]
