"""Rebuild teacher targets from cached top-k log-probabilities (pure functions).

The cache stores, per row, the teacher's top-k log-probabilities at temperature 1
(``logit - logsumexp(logits)``) and their class indices. The student needs the full
teacher distribution at its own temperature τ, so we rebuild it:

1. the top-k entries keep their log-probabilities ``lp_i``;
2. the tail mass ``m = 1 - Σ_i exp(lp_i)`` is spread uniformly over the other ``C - k``
   classes, i.e. each tail class gets the log-probability ``log(m / (C - k))``;
3. ``p_τ = softmax(z / τ)`` over these reconstructed logits ``z``.

Exactness and error:

* τ = 1: the reconstructed ``z`` already sum to one in probability space, so the top-k
  entries of ``p_1`` equal the teacher's exactly and the tail keeps its true total mass;
  only the split of ``m`` inside the tail is approximated. Total variation to the true
  distribution is ``≤ m (C-k-1)/(C-k) < m`` and ``KL(true ‖ rebuilt) = m·KL(tail ‖ uniform)
  ≤ m·log(C-k)``. On peaked 100-class logits (mean top-1 prob 0.86) the mean KL is ≈0.03
  nats at k=10, 0.06 at k=5, 0.25 at k=1 (tests/test_losses.py).
* any τ: the rebuilt and the true distribution have the same *relative* probabilities
  inside the top-k (ratios ``exp((lp_i - lp_j)/τ)`` are exact), so their total variation is
  ``≤ max(a_τ, b_τ)`` where ``a_τ``/``b_τ`` are the true/rebuilt tail masses at τ. For τ > 1
  the uniform tail *over*-estimates the tail mass (Jensen: ``x**(1/τ)`` is concave), for
  τ < 1 it under-estimates it. With k = C there is no tail and the rebuild is exact for
  every τ.

The online teacher mode (teacher in the loop) goes through ``topk_from_logits`` and the
same rebuild, so online and cached students see identical targets for equal k.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "TeacherTargets",
    "topk_from_logits",
    "teacher_logits_from_topk",
    "soft_target_logprobs",
    "soft_targets",
    "hard_targets",
]

# Smallest tail mass we represent; keeps log() finite when storage rounding makes the
# top-k probabilities sum to (slightly more than) one.
_MIN_TAIL_MASS = 1e-12


class TeacherTargets(NamedTuple):
    """Teacher top-k for a batch: log-probs at τ=1 (sorted descending) and class indices."""

    logprobs: Tensor  # [B, k] float
    indices: Tensor  # [B, k] int64


def topk_from_logits(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k log-probabilities (τ=1, sorted descending) and indices from full logits.

    Args:
        logits: ``[B, C]`` teacher logits.
        k: number of entries kept (``1 <= k <= C``).
    Returns:
        ``(logprobs [B, k] float32, indices [B, k] int64)``.
    """
    num_classes = logits.shape[-1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"topk_from_logits: k must be in [1, {num_classes}], got {k}")
    logprobs = F.log_softmax(logits.float(), dim=-1)
    values, indices = logprobs.topk(k, dim=-1, largest=True, sorted=True)
    return values, indices.long()


def teacher_logits_from_topk(logprobs: Tensor, indices: Tensor, num_classes: int) -> Tensor:
    """Reconstructed teacher logits ``[B, C]`` (normalised: logsumexp ≈ 0 at τ=1).

    Top-k classes get their stored log-probability; every other class gets
    ``log(m / (C - k))`` with ``m = 1 - Σ exp(logprobs)`` the tail mass.
    """
    if logprobs.shape != indices.shape or logprobs.dim() != 2:
        raise ValueError(
            f"teacher targets: logprobs {tuple(logprobs.shape)} and indices "
            f"{tuple(indices.shape)} must both be [B, k]"
        )
    batch, k = logprobs.shape
    if k > num_classes:
        raise ValueError(f"teacher targets: k={k} exceeds num_classes={num_classes}")
    # Range check on CPU only: on an accelerator it would force a sync every step, and an
    # out-of-range scatter index raises a device-side assert there anyway.
    if indices.device.type == "cpu" and indices.numel() and (
        int(indices.min()) < 0 or int(indices.max()) >= num_classes
    ):
        raise ValueError(
            f"teacher targets: class index out of range [0, {num_classes}): "
            f"min {int(indices.min())}, max {int(indices.max())}"
        )
    logprobs = logprobs.float()
    if k == num_classes:
        tail_logit = torch.full((batch, 1), -math.inf, device=logprobs.device)
    else:
        # Summed in float64: the tail mass can be ~1e-6 and 1 - Σp loses it in float32.
        mass = 1.0 - logprobs.double().exp().sum(dim=-1, keepdim=True)
        mass = mass.clamp_min(_MIN_TAIL_MASS)
        tail_logit = (mass / (num_classes - k)).log().float()
    logits = tail_logit.expand(batch, num_classes).clone()
    logits.scatter_(1, indices.long(), logprobs)
    return logits


def soft_target_logprobs(logprobs: Tensor, indices: Tensor, num_classes: int, tau: float) -> Tensor:
    """``log p_τ`` ``[B, C]`` (log of ``soft_targets``; use it for a KL with ``log_target=True``)."""
    if tau <= 0:
        raise ValueError(f"soft targets: tau must be > 0, got {tau}")
    logits = teacher_logits_from_topk(logprobs, indices, num_classes)
    return F.log_softmax(logits / tau, dim=-1)


def soft_targets(logprobs: Tensor, indices: Tensor, num_classes: int, tau: float) -> Tensor:
    """Teacher distribution ``p_τ`` ``[B, C]`` rebuilt from top-k log-probs (see module doc).

    Args:
        logprobs: ``[B, k]`` teacher log-probabilities at τ=1 (logit − logsumexp).
        indices: ``[B, k]`` class indices of those entries.
        num_classes: C.
        tau: distillation temperature (> 0).
    Returns:
        ``[B, C]`` float32 probabilities, rows sum to 1.
    """
    return soft_target_logprobs(logprobs, indices, num_classes, tau).exp()


def hard_targets(indices: Tensor) -> Tensor:
    """Teacher argmax ``[B]`` (int64): the first of the descending-sorted top-k indices."""
    return indices[:, 0].long()
