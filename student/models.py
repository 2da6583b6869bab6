"""Student models: any timm architecture by name, plus DeiT distillation-token handling.

A ``deit_*_distilled_*`` model has two heads (class token and distillation token). We put it
in *distilled training* so that ``model.train()`` returns ``(cls, dist)`` (for
``DistillationLoss``) and ``model.eval()`` returns the late-fused ``(cls + dist) / 2`` (DeiT).
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable

import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.utils import ModelEmaV3
from torch import Tensor, nn

from pipeline.config import ConfigError, resolve_callable
from student.checkpoint import CheckpointError, load_checkpoint
from teacher.model import set_stem_stride, unwrap_state_dict
from teacher.weights import create_pretrained, resolved_tag

__all__ = ["build_student", "is_distilled", "unwrap", "eval_heads", "load_for_finetune", "describe_load"]


def is_distilled(model: nn.Module) -> bool:
    """True for a model with a separate distillation head (timm ``VisionTransformerDistilled``)."""
    model = unwrap(model)
    return hasattr(model, "head_dist") and hasattr(model, "set_distilled_training")


def build_student(
    name: str,
    num_classes: int,
    img_size: int,
    drop_path_rate: float = 0.1,
    model_kwargs: dict[str, Any] | None = None,
    checkpoint: str | None = None,
    log: Callable[[str], Any] | None = None,
    *,
    pretrained: bool = False,
    pretrained_cfg_overlay: dict | None = None,
) -> nn.Module:
    """Create a timm student: random init, or fine-tuning from a file or timm's pretrained weights.

    Args:
        name: timm model name, e.g. ``deit_small_distilled_patch16_224`` or ``resnet18``, or
            ``module:fn`` called with ``num_classes``, ``img_size`` and the kwargs.
        num_classes: C.
        img_size: training resolution; passed to ViT-family models (convnets ignore it).
        drop_path_rate: stochastic depth.
        model_kwargs: extra timm kwargs (tiny CPU variants: ``patch_size``, ``embed_dim``,
            ``depth``, ``num_heads``...); ``stem_stride`` sets the first conv's stride (convnets);
            ``channels_last: true`` runs the model (weights and inputs) in channels_last.
        checkpoint: optional weights file loaded with :func:`load_for_finetune`.
        log: where the checkpoint report goes (what was loaded, resized, re-initialised).
        pretrained: start from timm's weights for ``name`` (``arch.tag``) instead: timm builds
            the tag's own model with them (Hugging Face cache, ``HF_HUB_OFFLINE`` honored;
            teacher/weights.py), and :func:`load_for_finetune` moves them into this one, with the
            same rules and report as ``checkpoint`` (timm itself would drop a head of another
            class count and then load the rest non-strictly).
        pretrained_cfg_overlay: keys replacing the tag's timm pretrained_cfg (``{"file": PATH}``:
            a local file; ``num_classes`` / ``input_size`` describe a file's head and resolution).
    Returns:
        The model; distilled DeiTs have distilled training enabled.
    Raises:
        ConfigError: unknown model name, or a ``model_kwargs`` key the architecture does not take.
        CheckpointError: ``checkpoint`` (or the pretrained weights) does not fit the model (names the keys).
        WeightsError: timm's pretrained weights cannot be had (offline and not cached) or do not fit.
    """
    kwargs = dict(model_kwargs or {})
    # Not a timm kwarg: the stride of the first conv (1 for a 32 px convnet), as in TeacherConfig,
    # so student.train can also train a small teacher.
    stem_stride = kwargs.pop("stem_stride", None)
    channels_last = bool(kwargs.pop("channels_last", False))
    kwargs.setdefault("drop_path_rate", drop_path_rate)
    model = _create(name, num_classes, img_size, kwargs)
    if stem_stride is not None:
        set_stem_stride(model, int(stem_stride))
    if channels_last:
        # Grouped-conv backward on CPU is ~5x faster in channels_last (weights AND inputs).
        model = model.to(memory_format=torch.channels_last)
        model.register_forward_pre_hook(_inputs_channels_last)
    if is_distilled(model):
        model.set_distilled_training(True)
    if checkpoint:
        # teacher.model knows the wrappers checkpoints come in ({"model": sd}, {"state_dict": sd}, "module." prefixes)
        source, state = f"model.checkpoint {checkpoint}", unwrap_state_dict(load_checkpoint(checkpoint), checkpoint)
    elif pretrained:
        source = f"model.pretrained {resolved_tag(name, pretrained_cfg_overlay)}"
        state = create_pretrained(name, pretrained_cfg_overlay, "model", **kwargs).state_dict()
    else:
        return model
    report = load_for_finetune(model, state, source)
    if log is not None:
        log(describe_load(source, name, report))
    return model


def _inputs_channels_last(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous(memory_format=torch.channels_last) if torch.is_tensor(a) and a.dim() == 4 else a
                 for a in args)


_UNEXPECTED_KWARG = re.compile(r"unexpected keyword argument '(\w+)'")


def _create(name: str, num_classes: int, img_size: int, kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model`` (or ``module:fn``); a name or kwarg timm rejects becomes a ConfigError
    naming the key."""
    if ":" in name:  # "module:fn", e.g. the bench-only bench.simulated:sleeping_net
        return resolve_callable(name)(num_classes=num_classes, img_size=img_size, **kwargs)
    try:
        # ViT-family constructors need img_size to size their position embedding; most convnets
        # reject the kwarg, so retry without it.
        if "img_size" not in kwargs:
            try:
                return timm.create_model(
                    name, pretrained=False, num_classes=num_classes, img_size=img_size, **kwargs
                )
            except TypeError as e:
                if "'img_size'" not in str(e):
                    raise
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except TypeError as e:
        bad = _UNEXPECTED_KWARG.search(str(e))
        if bad is None:
            raise
        key = bad.group(1)
        raise ConfigError(
            f"model.model_kwargs.{key}: {name} does not take {key!r} (model_kwargs go to the timm "
            f"constructor as they are; an override replaces the whole mapping: model.model_kwargs={{}} "
            f"clears kwargs written for another architecture)") from None
    except RuntimeError as e:
        if "Unknown model" not in str(e):
            raise
        raise ConfigError(f"model.name: {name!r} is not a timm model name (timm.list_models() lists them)") from None


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / DataParallel / ModelEmaV3 / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel, ModelEmaV3)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def eval_heads(model: nn.Module, images: Tensor) -> dict[str, Tensor]:
    """Logits of every head for the DeiT head analysis (call under ``torch.no_grad`` in eval).

    Wrappers (DDP, EMA, compile) are unwrapped for distilled models so both heads are read.

    Returns:
        ``{"cls", "dist", "fused"}`` for distilled models (``fused = (cls + dist) / 2``);
        ``{"cls", "fused"}`` (the same tensor) otherwise.
    """
    bare = unwrap(model)
    if is_distilled(bare):
        feats = bare.forward_features(images)
        cls = bare.head(bare.head_drop(feats[:, 0]))
        dist = bare.head_dist(bare.head_drop(feats[:, 1]))
        return {"cls": cls, "dist": dist, "fused": (cls + dist) / 2}
    out = model(images)
    return {"cls": out, "fused": out}


