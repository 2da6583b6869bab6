"""The teacher: a frozen classifier that scores augmented images into top-k targets.

Any timm classifier by name (default ``regnety_160``, DeiT's teacher) or any
``callable="module:fn"`` returning an ``nn.Module``. Weights come from a local (or fsspec)
file, ``checkpoint``, loaded with ``torch.load(weights_only=True)``, or the timm way:
``name: regnety_160.deit_in1k`` with ``pretrained: true`` (timm's own mechanism, Hugging Face
cache, ``HF_HUB_OFFLINE`` honored; ``pretrained_cfg_overlay: {file: PATH}`` reads a local file
the same way; see teacher/weights.py for the weights' identity).
The model runs in eval mode, channels_last, with bf16/fp16 autocast on CUDA only and an
optional ``torch.compile``.

``Teacher.score`` returns top-k logits sorted descending, their class indices, the
log-sum-exp over all classes (log-prob = logit - lse) and the full logits, from which the
cache writer takes the exact tail mass, the tail code and its fidelity figures.
"""
from __future__ import annotations

import contextlib
import pickle
from dataclasses import dataclass, field
from typing import Any, Callable

import timm
import torch
from torch import nn

from pipeline.config import ConfigBase, check, resolve_callable
from pipeline import urls
from pipeline.urls import file_sha256
from teacher.device import AMP_MODES as _AMP
from teacher.device import autocast_dtype, channels_last, non_blocking
from teacher.lukemelas import convert_state_dict, is_lukemelas_state_dict
from teacher.weights import create_pretrained, pretrained_cfg, pretrained_file, weights_sha256

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Wrappers seen in the wild around a state dict, most specific first.
_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module")


class TeacherLoadError(ValueError):
    """A teacher checkpoint is missing or does not match the architecture (keys are named)."""


@dataclass
class TeacherConfig(ConfigBase):
    """How to build the teacher. ``mean``/``std`` are the normalization its weights expect."""

    name: str = "regnety_160"
    checkpoint: str | None = None
    # timm's weights for ``name`` (``arch.tag``), through timm.create_model(pretrained=True)
    pretrained: bool = False
    # keys replacing the tag's timm pretrained_cfg, e.g. {file: PATH} (a local file, timm's format)
    pretrained_cfg_overlay: dict = field(default_factory=dict)
    callable: str | None = None
    num_classes: int = 1000
    model_kwargs: dict = field(default_factory=dict)
    stem_stride: int | None = None
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    amp: str = "auto"
    channels_last: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        check(self.amp in _AMP, "amp", f"must be one of {_AMP}, found {self.amp!r}")
        check(self.num_classes > 0, "num_classes", f"must be positive, found {self.num_classes}")
        check(self.input_size > 0, "input_size", f"must be positive, found {self.input_size}")
        check(self.stem_stride is None or self.stem_stride >= 1, "stem_stride",
              f"must be >= 1 or null, found {self.stem_stride}")
        check(self.callable is None or ":" in self.callable, "callable",
              f"must look like 'module:function', found {self.callable!r}")
        check(len(self.mean) == 3 and len(self.std) == 3, "mean/std", "need 3 channels")
        check(not (self.pretrained and (self.checkpoint or self.callable)), "pretrained",
              "pretrained: true loads timm's weights for the name; it excludes checkpoint and callable")
        check(self.pretrained or not self.pretrained_cfg_overlay, "pretrained_cfg_overlay",
              "is read only with pretrained: true")


@dataclass
class TeacherOutput:
    """Top-k scores of one batch (tensors on the teacher's device).

    values: float32 [B, k] logits sorted descending; indices: int64 [B, k];
    lse: float32 [B] log-sum-exp over all classes; logits: float32 [B, C] all of them.
    """

    values: torch.Tensor
    indices: torch.Tensor
    lse: torch.Tensor
    logits: torch.Tensor | None = None

    @property
    def logprobs(self) -> torch.Tensor:
        """Top-k log-probabilities, ``values - lse``."""
        return self.values - self.lse[:, None]


