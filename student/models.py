"""Student models: any timm architecture by name, plus DeiT distillation-token handling.

A ``deit_*_distilled_*`` model has two heads (class token and distillation token). We put it
in *distilled training* so that ``model.train()`` returns ``(cls, dist)`` (for
``DistillationLoss``) and ``model.eval()`` returns the late-fused ``(cls + dist) / 2`` (DeiT).
"""
from __future__ import annotations

import importlib
import math
from typing import Any

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

__all__ = ["build_student", "is_distilled", "unwrap", "eval_heads", "load_for_finetune"]


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
) -> nn.Module:
    """Create a randomly initialised timm student (``pretrained=False``, no network).

    Args:
        name: timm model name, e.g. ``deit_small_distilled_patch16_224`` or ``resnet18``, or
            ``module:fn`` called with ``num_classes``, ``img_size`` and the kwargs.
        num_classes: C.
        img_size: training resolution; passed to ViT-family models (convnets ignore it).
        drop_path_rate: stochastic depth.
        model_kwargs: extra timm kwargs (tiny CPU variants: ``patch_size``, ``embed_dim``,
            ``depth``, ``num_heads``...); ``stem_stride`` sets the first conv's stride (convnets);
            ``channels_last: true`` runs the model (weights and inputs) in channels_last.
        checkpoint: optional state-dict file loaded with ``load_for_finetune``.
    Returns:
        The model; distilled DeiTs have distilled training enabled.
    """
    kwargs = dict(model_kwargs or {})
    # Not a timm kwarg: the stride of the first conv (1 for a 32 px convnet), as in TeacherConfig,
    # so student.train can also train a small teacher.
    stem_stride = kwargs.pop("stem_stride", None)
    channels_last = bool(kwargs.pop("channels_last", False))
    kwargs.setdefault("drop_path_rate", drop_path_rate)
    model = _create(name, num_classes, img_size, kwargs)
    if stem_stride is not None:
        from teacher.model import set_stem_stride  # local: only convnet teachers need it

        set_stem_stride(model, int(stem_stride))
    if channels_last:
        # Grouped-conv backward on CPU is ~5x faster in channels_last (weights AND inputs).
        model = model.to(memory_format=torch.channels_last)
        model.register_forward_pre_hook(_inputs_channels_last)
    if is_distilled(model):
        model.set_distilled_training(True)
    if checkpoint:
        from student.checkpoint import load_checkpoint  # local: checkpoint imports nothing of ours

        state = load_checkpoint(checkpoint)
        load_for_finetune(model, state.get("model", state))
    return model


def _inputs_channels_last(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous(memory_format=torch.channels_last) if torch.is_tensor(a) and a.dim() == 4 else a
                 for a in args)


def _create(name: str, num_classes: int, img_size: int, kwargs: dict[str, Any]) -> nn.Module:
    if ":" in name:  # "module:fn", e.g. the bench-only teacher.simulated:sleeping_net
        module, _, fn = name.partition(":")
        return getattr(importlib.import_module(module), fn)(num_classes=num_classes, img_size=img_size, **kwargs)
    # ViT-family constructors need img_size to size their position embedding; most convnets
    # reject the kwarg, so retry without it.
    if "img_size" not in kwargs:
        try:
            return timm.create_model(
                name, pretrained=False, num_classes=num_classes, img_size=img_size, **kwargs
            )
        except TypeError as e:
            if "img_size" not in str(e):
                raise
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / DataParallel / ModelEmaV3 / torch.compile wrappers."""
    from timm.utils import ModelEmaV3

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


def load_for_finetune(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, list[str]]:
    """Load weights, resampling the absolute position embedding to the model's grid.

    DeiT fine-tunes at a higher resolution than it trains (224 → 384): the patch grid grows,
    so ``pos_embed`` is bicubically interpolated (prefix tokens kept). Classifier weights whose
    shape differs (new ``num_classes``) are dropped and left at their initialisation.

    Returns:
        ``{"missing": [...], "unexpected": [...], "dropped": [...]}``.
    """
    state = dict(state_dict)
    own = model.state_dict()
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        grid = list(model.patch_embed.grid_size)
        old_tokens = state["pos_embed"].shape[1] - prefix
        side = int(math.isqrt(old_tokens))
        if side * side != old_tokens:
            raise ValueError(
                f"load_for_finetune: pos_embed has {old_tokens} patch tokens, not a square grid"
            )
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], new_size=grid, old_size=[side, side], num_prefix_tokens=prefix
        )
    dropped = [
        k for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    bad = [k for k in dropped if not k.startswith(("head", "fc.", "classifier"))]
    if bad:
        raise ValueError(
            f"load_for_finetune: shape mismatch for {bad[0]}: checkpoint "
            f"{tuple(state[bad[0]].shape)} vs model {tuple(own[bad[0]].shape)}"
        )
    for k in dropped:
        del state[k]
    result = model.load_state_dict(state, strict=False)
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys), "dropped": dropped}
