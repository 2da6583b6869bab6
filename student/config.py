"""The student trainer's config: nested dataclasses that round-trip to YAML.

``python -m student.train --config configs/student/x.yaml loss.mode=soft run.epochs=3``
builds :class:`TrainConfig` with :func:`pipeline.config.load_config`. Values only;
live objects (model, cache reader, teacher) are built by ``student.train``.

Defaults follow the DeiT recipe: AdamW, lr = 5e-4 * global_batch / 512, weight decay
0.05, cosine schedule with warmup, label smoothing 0.1, drop path 0.1.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import ConfigBase, check
from pipeline.plan import EVAL_RESIZES, AugConfig
from teacher.device import AMP_MODES
from teacher.model import TeacherConfig


@dataclass
class ModelConfig(ConfigBase):
    """Which student to build (any timm name; ``deit_*_distilled_*`` gets two heads)."""

    name: str = "deit_tiny_distilled_patch16_224"
    drop_path_rate: float = 0.1
    model_kwargs: dict = field(default_factory=dict)
    # Fine-tuning: start from these weights (pos-embed interpolated to data.img_size).
    checkpoint: str | None = None
    # Fine-tuning from timm's weights for the name (arch.tag; Hugging Face cache), same rules as checkpoint.
    pretrained: bool = False
    pretrained_cfg_overlay: dict = field(default_factory=dict)   # e.g. {file: PATH}: a local file, timm's way

    def __post_init__(self):
        check(bool(self.name), "model.name", "must be a timm model name")
        check(not (self.pretrained and self.checkpoint), "model.pretrained",
              "pretrained: true loads timm's weights for model.name; it excludes model.checkpoint")
        check(not (self.pretrained and ":" in self.name), "model.pretrained",
              f"needs a timm name (arch.tag), found the callable {self.name!r}")
        check(self.pretrained or not self.pretrained_cfg_overlay, "model.pretrained_cfg_overlay",
              "is read only with model.pretrained: true")
        check(0.0 <= self.drop_path_rate < 1.0, "model.drop_path_rate", f"must be in [0, 1), found {self.drop_path_rate}")


@dataclass
class DataConfig(ConfigBase):
    """Where the shards are and how they are replayed.

    ``seed``, ``views`` and ``aug`` default to the cache's own (the student replays what
    the teacher saw); when given they must match the cache (aug by fingerprint).

    A student epoch is one pass over the split's N images (``pipeline.schedule``): with
    ``sampler: ra`` (DeiT's RASampler) N/V samples x V views, with ``one_view`` one view of
    every sample; V student epochs read one cache epoch, each cached row once.
    """

    train: str = ""                    # split dir with manifest.json (train shards)
    val: str | None = None             # split dir of val shards (None = no eval)
    img_size: int = 224                # student resolution; the plan's normalized boxes are replayed at it
    batch_size: int = 128              # GLOBAL batch per optimizer micro-step (divided over DDP ranks)
    num_workers: int = 2
    seed: int | None = None            # plan seed; None = cache attrs
    views: int | None = None           # repeated-augmentation views V; None = the cache's (1 without a cache)
    sampler: str = "ra"                # ra (N/V samples x V views per epoch) | one_view (one view of each sample)
    interleave: int = 4                # shards each loader worker replays at once (class mixing)
    aug: AugConfig | None = None       # None = cache attrs
    max_batches: int | None = None     # cap on batches per epoch (smoke runs, benchmarks)
    eval_batch_size: int = 256
    # Eval crop: crop (0.875 of the short side, resized to img_size) | deit (DeiT's Resize(int(img_size/0.875))
    # + CenterCrop(img_size): the same scale, < 1 px of offset apart). Eval only; no cached row changes.
    eval_resize: str = "crop"
    # Drop each rank's last short batch (DeiT's DataLoader(drop_last=True)). Off by default: the rows it
    # drops (< batch per rank per epoch) are then not read in that pass over the cache.
    drop_last: bool = False

    def __post_init__(self):
        check(self.img_size > 0, "data.img_size", f"must be positive, found {self.img_size}")
        check(self.batch_size > 0, "data.batch_size", f"must be positive, found {self.batch_size}")
        check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        check(self.views is None or self.views > 0, "data.views", "must be positive")
        check(self.sampler in ("ra", "one_view"), "data.sampler", f"must be ra|one_view, found {self.sampler!r}")
        check(self.interleave >= 1, "data.interleave", "must be >= 1")
        check(self.max_batches is None or self.max_batches > 0, "data.max_batches", "must be positive")
        check(self.eval_resize in EVAL_RESIZES, "data.eval_resize",
              f"must be {'|'.join(EVAL_RESIZES)}, found {self.eval_resize!r}")


@dataclass
class CacheConfig(ConfigBase):
    """The teacher-target cache written by ``python -m teacher.cache``."""

    path: str | None = None
    wait: bool = False                 # wait for (epoch, shard) done markers instead of failing
    poll_s: float = 5.0
    timeout_s: float | None = None     # per marker; None = wait forever


@dataclass
class TeacherModeConfig(ConfigBase):
    """Where teacher targets come from: the cache, or the teacher run in the loop."""

    mode: str = "cached"               # cached | online
    # online: the teacher to run; None = the teacher of the cache's job config.
    # cached: when set, the cache must have been made with these weights (checkpoint_sha256).
    model: TeacherConfig | None = None
    # cached: the k the cache must have (None = any). online: None = the full teacher distribution
    # (DeiT's online distillation); a k < num_classes emulates a top-k cache (with the cache's tail).
    k: int | None = None

    def __post_init__(self):
        check(self.mode in ("cached", "online"), "teacher.mode", f"must be cached|online, found {self.mode!r}")
        check(self.k is None or self.k > 0, "teacher.k", "must be positive")


@dataclass
class LossConfig(ConfigBase):
    """DeiT distillation loss (see student.losses.DistillationLoss)."""

    mode: str = "hard"                 # none | soft | hard
    alpha: float = 0.5
    tau: float = 1.0
    label_smoothing: float = 0.1
    teacher_label_smoothing: float = 0.0

    def __post_init__(self):
        check(self.mode in ("none", "soft", "hard"), "loss.mode", f"must be none|soft|hard, found {self.mode!r}")
        check(0.0 <= self.alpha <= 1.0, "loss.alpha", f"must be in [0, 1], found {self.alpha}")
        check(self.tau > 0, "loss.tau", f"must be positive, found {self.tau}")
        check(0.0 <= self.label_smoothing < 1.0, "loss.label_smoothing", "must be in [0, 1)")


LR_STEPS = ("update", "epoch")


@dataclass
class OptimConfig(ConfigBase):
    """AdamW + cosine with warmup via timm's factories; lr scales with the global batch."""

    opt: str = "adamw"
    lr: float | None = None            # None = base_lr * global_batch / base_batch
    base_lr: float = 5e-4
    base_batch: int = 512
    weight_decay: float = 0.05
    momentum: float = 0.9
    opt_eps: float = 1e-8
    clip_grad: float | None = None
    sched: str = "cosine"
    # update: the lr follows the schedule at every optimizer update | epoch: DeiT's main.py, which calls
    # lr_scheduler.step(epoch) after each epoch, so epoch e trains at the schedule's value at e-1
    # (epochs 0 and 1 at warmup_lr; the warmup ends one epoch later). See student/optim.py.
    lr_step: str = "update"
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    accum_steps: int = 1               # micro-batches per optimizer update
    ema: bool = False
    ema_decay: float = 0.99996

    def __post_init__(self):
        check(self.lr is None or self.lr >= 0, "optim.lr", "must be >= 0")
        check(self.accum_steps >= 1, "optim.accum_steps", "must be >= 1")
        check(self.lr_step in LR_STEPS, "optim.lr_step", f"must be {'|'.join(LR_STEPS)}, found {self.lr_step!r}")
        check(self.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
        check(0.0 <= self.ema_decay < 1.0, "optim.ema_decay", "must be in [0, 1)")


@dataclass
class RunConfig(ConfigBase):
    """Run folder, length, precision, logging and resume."""

    out: str = "runs/student"
    epochs: int = 300
    eval_every: int = 1                # epochs; 0 = only at the end
    save_every: int = 1                # epochs between checkpoints (the last epoch always saves)
    keep_last: int = 2                 # numbered checkpoints kept (older ones are deleted); >= 1
    best_metric: str | None = "val_top1_fused"   # best.pt = the checkpoint with its highest value; null = none
    seed: int = 0                      # model init / drop-path RNG (the plan seed is data.seed)
    device: str = "auto"               # auto | cpu | cuda
    threads: int | None = None         # torch CPU threads (None = torch's default); 1 avoids oversubscription
    # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 (with a GradScaler: DeiT's autocast + NativeScaler) | none
    amp: str = "auto"
    resume: bool = False               # continue from the latest checkpoint in run.out (see student/resume.py)
    stop_epoch: int | None = None      # exit after this epoch (time-boxed jobs); --resume continues
    progress: bool = True              # tqdm bar with images/s
    log_every: int = 50                # steps between per-step metric rows (0 = epoch rows only)
    plot: bool = True                  # PNG curves at the end
    rank_audit: bool = False           # each rank writes rank-<r>.csv (the rows it trained on, step by
                                       # step) and rank-<r>.json (world size, sha256 of its final weights)

    def __post_init__(self):
        check(self.epochs > 0, "run.epochs", f"must be positive, found {self.epochs}")
        check(self.eval_every >= 0, "run.eval_every", "must be >= 0")
        check(self.threads is None or self.threads >= 1, "run.threads", "must be >= 1")
        check(self.log_every >= 0, "run.log_every", "must be >= 0")
        check(self.save_every >= 1, "run.save_every", "must be >= 1")
        check(self.keep_last >= 1, "run.keep_last", f"must be >= 1 (resume needs the latest), found {self.keep_last}")
        check(self.best_metric is None or re.fullmatch(r"val_(ema_)?top[15]_(cls|dist|fused)", self.best_metric),
              "run.best_metric", f"must be val_[ema_]top1|top5_cls|dist|fused or null, found {self.best_metric!r}")
        check(self.device in ("auto", "cpu", "cuda"), "run.device", f"must be auto|cpu|cuda, found {self.device!r}")
        check(self.amp in AMP_MODES, "run.amp", f"must be {'|'.join(AMP_MODES)}, found {self.amp!r}")


@dataclass
class TrainConfig(ConfigBase):
    """Everything ``python -m student.train`` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    teacher: TeacherModeConfig = field(default_factory=TeacherModeConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        check(bool(self.data.train), "data.train", "must name the train split dir (with manifest.json)")
        needs_teacher = self.loss.mode != "none"
        if needs_teacher and self.teacher.mode == "cached":
            check(self.cache.path is not None, "cache.path", f"loss.mode={self.loss.mode} with teacher.mode=cached needs a cache")
        if self.cache.path is None:
            # Without a cache the plan must be spelled out.
            check(self.data.seed is not None, "data.seed", "required when cache.path is not set")
            check(self.data.aug is not None, "data.aug", "required when cache.path is not set")
            if needs_teacher:
                check(self.teacher.model is not None, "teacher.model", "required for online mode without a cache")


def _config_class(tp) -> type | None:
    """The config class in an annotation (``AugConfig | None`` -> AugConfig), else None."""
    return next((t for t in typing.get_args(tp) or (tp,) if isinstance(t, type) and issubclass(t, ConfigBase)), None)


def sections_help() -> str:
    """The epilog of --help: every config section, its keys, and the file documenting them."""
    repo = Path(__file__).resolve().parents[1]
    lines = ["config sections (keys set in the YAML file or as section.key=value overrides;",
             "each key's default and meaning are commented in student/config.py):"]
    for section, tp in typing.get_type_hints(TrainConfig).items():
        cls = _config_class(tp)
        lines.append(f"  {section:8} {(cls.__doc__ or '').strip().splitlines()[0]}")
        lines += textwrap.wrap(" ".join(f.name for f in dataclasses.fields(cls)), 90,
                               initial_indent="           keys: ", subsequent_indent="                 ")
        for key, sub in typing.get_type_hints(cls).items():  # nested configs document their own keys
            inner = _config_class(sub)
            if inner is not None:
                where = Path(inspect.getsourcefile(inner)).resolve().relative_to(repo)
                lines.append(f"           {section}.{key}: keys of {inner.__name__} in {where}")
    lines += ["", "--resume continues the latest checkpoint of run.out; student/resume.py lists the keys that",
              "may change on resume (workers, eval/log/plot settings, cache.wait...); others are refused."]
    return "\n".join(lines)