def _open(path: str):
    return urls.open_read(path)


def unwrap_state_dict(obj: Any, path: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """Return the state dict inside a checkpoint: plain, or wrapped as {"model": sd}, {"state_dict": sd}, ...

    A ``module.`` prefix (DDP) is stripped; lukemelas EfficientNet names are converted to timm's.
    """
    # Wrapper keys first: a training checkpoint (e.g. student.train's) holds the weights under
    # "model" next to other tensors (RNG state), so "has a tensor" alone does not mean "is a state dict".
    while isinstance(obj, dict):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is not None:
            obj = inner
        elif any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        else:
            raise TeacherLoadError(f"{path}: no state dict found; top-level keys: {sorted(obj)[:10]}")
    if not isinstance(obj, dict):
        raise TeacherLoadError(f"{path}: expected a state dict, found {type(obj).__name__}")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    if is_lukemelas_state_dict(obj):
        obj = convert_state_dict(obj)
    return obj


def _list(keys: list[str], limit: int = 12) -> str:
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_weights(model: nn.Module, path: str, model_name: str) -> None:
    """Strictly load ``path`` into ``model``; raise TeacherLoadError listing missing/unexpected/mis-shaped keys."""
    try:
        with _open(path) as f:
            obj = torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise TeacherLoadError(f"teacher {model_name}: checkpoint not found: {path}") from e
    except pickle.UnpicklingError:  # weights_only refused a global: loading it would run the file's code
        raise TeacherLoadError(f"teacher {model_name}: checkpoint {path} holds more than tensors, numbers, strings "
                               f"and containers; refused, since loading it would run code from the file") from None
    sd = unwrap_state_dict(obj, path)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"teacher {model_name}: checkpoint {path} does not match the model"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_list(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {_list(shapes)}")
        raise TeacherLoadError("; ".join(parts))
    model.load_state_dict(sd, strict=True)


def _resolve_callable(spec: str) -> Callable[..., nn.Module]:
    try:
        return resolve_callable(spec)
    except (ImportError, AttributeError) as e:
        raise TeacherLoadError(f"teacher callable {spec!r} cannot be imported: {e}") from e


def set_stem_stride(model: nn.Module, stride: int) -> str:
    """Set the stride of the model's first convolution (e.g. 1 for a 32 px teacher); return its name."""
    first = getattr(model, "pretrained_cfg", {}).get("first_conv") if hasattr(model, "pretrained_cfg") else None
    modules = dict(model.named_modules())
    conv = modules.get(first) if first else None
    if not isinstance(conv, nn.Conv2d):
        first, conv = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), (None, None))
    if conv is None:
        raise TeacherLoadError("stem_stride: the model has no Conv2d stem")
    conv.stride = (stride, stride)
    return first


def create_model(cfg: TeacherConfig) -> nn.Module:
    """Build the architecture from a timm name or ``module:fn`` callable: random init, or
    timm's pretrained weights with ``cfg.pretrained``."""
    if cfg.callable:
        model = _resolve_callable(cfg.callable)(**cfg.model_kwargs)
    elif cfg.pretrained:
        model = create_pretrained(cfg.name, cfg.pretrained_cfg_overlay, "teacher", num_classes=cfg.num_classes,
                                  **cfg.model_kwargs)
        check_pretrained_cfg(cfg, model.pretrained_cfg)
    else:
        try:
            model = timm.create_model(cfg.name, pretrained=False, num_classes=cfg.num_classes, **cfg.model_kwargs)
        except RuntimeError as e:
            raise TeacherLoadError(f"teacher name {cfg.name!r}: {e}") from e
    if not isinstance(model, nn.Module):
        raise TeacherLoadError(f"teacher callable {cfg.callable!r} returned {type(model).__name__}, not nn.Module")
    if cfg.stem_stride is not None:
        set_stem_stride(model, cfg.stem_stride)
    return model


