"""How one cached row becomes bytes. Storage-internal.

A row is one (epoch, sample_id, view). The teacher gives top-k log-probs
``lp = logit - logsumexp`` sorted descending, their class indices, the log of the exact tail
mass ``log m = logsumexp(lp outside the top-k)`` and (with a learned tail, storage/tail.py)
int8 tail codes. No per-row seed is stored: the augmentation of a row is fully determined by
the cache-level ``seed`` attribute and the counter rule of
``pipeline.plan.sample_params(cfg, seed, epoch, sample_id, view)``.

Encoding ``"p16-mixed"`` (format_version 3), chosen by measurement (bench/targets.py,
bench/storage.py):

* ``prob`` and ``tail_mass``: uint16 codes of a probability on one fixed grid (``GRID``) that
  is linear where absolute accuracy matters (τ = 1: large probabilities) and logarithmic
  where relative accuracy matters (τ = 3: the tempered weight ``p**(1/τ)`` of a small
  probability): steps of 1/160 for p >= 1/8, of 1/20 nat for 1e-3 <= p < 1/8, of 1/6 nat
  down to e^-60. Format 2 coded p on a 1/255 grid only; every probability below 1/510 became
  code 0, and at k = 100, τ = 3 its rebuild was 0.23 TV away from the teacher where exact
  top-100 is 0.10. The tail mass is stored, not derived as ``1 - Σ p``: with dequantized
  top-k summing to >= 1 a confident row had no tail left at all.
* ``index``: class indices sorted ascending and delta-coded (first index, then the gaps),
  uint16; ``prob`` codes are stored in the same (index) order. Rank order is not stored:
  it is re-derived from the codes when a chunk is decoded (``decode_rows``); classes whose
  probabilities fall in one grid cell come back in ascending class-id order. A runner-up tied
  with the top-1 code is lowered one step, so the top-1 class (the hard-distillation target)
  is always exact.

Chunks are row-major; Blosc zstd-9 with byte-shuffle (the high bytes of codes and gaps are
nearly constant). Measured on real EfficientNet-Lite0 rows (bench/storage.py, bench/targets.py):
at k = 10 the values take 8.0 B, the ids 9.5 B and the tail mass 1.0 B per row (format 2:
5.9 + 9.5 B). The stored rebuild is at most 0.0041 mean TV worse than exact fp32 top-k over
k = 1..100 and τ = 1..4 (format 2: 0.044). This grid was picked from a scan of grids (linear
step, two log steps, on rows no figure is measured on): among those whose excess stays below
0.0045 it is within 0.1 B per row of the cheapest at k = 10.
"""
from __future__ import annotations

import numpy as np

ENCODING = "p16-mixed"
# (linear step for p >= LINEAR_FROM, fine log step down to FINE_TO, coarse log step down to e^LOG_MIN)
LINEAR_STEP, LINEAR_FROM = 1 / 160, 1 / 8
FINE_STEP, FINE_TO = 1 / 20, 1e-3
COARSE_STEP, LOG_MIN = 1 / 6, -60.0


def _grid() -> tuple[np.ndarray, np.ndarray]:
    """(log of the grid values ascending, log of the decision boundaries between neighbours)."""
    lin = 1.0 - LINEAR_STEP * np.arange(round((1 - LINEAR_FROM) / LINEAR_STEP), -1, -1)
    top = np.log(LINEAR_FROM)
    fine = top - FINE_STEP * np.arange(int(np.ceil((top - np.log(FINE_TO)) / FINE_STEP)), 0, -1)
    coarse = fine[0] - COARSE_STEP * np.arange(int(np.ceil((fine[0] - LOG_MIN) / COARSE_STEP)), 0, -1)
    log_v = np.concatenate([coarse, fine, np.log(lin)])
    v = np.exp(log_v)
    # arithmetic midpoints where both neighbours are on the linear part, geometric elsewhere
    linear = v[:-1] >= LINEAR_FROM * (1 - 1e-12)
    bounds = np.where(linear, np.log((v[:-1] + v[1:]) / 2), (log_v[:-1] + log_v[1:]) / 2)
    return log_v, bounds


_LOG_V, _BOUNDS = _grid()
NUM_CODES = len(_LOG_V)


def encode_probs(logp: np.ndarray) -> np.ndarray:
    """Log-probabilities (any shape, -inf allowed) -> nearest grid code, uint16."""
    return np.searchsorted(_BOUNDS, np.asarray(logp, dtype=np.float64)).astype(np.uint16)


def logprob_table() -> np.ndarray:
    """float32 [NUM_CODES] lookup table code -> dequantized log-probability."""
    return _LOG_V.astype(np.float32)


def max_abs_dp() -> float:
    """Bound on |p - p_hat| per top-k entry: half a step, or 1.5 steps for a runner-up lowered
    to break a tie with the top-1."""
    return 1.5 * float(np.diff(np.exp(_LOG_V)).max())


def max_abs_dlogprob() -> float:
    """Bound on |log p - log p_hat| per top-k entry: 1.5 of the largest step of the grid in log
    space (half a step, or 1.5 for a runner-up lowered to break a tie with the top-1)."""
    return 1.5 * float(np.diff(_LOG_V).max())


def encode_rows(logprobs: np.ndarray, indices: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, k] log-probs sorted descending + class indices -> (uint16 codes, uint16 index gaps).

    Both outputs are in ascending class-index order (see module docstring).

    Raises:
        ValueError: an index out of [0, num_classes) or repeated within a row.
    """
    idx = np.asarray(indices).astype(np.int64)
    n, k = idx.shape
    if idx.size and (idx.min() < 0 or idx.max() >= num_classes):
        raise ValueError(f"class index out of range [0, {num_classes}): {idx.min()}..{idx.max()}")
    codes = encode_probs(logprobs).astype(np.int32)
    codes = np.minimum.accumulate(codes, axis=1)  # guards against non-sorted float noise
    if k > 1:  # keep the top-1 unique so that rank 0 survives the reordering
        codes[:, 0] = np.maximum(codes[:, 0], 1)
        codes[:, 1] = np.minimum(codes[:, 1], codes[:, 0] - 1)
        codes = np.minimum.accumulate(codes, axis=1)
    order = np.argsort(idx, axis=1, kind="stable")
    sidx = np.take_along_axis(idx, order, 1)
    gaps = np.diff(sidx, axis=1, prepend=0)
    if k > 1 and n and (gaps[:, 1:] <= 0).any():
        row = int(np.nonzero((gaps[:, 1:] <= 0).any(axis=1))[0][0])
        raise ValueError(f"row {row}: repeated class index in {idx[row].tolist()}")
    return np.take_along_axis(codes, order, 1).astype(np.uint16), gaps.astype(np.uint16)


def decode_rows(codes: np.ndarray, gaps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stored (codes, index gaps) [n, k] -> rank-order (codes uint16, class indices uint16).

    Rank order = codes descending; ties in ascending class id (stable sort of sorted ids).
    """
    idx = np.cumsum(gaps, axis=1, dtype=np.uint16)
    order = np.argsort(-codes.astype(np.int32), axis=1, kind="stable")
    return np.take_along_axis(codes, order, 1), np.take_along_axis(idx, order, 1)


def round_trip(logprobs: np.ndarray, indices: np.ndarray, log_tail: np.ndarray, num_classes: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What a reader returns for these rows: (log-probs f32 [n,k] rank order, indices i64, log tail f32 [n])."""
    codes, idx = decode_rows(*encode_rows(logprobs, indices, num_classes))
    table = logprob_table()
    return table[codes], idx.astype(np.int64), table[encode_probs(log_tail)]
