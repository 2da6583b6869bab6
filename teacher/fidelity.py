"""How close a rebuilt soft target is to the full teacher distribution (pure functions).

Both figures compare ``p_τ = softmax(logits / τ)`` of the full teacher with the rebuilt
``q_τ`` (storage/targets.py): total variation ``½ Σ |p - q|`` and ``KL(p ‖ q)``, the term the
soft distillation loss would add if the student matched the rebuilt target exactly.

The caching job measures, per work item, the sums of both over rows for several k (larger k
too: it holds the full logits) and τ (:func:`item_record`, against what the cache stores) and
hands the record to the cache writer; the student reads the means back
(``storage.fidelity.summarize``, ``CacheReader.fidelity``) and words them (:func:`advice`).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from storage.targets import TeacherTargets, soft_target_logprobs, targets_from_logits

TAUS = (1.0, 2.0, 3.0, 4.0)
KS = (1, 5, 10, 20, 50, 100)
FIDELITY_ROWS = 256  # rows per item whose fidelity is recorded (the first ones): ~0.15 s of CPU per item
# Mean TV above which a soft student is warned (and told which k would stay below it).
POOR_TV = 0.05


def divergences(logits: Tensor, targets: TeacherTargets, tau: float) -> tuple[Tensor, Tensor]:
    """Per-row ``(TV, KL(p ‖ q))`` in float64 between ``softmax(logits/τ)`` and the rebuild of ``targets``."""
    num_classes = logits.shape[-1]
    p = F.log_softmax(logits.double() / tau, dim=-1)
    q = soft_target_logprobs(*targets[:2], num_classes, tau, log_tail=targets.log_tail,
                             tail_shape=targets.tail_shape).double()
    pe = p.exp()
    tv = 0.5 * (pe - q.exp()).abs().sum(dim=-1)
    kl = torch.where(pe > 0, pe * (p - q), torch.zeros_like(pe)).sum(dim=-1)
    return tv, kl


def fidelity_sums(logits: Tensor, ks: Iterable[int], taus: Sequence[float] = TAUS, tail=None,
                  stored: Callable[[TeacherTargets], TeacherTargets] | None = None) -> dict:
    """Sums over rows of TV and KL for each k (capped at C) and τ.

    Args:
        logits: full teacher logits ``[n, C]``.
        ks: top-k sizes to evaluate (the cache's own and others).
        tail: the cache's TailModel, or None for a uniform tail.
        stored: storage's quantization round trip (None: exact values).
    Returns:
        ``{"rows": n, "ks": [...], "taus": [...], "tv": [[sum per τ] per k], "kl": [...]}``.
    """
    num_classes = logits.shape[-1]
    ks = sorted({min(int(k), num_classes) for k in ks})
    tv_sums, kl_sums = [], []
    for k in ks:
        targets = targets_from_logits(logits, k, tail)
        if stored is not None:
            targets = stored(targets)
        row_tv, row_kl = [], []
        for tau in taus:
            tv, kl = divergences(logits, targets, tau)
            row_tv.append(float(f"{float(tv.sum()):.7g}"))  # 7 digits: the record is stored per item
            row_kl.append(float(f"{float(kl.sum()):.7g}"))
        tv_sums.append(row_tv)
        kl_sums.append(row_kl)
    return {"rows": int(logits.shape[0]), "ks": ks, "taus": [float(t) for t in taus], "tv": tv_sums, "kl": kl_sums}


def item_record(writer, logits: np.ndarray | None) -> dict | None:
    """The fidelity record of an item whose first rows have these full logits ``[n, C]``, for
    ``writer.write_item``: :func:`fidelity_sums` over the first :data:`FIDELITY_ROWS`
    rows, for :data:`KS` and the cache's k, of what the cache stores (``writer.stored``, its
    tail). None without logits.

    Args:
        writer: the item's ``storage.CacheWriter``.
    """
    if logits is None or not len(logits):
        return None
    sample = torch.from_numpy(np.asarray(logits[:FIDELITY_ROWS], np.float32))
    return fidelity_sums(sample, KS + (writer.k,), tail=writer.tail_model(), stored=writer.stored)


def advice(summary: dict, k: int, tau: float, poor_tv: float = POOR_TV) -> tuple[str, bool]:
    """(one line on the fidelity of a k-cache at the recorded τ nearest to ``tau``, whether it is poor).

    A poor line names the smallest recorded k whose mean TV stays at or below ``poor_tv``.
    """
    j = min(range(len(summary["taus"])), key=lambda i: abs(summary["taus"][i] - tau))
    at = summary["taus"][j]
    where = f"τ={at:g}" + ("" if at == tau else f" (nearest recorded to τ={tau:g})")
    if k not in summary["ks"]:
        return f"teacher cache fidelity: k={k} not among recorded ks {summary['ks']}", False
    i = summary["ks"].index(k)
    tv, kl = summary["tv"][i][j], summary["kl"][i][j]
    line = (f"teacher cache fidelity at {where}: mean TV {tv:.3f}, KL {kl:.3g} nats of the rebuilt soft "
            f"target vs the full teacher (k={k}, {summary['rows']} rows recorded)")
    if tv <= poor_tv:
        return line, False
    good = [kk for kk, row in zip(summary["ks"], summary["tv"]) if row[j] <= poor_tv]
    fix = (f"a cache with k={good[0]} would give TV {summary['tv'][summary['ks'].index(good[0])][j]:.3f}" if good else
           f"no recorded k does (k={summary['ks'][-1]}: TV {summary['tv'][-1][j]:.3f}); use a larger tail.dim "
           f"or teacher.mode=online")
    return f"{line}; TV above {poor_tv}: {fix}", True
