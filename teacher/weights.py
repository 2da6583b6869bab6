"""Weights the timm way: ``name: regnety_160.deit_in1k`` with ``pretrained: true``.

timm's own mechanism loads them, ``timm.create_model(name, pretrained=True,
pretrained_cfg_overlay=...)``: the Hugging Face hub cache (``HF_HOME``; ``HF_HUB_OFFLINE=1``
reads only the cache), or, with ``pretrained_cfg_overlay: {file: PATH}``, a local file read
through the same code path (timm's ``load_state_dict``: a state dict, ``.pth`` or
``.safetensors``). Nothing here downloads by itself; timm does, when the hub is reachable and
offline mode is off.

**Identity** (the cache attr ``checkpoint_sha256`` that a student's guard compares):

* timm read a local file (``pretrained_cfg_overlay.file``): the sha256 of that file, the value
  ``teacher.checkpoint`` gives for the same file;
* timm fetched the weights itself (hub or URL): timm does not say which file it read
  (``model.safetensors`` or ``pytorch_model.bin``, from the cache or downloaded), so the
  identity is ``state_dict:<sha256>`` of the loaded state dict (every tensor's name, dtype,
  shape and bytes, in name order): the same weights give the same value on every node, and
  the same weights as a local file give another value than the file's (a refusal, never a
  false match).
"""
from __future__ import annotations

import hashlib
import os
import re
from typing import Any

import timm
import torch
from timm.models import is_model, resolve_pretrained_cfg, split_model_name_tag
from timm.models._builder import _resolve_pretrained_source
from torch import nn

from pipeline.urls import file_sha256


class WeightsError(ValueError):
    """Pretrained weights that cannot be had or do not fit; names the tag and what to do."""


def pretrained_cfg(name: str, overlay: dict | None = None) -> dict:
    """timm's pretrained config for ``name`` (``arch`` or ``arch.tag``) with ``overlay`` applied.

    Raises:
        WeightsError: an unknown architecture or tag.
    """
    arch, tag = split_model_name_tag(name)
    if not is_model(arch):
        raise WeightsError(f"{name!r} is not a timm model name (timm.list_models() lists them)")
    try:
        return resolve_pretrained_cfg(arch, tag or None, overlay).to_dict()
    except RuntimeError as e:  # "Invalid pretrained tag (x) for arch."
        raise WeightsError(f"{name!r}: {e} (timm.list_pretrained('{arch}*') lists the tags)") from e


def resolved_tag(name: str, overlay: dict | None = None) -> str:
    """``arch.tag`` of the weights timm loads for ``name`` (its default tag when none is given)."""
    cfg = pretrained_cfg(name, overlay)
    return f"{cfg['architecture']}.{cfg['tag']}" if cfg.get("tag") else cfg["architecture"]


def _source(cfg: dict) -> tuple[str, Any]:
    # timm's own rule (its load_pretrained calls it), so "which source" cannot drift from timm's:
    # ("file" | "hf-hub" | "url" | "local-dir" | "state_dict" | "", location)
    return _resolve_pretrained_source(cfg)


def pretrained_file(cfg: dict) -> str | None:
    """The local file timm loads for pretrained config ``cfg``, or None when it fetches the weights."""
    load_from, location = _source(cfg)
    return location if load_from == "file" else None


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """``state_dict:<sha256>`` over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return "state_dict:" + h.hexdigest()


def weights_sha256(model: nn.Module) -> str:
    """Identity of the pretrained weights ``model`` was built with (see the module docstring)."""
    file = pretrained_file(model.pretrained_cfg)
    return file_sha256(file) if file else state_dict_sha256(model.state_dict())


def create_pretrained(name: str, overlay: dict | None, field: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)``.

    Args:
        name: timm name, ``arch`` or ``arch.tag``.
        overlay: keys replacing the tag's pretrained config (``{"file": PATH}``: a local file).
        field: the config section, for messages (``teacher`` or ``model``).
        kwargs: timm constructor arguments.
    Raises:
        WeightsError: unknown tag, weights not in the cache (offline) or unreachable, an
            unreadable overlay file, or weights that do not fit the architecture.
    """
    # an unknown name or tag, no weights at all, or a missing file is named before timm tries anything
    load_from, location = _source(pretrained_cfg(name, overlay))
    if not load_from:
        raise WeightsError(f"{field}.pretrained: timm has no pretrained weights for {name} "
                           f"(timm.list_pretrained('{name.split('.')[0]}*') lists those it has)")
    if load_from == "file" and not os.path.isfile(location):
        raise WeightsError(f"{field}.pretrained_cfg_overlay.file: {location} not found (weights for {name})")
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay or None, **kwargs)
    except OSError as e:  # huggingface_hub's LocalEntryNotFoundError (offline, not cached), no network
        raise WeightsError(_not_found(name, field)) from e
    except RuntimeError as e:  # a state dict that does not fit (timm loads strictly)
        detail = re.sub(r"\s+", " ", str(e)).strip()
        raise WeightsError(f"{field}.pretrained: the weights of {name} do not fit the model built with "
                           f"{field}.model_kwargs: {detail[:400]}") from e


def _not_found(name: str, field: str) -> str:
    return (f"{field}.pretrained: timm's weights for {name} are not in the Hugging Face cache and cannot be "
            f"fetched (offline: HF_HUB_OFFLINE=1, or no network). Fetch them once where the hub is reachable "
            f"(python -c \"import timm; timm.create_model('{name}', pretrained=True)\", same HF_HOME), or "
            f"give a local file: {field}.pretrained_cfg_overlay.file=PATH (timm's format) or "
            f"{field}.checkpoint=PATH")
