"""RandAugment with explicit randomness: timm's op functions, our own decisions.

timm's ``RandAugment``/``AugmentOp`` objects draw from the global ``random`` and
``np.random`` modules, so they cannot be replayed.  This module keeps timm's *pixel*
functions (``timm.data.auto_augment.rotate``, ``shear_x``, ``solarize`` ...) and
re-implements only the level -> argument mapping, with the random sign passed in
explicitly.  ``pipeline.plan`` draws the decisions (which ops, applied or not,
magnitude, sign) from its counter-based generator; :func:`apply_op` performs one.

Supported policy strings are timm's RandAugment grammar:
``rand-m<int>-n<int>-p<float>-mstd<float>-mmax<int>-inc<0|1>``
(DeiT uses ``rand-m9-mstd0.5-inc1``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image
from timm.data import auto_augment as taa

LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitude M maps to level M / 10

# Op names, in timm's order (the order matters: op choice indexes this list).
RAND_TRANSFORMS = tuple(taa._RAND_TRANSFORMS)
RAND_INCREASING_TRANSFORMS = tuple(taa._RAND_INCREASING_TRANSFORMS)

# Ops whose argument timm negates with probability 0.5 (``_randomly_negate``).
SIGNED_OPS = frozenset({
    "Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "TranslateX", "TranslateY",
    "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
})


@dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed ``rand-...`` policy string (values only)."""

    magnitude: float = LEVEL_DENOM
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0  # inf = uniform in [0, magnitude]
    magnitude_max: float = LEVEL_DENOM
    ops: tuple[str, ...] = RAND_TRANSFORMS


@lru_cache(maxsize=64)
def parse_rand_augment(config_str: str) -> RandAugmentSpec:
    """Parse timm's RandAugment string; raise ValueError for anything unsupported."""
    parts = config_str.split("-")
    if parts[0] != "rand":
        raise ValueError(f"only RandAugment ('rand-...') policies are supported, got {config_str!r}")
    magnitude, num_layers, prob = LEVEL_DENOM, 2, 0.5
    mstd, mmax, increasing = 0.0, LEVEL_DENOM, False
    for part in parts[1:]:
        key, val = (re.split(r"(\d.*)", part) + [""])[:2]
        if not val:
            raise ValueError(f"{config_str!r}: section {part!r} has no value")
        if key == "m":
            magnitude = float(int(val))
        elif key == "n":
            num_layers = int(val)
        elif key == "p":
            prob = float(val)
        elif key == "mstd":
            mstd = float(val)
            if mstd > 100:  # timm: mstd > 100 means uniform sampling
                mstd = math.inf
        elif key == "mmax":
            mmax = float(int(val))
        elif key == "inc":
            increasing = bool(int(val))
        else:
            raise ValueError(f"{config_str!r}: unsupported section {part!r}")
    if num_layers < 0 or not 0.0 <= prob <= 1.0 or mstd < 0:
        raise ValueError(f"{config_str!r}: need n >= 0, 0 <= p <= 1, mstd >= 0")
    ops = RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS
    return RandAugmentSpec(magnitude, num_layers, prob, mstd, mmax, ops)


def level_args(name: str, magnitude: float, negate: bool) -> tuple:
    """timm's ``LEVEL_TO_ARG[name]`` with the random sign made explicit.

    Translations are *relative* (``TranslateXRel``: fraction of the image side, range
    ±0.45), so at a different output size the shift in pixels scales with the size.
    """
    level = magnitude / LEVEL_DENOM
    sign = -1.0 if negate else 1.0
    if name in ("AutoContrast", "Equalize", "Invert"):
        return ()
    if name == "Rotate":
        return (sign * level * 30.0,)
    if name in ("ShearX", "ShearY"):
        return (sign * level * 0.3,)
    if name in ("TranslateXRel", "TranslateYRel"):
        return (sign * level * 0.45,)  # timm hparams translate_pct default
    if name == "Posterize":
        return (int(level * 4),)
    if name == "PosterizeIncreasing":
        return (4 - int(level * 4),)
    if name == "Solarize":
        return (min(256, int(level * 256)),)
    if name == "SolarizeIncreasing":
        return (256 - min(256, int(level * 256)),)
    if name == "SolarizeAdd":
        return (min(128, int(level * 110)),)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return (level * 1.8 + 0.1,)
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        return (max(0.1, 1.0 + sign * level * 0.9),)
    raise ValueError(f"RandAugment op {name!r} is not supported")


def apply_op(img: Image.Image, name: str, magnitude: float, negate: bool,
             fill: tuple[int, int, int], resample: int) -> Image.Image:
    """Apply one RandAugment op with explicit arguments (no randomness inside)."""
    fn = taa.NAME_TO_OP[name]  # looked up per call so a patched/upgraded timm op is seen
    args = level_args(name, magnitude, negate)
    if fn is taa.posterize and args[0] <= 0:
        # Keeping 0 bits (PosterizeIncreasing at magnitude 10) is a black image, as in
        # older Pillow; Pillow 13 raises there (so timm's own op crashes ~0.15% of DeiT images).
        return Image.new(img.mode, img.size, 0)
    return fn(img, *args, fillcolor=fill, resample=resample)
