"""Rebuild teacher targets from cached top-k log-probabilities (pure functions).

A cached row holds the teacher's top-k log-probabilities at temperature 1
(``logit - logsumexp(logits)``), their class indices, the log of the tail mass
``m = Σ_{j ∉ top-k} p_j`` and, with a learned tail, a tail *shape* (storage/tail.py). The
student needs the full teacher distribution at its own temperature τ, so we rebuild it:

1. the top-k entries keep their log-probabilities ``lp_i``;
2. the tail classes get logits ``s_j + a``: ``s`` is the tail shape (0 = uniform) and the
   offset ``a`` makes their total probability exactly ``m`` at τ = 1;
3. ``p_τ = softmax(z / τ)`` over these reconstructed logits ``z``.

Exactness and error:

* τ = 1: the top-k entries of ``p_1`` equal the teacher's and the tail keeps its true total
  mass; only the split of ``m`` inside the tail is approximated. With a uniform tail, total
  variation to the true distribution is ``≤ m (C-k-1)/(C-k) < m`` and ``KL(true ‖ rebuilt) =
  m·KL(tail ‖ uniform) ≤ m·log(C-k)``.
* any τ: the rebuilt and the true distribution have the same *relative* probabilities
  inside the top-k (ratios ``exp((lp_i - lp_j)/τ)`` are exact), so their total variation is
  ``≤ max(a_τ, b_τ)`` where ``a_τ``/``b_τ`` are the true/rebuilt tail masses at τ. For τ > 1
  a uniform tail *over*-estimates the tail mass (Jensen: ``x**(1/τ)`` is concave), for
  τ < 1 it under-estimates it. At τ = 3 the tail is most of the tempered distribution, which
  is why the shape matters (bench/targets.py). With k = C there is no tail and the rebuild is
  exact for every τ.

Rows without a stored tail mass (plain ``(logprobs, indices)``) use ``m = 1 - Σ exp(lp_i)``.
:func:`targets_from_logits` turns full logits into exactly what a cache row holds (before the
storage quantization); the online teacher mode uses it to emulate a cache of a given k.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from storage.tail import TailModel

__all__ = [
    "TeacherTargets",
    "topk_from_logits",
    "targets_from_logits",
    "teacher_logits_from_topk",
    "soft_target_logprobs",
    "soft_targets",
    "hard_targets",
]

# Smallest tail mass derived as 1 - Σp (rows without a stored tail mass); keeps log() finite
# when rounding makes the top-k probabilities sum to one or more.
_MIN_TAIL_MASS = 1e-12


class TeacherTargets(NamedTuple):
    """Teacher targets for a batch.

    logprobs: [B, k] log-probs at τ=1, sorted descending; indices: [B, k] class ids;
    log_tail: [B] log of the tail mass at τ=1, or None (then ``1 - Σ exp(logprobs)``);
    tail_shape: [B, C] tail-logit shape (storage/tail.py), or None for a uniform tail.
    """

    logprobs: Tensor
    indices: Tensor
    log_tail: Tensor | None = None
    tail_shape: Tensor | None = None


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
        raise ValueError(f"topk_from_logits: k must be in [1, {num_classes}], found {k}")
    logprobs = F.log_softmax(logits.float(), dim=-1)
    values, indices = logprobs.topk(k, dim=-1, largest=True, sorted=True)
    return values, indices.long()


def targets_from_logits(logits: Tensor, k: int, tail: "TailModel | None" = None) -> TeacherTargets:
    """What a cache row of top-``k`` holds, from full logits ``[B, C]``, before storage quantization.

    The tail mass is exact (log-sum-exp of the tail log-probs, float64); with ``tail`` the tail
    shape comes from its int8 codes, exactly as the caching job stores them.
    """
    logprobs, indices = topk_from_logits(logits, k)
    if k == logits.shape[-1]:
        return TeacherTargets(logprobs, indices)
    full = F.log_softmax(logits.double(), dim=-1)
    log_tail = torch.logsumexp(full.scatter(1, indices, -torch.inf), dim=-1).float()
    shape = tail.shape(tail.encode(logits)) if tail is not None else None
    return TeacherTargets(logprobs, indices, log_tail, shape)


def teacher_logits_from_topk(logprobs: Tensor, indices: Tensor, num_classes: int,
                             log_tail: Tensor | None = None, tail_shape: Tensor | None = None) -> Tensor:
    """Reconstructed teacher logits ``[B, C]`` (normalised up to storage rounding: logsumexp ≈ 0 at τ=1).

    Top-k classes get their log-probability; the tail classes get ``tail_shape`` (0 = uniform)
    shifted so that their total probability is the tail mass (``exp(log_tail)``, or
    ``1 - Σ exp(logprobs)`` when ``log_tail`` is None).
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
    if tail_shape is not None and tail_shape.shape != (batch, num_classes):
        raise ValueError(f"teacher targets: tail_shape {tuple(tail_shape.shape)}, expected {(batch, num_classes)}")
    logprobs, indices = logprobs.float(), indices.long()
    if k == num_classes:
        return torch.full((batch, num_classes), -torch.inf, device=logprobs.device).scatter(1, indices, logprobs)
    if log_tail is None:
        # Summed in float64: the tail mass can be ~1e-6 and 1 - Σp loses it in float32.
        mass = 1.0 - logprobs.double().exp().sum(dim=-1)
        log_tail = mass.clamp_min(_MIN_TAIL_MASS).log().float()
    if tail_shape is None:
        logits = (log_tail.float() - torch.log(torch.tensor(float(num_classes - k))))[:, None]
        logits = logits.expand(batch, num_classes).clone()
    else:
        shape = tail_shape.float().scatter(1, indices, -torch.inf)
        logits = shape - torch.logsumexp(shape, dim=-1, keepdim=True) + log_tail.float()[:, None]
    return logits.scatter(1, indices, logprobs)


def soft_target_logprobs(logprobs: Tensor, indices: Tensor, num_classes: int, tau: float, *,
                         log_tail: Tensor | None = None, tail_shape: Tensor | None = None) -> Tensor:
    """``log p_τ`` ``[B, C]`` (log of ``soft_targets``; use it for a KL with ``log_target=True``)."""
    if tau <= 0:
        raise ValueError(f"soft targets: tau must be > 0, found {tau}")
    logits = teacher_logits_from_topk(logprobs, indices, num_classes, log_tail, tail_shape)
    return F.log_softmax(logits / tau, dim=-1)


def soft_targets(logprobs: Tensor, indices: Tensor, num_classes: int, tau: float, *,
                 log_tail: Tensor | None = None, tail_shape: Tensor | None = None) -> Tensor:
    """Teacher distribution ``p_τ`` ``[B, C]`` rebuilt from a cached row (see module doc).

    Args:
        logprobs: ``[B, k]`` teacher log-probabilities at τ=1 (logit − logsumexp).
        indices: ``[B, k]`` class indices of those entries.
        num_classes: C.
        tau: distillation temperature (> 0).
        log_tail: ``[B]`` log tail mass at τ=1 (None: ``1 - Σ exp(logprobs)``).
        tail_shape: ``[B, C]`` tail-logit shape (None: uniform tail).
    Returns:
        ``[B, C]`` float32 probabilities, rows sum to 1.
    """
    return soft_target_logprobs(logprobs, indices, num_classes, tau, log_tail=log_tail, tail_shape=tail_shape).exp()


def hard_targets(indices: Tensor) -> Tensor:
    """Teacher argmax ``[B]`` (int64): the first of the descending-sorted top-k indices."""
    return indices[:, 0].long()
