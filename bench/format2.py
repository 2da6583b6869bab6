"""The format-2 cache encoding ("p8-sorted", replaced by format 3), kept only as the benchmarks' reference.

Probabilities as uint8 codes on a 1/255 grid (1/31 at k = 1), code 0 dequantized to 1/(6L); no
stored tail mass: the rebuild takes ``1 - Σ p`` (floored at 1e-12) spread uniformly.
"""
from __future__ import annotations

import numpy as np


def levels(k: int) -> int:
    return 31 if k == 1 else 255


def codes(logprobs: np.ndarray, k: int) -> np.ndarray:
    """uint8 codes [n, k] in rank order (the stored order is class-id order; sizes use that)."""
    c = np.clip(np.rint(np.exp(logprobs.astype(np.float64)) * levels(k)), 0, levels(k)).astype(np.int16)
    c = np.minimum.accumulate(c, axis=1)
    if k > 1:  # the top-1 tie-break of format 2
        c[:, 0] = np.maximum(c[:, 0], 1)
        c[:, 1] = np.minimum(c[:, 1], c[:, 0] - 1)
        c = np.minimum.accumulate(c, axis=1)
    return c.astype(np.uint8)


def dequantized(logprobs: np.ndarray, k: int) -> np.ndarray:
    """Format 2's stored log-probs [n, k] (what its reader returned)."""
    c = codes(logprobs, k).astype(np.float64)
    return np.log(np.where(c > 0, c / levels(k), 1 / (6 * levels(k)))).astype(np.float32)