def load_for_finetune(model: nn.Module, state_dict: dict[str, Tensor], source: str = "<checkpoint>") -> dict:
    """Load weights strictly, allowing exactly two differences, and report what was done.

    Allowed: the absolute position embedding is resampled to the model's patch grid
    (bicubic, prefix tokens kept), because DeiT fine-tunes at a higher resolution than it
    trains (224 -> 384); and classifier heads whose shape differs (a new class count) keep
    their initialisation. Anything else (a missing or unexpected key, another shape
    mismatch) means the file was made for another model and is refused.

    Args:
        model: the freshly built student.
        state_dict: the weights (already unwrapped).
        source: the file, for messages.
    Returns:
        ``{"loaded": [keys], "resized": {key: (old_shape, new_shape)}, "reinitialised": [keys]}``.
    Raises:
        CheckpointError: naming the missing / unexpected / mis-shaped keys.
    """
    state = dict(state_dict)
    own = model.state_dict()
    resized = {}
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        old_tokens = state["pos_embed"].shape[1] - prefix
        side = math.isqrt(max(old_tokens, 0))
        # Resizable: same width and prefix tokens, a square grid; else it is reported as a mismatch.
        if side * side == old_tokens and state["pos_embed"].shape[2] == own["pos_embed"].shape[2]:
            old_shape = tuple(state["pos_embed"].shape)
            state["pos_embed"] = resample_abs_pos_embed(
                state["pos_embed"], new_size=list(model.patch_embed.grid_size), old_size=[side, side],
                num_prefix_tokens=prefix)
            resized["pos_embed"] = (old_shape, tuple(own["pos_embed"].shape))
    heads = _classifier_names(model)
    mis_shaped = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    reinit = [k for k in mis_shaped if k.rsplit(".", 1)[0] in heads]
    bad_shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in mis_shaped if k not in reinit]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected or bad_shapes:
        parts = [f"{source} does not fit {type(model).__name__}"]
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", bad_shapes)):
            if keys:
                parts.append(f"{len(keys)} {what} ({_first(keys)})")
        raise CheckpointError("; ".join(parts) + ". Allowed differences: a classifier head for another class "
                              "count, a position embedding for another resolution")
    for k in reinit:
        state[k] = own[k]
    model.load_state_dict(state, strict=True)
    return {"loaded": [k for k in state if k not in reinit], "resized": resized, "reinitialised": reinit}


def describe_load(source: str, name: str, report: dict) -> str:
    """One line: what :func:`load_for_finetune` loaded from ``source`` (``model.checkpoint FILE``,
    ``model.pretrained TAG``), resized and re-initialised."""
    text = f"{source}: loaded {len(report['loaded'])} tensors into {name}"
    for key, (old, new) in report["resized"].items():
        text += f"; resized {key} {old} -> {new}"
    if report["reinitialised"]:
        text += f"; re-initialised {', '.join(report['reinitialised'])} (another class count)"
    return text


def _classifier_names(model: nn.Module) -> set[str]:
    """Module names of the classifier head(s), from timm's pretrained_cfg (``('head', 'head_dist')``)."""
    names = getattr(unwrap(model), "pretrained_cfg", {}).get("classifier") or ("head", "fc", "classifier")
    return {names} if isinstance(names, str) else set(names)


def _first(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f", ... +{len(keys) - limit} more" if len(keys) > limit else "")
