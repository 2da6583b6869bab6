"""How one cached row (top-k log-probs + class indices) becomes bytes. Storage-internal.

A row is one (epoch, sample_id, view). The teacher gives top-k log-probs
``lp = logit - logsumexp`` sorted descending and their class indices. No per-row seed is
stored: the augmentation of a row is fully determined by the cache-level ``seed`` attribute
and the counter rule of ``pipeline.plan.sample_params(cfg, seed, epoch, sample_id, view)``.

Encoding ``"q16"`` (format_version 1, the default):

* ``logp``: uint8 codes ``c_j = clip(round(-lp_j * 16), 0, 255)`` — a fixed step of 1/16 nat,
  range [-15.94, 0] (a probability below 1.2e-7 is clipped to that, harmless for a soft
  target). Codes are non-decreasing along the row, so the row is stored as its first code then
  the gaps ``c_j - c_{j-1}`` (small numbers). Dequantized ``lp_j = -c_j / 16``.
  Error: |lp - lp_hat| <= 1/32 nat, i.e. each probability within a factor exp(±1/32)
  (±3.2 % relative); measured errors are in bench/results/storage.json.
* ``index``: uint16 class indices in rank order.

Chunks hold rank-major data (a transpose codec puts all rank-0 values of a chunk together,
then rank-1 ...), which is what makes the gaps and the high index bytes compress; both
arrays then go through Blosc(zstd, clevel 9) with bit-shuffle for the uint16 indices.
"""
from __future__ import annotations

import numpy as np

STEP = 1.0 / 16.0
MAX_CODE = 255


def encode_logprobs(logprobs: np.ndarray) -> np.ndarray:
    """[..., k] float log-probs sorted descending -> uint8 gap codes [..., k]."""
    codes = np.clip(np.rint(-np.asarray(logprobs, dtype=np.float64) / STEP), 0, MAX_CODE).astype(np.int16)
    codes = np.maximum.accumulate(codes, axis=-1)  # guards against non-sorted float noise
    gaps = np.diff(codes, axis=-1, prepend=np.zeros_like(codes[..., :1]))
    return gaps.astype(np.uint8)


def decode_codes(gaps: np.ndarray) -> np.ndarray:
    """uint8 gap codes [..., k] -> absolute uint8 codes [..., k] (cumulative sum)."""
    return np.cumsum(gaps, axis=-1, dtype=np.uint16).astype(np.uint8)


def codes_to_logprobs(codes: np.ndarray) -> np.ndarray:
    """Absolute codes -> float32 log-probs."""
    return codes.astype(np.float32) * np.float32(-STEP)


def encode_indices(indices: np.ndarray, num_classes: int) -> np.ndarray:
    """int class indices -> uint16 (raises if out of range)."""
    indices = np.asarray(indices)
    if indices.size and (indices.min() < 0 or indices.max() >= num_classes):
        raise ValueError(f"class index out of range [0, {num_classes}): {indices.min()}..{indices.max()}")
    return indices.astype(np.uint16)