def check_pretrained_cfg(cfg: TeacherConfig, pcfg: dict) -> None:
    """Refuse a teacher whose config contradicts its timm weights' pretrained_cfg.

    timm silently drops a classifier for another class count (a teacher with a random head), and
    weights scored at another normalization give worse targets without any error.
    """
    where = f"teacher {cfg.name}: timm's pretrained_cfg (with teacher.pretrained_cfg_overlay)"
    if pcfg.get("num_classes") != cfg.num_classes:
        raise TeacherLoadError(f"{where} has {pcfg.get('num_classes')} classes, teacher.num_classes is "
                               f"{cfg.num_classes}: a teacher needs its trained head (weights of another "
                               f"class count: set pretrained_cfg_overlay.num_classes to theirs)")
    for key in ("mean", "std"):
        theirs, ours = pcfg.get(key), getattr(cfg, key)
        if theirs is not None and not all(abs(a - b) < 1e-6 for a, b in zip(theirs, ours)):
            raise TeacherLoadError(f"{where} says {key} {tuple(theirs)}, teacher.{key} is {tuple(ours)}: set "
                                   f"teacher.{key} to the weights' (or pretrained_cfg_overlay.{key} for a file "
                                   f"trained with {tuple(ours)})")


class Teacher:
    """A frozen classifier plus its scoring rule.

    Args:
        model: the network (already loaded).
        cfg: its TeacherConfig.
        device: where it runs.
        k: default number of classes kept by :meth:`score`.
        input_mean, input_std: normalization of the images given to :meth:`score` (e.g. the
            augmentation plan's); when different from ``cfg.mean/std`` the images are
            re-normalized on the fly. ``None`` means the images already use ``cfg.mean/std``.
        checkpoint_sha256: sha256 of the weight file (``checkpoint``, or the file timm's
            pretrained mechanism read), ``"state_dict:<sha256>"`` for timm weights from the hub
            (teacher/weights.py), ``"random"`` for an un-loaded timm model, or
            ``"callable:<module:fn>"`` when the callable supplies its own weights.
    """

    def __init__(self, model: nn.Module, cfg: TeacherConfig, device: str | torch.device = "cpu", k: int = 10,
                 input_mean=None, input_std=None, checkpoint_sha256: str = "random"):
        self.cfg = cfg
        self.device = torch.device(device)
        self.k = k
        self.checkpoint_sha256 = checkpoint_sha256
        self.num_classes = cfg.num_classes
        model = model.eval().requires_grad_(False).to(self.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.module = model
        self.model = torch.compile(model) if cfg.compile else model
        self._affine = None
        if input_mean is not None or input_std is not None:
            in_mean = torch.tensor(input_mean if input_mean is not None else cfg.mean)
            in_std = torch.tensor(input_std if input_std is not None else cfg.std)
            mean, std = torch.tensor(cfg.mean), torch.tensor(cfg.std)
            if not (torch.equal(in_mean, mean) and torch.equal(in_std, std)):
                # x_raw = x_in * in_std + in_mean ; x_teacher = (x_raw - mean) / std
                scale = (in_std / std).view(1, 3, 1, 1).to(self.device)
                shift = ((in_mean - mean) / std).view(1, 3, 1, 1).to(self.device)
                self._affine = (scale, shift)

    def _autocast(self):
        dtype = autocast_dtype(self.cfg.amp, self.device)
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    @torch.inference_mode()
    def forward_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Full float32 logits [B, num_classes] for a normalized image batch [B, 3, H, W]."""
        x = images.to(self.device, non_blocking=non_blocking(self.device)).float()
        if self._affine is not None:
            x = x * self._affine[0] + self._affine[1]
        if channels_last(self.cfg.channels_last, x):
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            logits = self.model(x)
        if isinstance(logits, (tuple, list)):  # distilled models return (cls, dist) in some modes
            logits = logits[0]
        logits = logits.float()
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"teacher {self.cfg.name}: {logits.shape[-1]} logits, config says {self.num_classes}")
        return logits

    @torch.inference_mode()
    def score(self, images: torch.Tensor, k: int | None = None) -> TeacherOutput:
        """Top-k logits (sorted descending), their indices, the full log-sum-exp and the full logits."""
        k = self.k if k is None else k
        if not 1 <= k <= self.num_classes:
            raise ValueError(f"k must be in [1, {self.num_classes}], found {k}")
        logits = self.forward_logits(images)
        values, indices = torch.topk(logits, k, dim=-1, largest=True, sorted=True)
        return TeacherOutput(values=values.float(), indices=indices.long(),
                             lse=torch.logsumexp(logits, dim=-1).float(), logits=logits)


def build_teacher(cfg: TeacherConfig, device: str | torch.device = "cpu", *, k: int = 10,
                  input_mean=None, input_std=None) -> Teacher:
    """Build, load and freeze the teacher described by ``cfg``.

    ``cfg.pretrained`` loads timm's weights for the tag (teacher/weights.py gives their sha256).
    Without either, a timm model keeps its random init (``checkpoint_sha256="random"``);
    a ``callable`` may load its own weights (``checkpoint_sha256="callable:<spec>"``).

    Raises:
        TeacherLoadError: unknown model, missing checkpoint file, or a state dict whose keys or
            shapes do not match (the message lists the missing / unexpected keys); pretrained
            weights of another class count or normalization.
        teacher.weights.WeightsError: timm's pretrained weights cannot be had (offline and not cached) or do not fit.
    """
    model = create_model(cfg)
    if cfg.checkpoint:
        load_weights(model, cfg.checkpoint, cfg.callable or cfg.name)
    return Teacher(model, cfg, device=device, k=k, input_mean=input_mean, input_std=input_std,
                   checkpoint_sha256=checkpoint_sha256(cfg, model))


def checkpoint_sha256(cfg: TeacherConfig, model: nn.Module | None = None) -> str:
    """The identity of the teacher's weights (``Teacher.checkpoint_sha256``, the cache attr a student's
    guard compares): the sha256 of ``cfg.checkpoint``; for timm pretrained weights that of the file
    timm reads, or ``state_dict:<sha256>`` of hub weights (teacher/weights.py);
    ``"callable:<module:fn>"`` for a callable that supplies its own weights; ``"random"`` else.

    Args:
        model: the model built from ``cfg``, when at hand; without it, hub weights are loaded
            only to hash them.
    """
    if cfg.checkpoint:
        return file_sha256(cfg.checkpoint)
    if cfg.pretrained:
        if model is None:
            file = pretrained_file(pretrained_cfg(cfg.name, cfg.pretrained_cfg_overlay))
            if file:
                return file_sha256(file)
            model = create_model(cfg)
        return weights_sha256(model)
    return f"callable:{cfg.callable}" if cfg.callable else "random"


def weights_source(cfg: TeacherConfig) -> str:
    """Where the teacher's weights come from, for messages."""
    if cfg.checkpoint:
        return f"teacher.checkpoint {cfg.checkpoint}"
    if cfg.pretrained:
        file = cfg.pretrained_cfg_overlay.get("file")
        return f"timm pretrained {cfg.name}" + (f" from the file {file}" if file else "")
    return f"teacher.callable {cfg.callable}" if cfg.callable else "random init"


def describe(teacher: Teacher) -> dict:
    """Provenance dict for cache attrs: the config plus the checkpoint hash."""
    return {**teacher.cfg.to_dict(), "checkpoint_sha256": teacher.checkpoint_sha256}


__all__ = ["TeacherConfig", "TeacherOutput", "Teacher", "TeacherLoadError", "build_teacher", "unwrap_state_dict",
           "load_weights", "set_stem_stride", "describe", "weights_source", "checkpoint_sha256"]
