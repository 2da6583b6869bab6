"""DeiT distillation losses (``none`` | ``soft`` | ``hard``) on cached or online teacher targets.

Follows ``deit/losses.py::DistillationLoss`` (Touvron et al., 2021):

* ``none``: ``CE(cls, y)``. DeiT never trains a distillation-token model without a teacher;
  here, if a dist head exists, it is also trained on the label and the two CEs are averaged
  (``base = ½ CE(cls, y) + ½ CE(dist, y)``), matching the fused prediction used at eval.
* ``soft``: ``(1-α)·CE(cls, y) + α·τ²·KL(p_teacher,τ ‖ softmax(dist/τ))``. The KL is DeiT's:
  ``F.kl_div(..., reduction='sum', log_target=True) * τ² / outputs_kd.numel()`` — it divides by
  ``B·C``, **not** by ``B`` like Hinton/timm/torchdistill (``batchmean``). DeiT's soft term is
  therefore C times smaller than the usual one for the same α; we keep DeiT's so its α/τ
  transfer as published.
* ``hard``: ``(1-α)·CE(cls, y) + α·CE(dist, argmax teacher)`` with DeiT's α = ½, and optional
  label smoothing on the teacher label (``teacher_label_smoothing``).

``CE(·, y)`` is the soft-target cross-entropy on the (mixup/cutmix λ-mixed one-hot) label
``y``, smoothed like timm's ``mixup_target`` feeding ``SoftTargetCrossEntropy``:
``y·(1-ε) + ε/C``. A model without a distillation token uses its single head for both terms.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from storage.targets import TeacherTargets, hard_targets, soft_target_logprobs

MODES = ("none", "soft", "hard")


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch of ``-Σ_c target_c · log_softmax(logits)_c`` (timm SoftTargetCrossEntropy)."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def smooth_soft_target(target: Tensor, smoothing: float) -> Tensor:
    """Label smoothing of a (mixed) one-hot: ``y·(1-ε) + ε/C``."""
    if smoothing == 0.0:
        return target
    return target * (1.0 - smoothing) + smoothing / target.shape[-1]


class DistillationLoss(nn.Module):
    """DeiT loss returning its named parts.

    Args:
        mode: ``"none"``, ``"soft"`` or ``"hard"``.
        num_classes: C.
        alpha: weight of the distillation term (DeiT default 0.5; the paper's soft runs use α=0.1, τ=3).
        tau: temperature of the soft term.
        label_smoothing: ε applied to the ground-truth soft label.
        teacher_label_smoothing: ε on the teacher argmax label (``hard`` only).
    """

    def __init__(
        self,
        mode: str,
        num_classes: int,
        alpha: float = 0.5,
        tau: float = 1.0,
        label_smoothing: float = 0.1,
        teacher_label_smoothing: float = 0.0,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"loss mode: expected one of {MODES}, found {mode!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"loss alpha: expected in [0, 1], found {alpha}")
        if tau <= 0:
            raise ValueError(f"loss tau: expected > 0, found {tau}")
        self.mode = mode
        self.num_classes = num_classes
        self.alpha = alpha
        self.tau = tau
        self.label_smoothing = label_smoothing
        self.teacher_label_smoothing = teacher_label_smoothing

    def forward(
        self,
        outputs: Tensor | Sequence[Tensor],
        target: Tensor,
        teacher: Sequence[Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Compute the loss.

        Args:
            outputs: ``[B, C]`` logits, or ``(cls, dist)`` from a distillation-token model.
            target: ``[B, C]`` soft ground-truth label (mixed one-hot, unsmoothed).
            teacher: :class:`~storage.targets.TeacherTargets` (or a plain ``(logprobs, indices)``
                top-k pair), or None (mode none).
        Returns:
            ``{"loss": scalar with grad, "base": detached, "distill": detached}``.
        """
        if isinstance(outputs, (tuple, list)):
            cls_out, dist_out = outputs
            has_dist = True
        else:
            cls_out = dist_out = outputs
            has_dist = False
        if target.shape != cls_out.shape:
            raise ValueError(
                f"loss target: expected shape {tuple(cls_out.shape)}, found {tuple(target.shape)}"
            )
        label = smooth_soft_target(target.float(), self.label_smoothing)
        base = soft_cross_entropy(cls_out, label)

        if self.mode == "none":
            if has_dist:
                base = 0.5 * (base + soft_cross_entropy(dist_out, label))
            zero = base.new_zeros(())
            return {"loss": base, "base": base.detach(), "distill": zero}

        if teacher is None:
            raise ValueError(f"loss mode {self.mode!r} needs teacher targets, got None")
        teacher = TeacherTargets(*teacher)
        if self.mode == "soft":
            t = self.tau
            teacher_log = soft_target_logprobs(teacher.logprobs, teacher.indices, self.num_classes, t,
                                               log_tail=teacher.log_tail, tail_shape=teacher.tail_shape)
            distill = F.kl_div(
                F.log_softmax(dist_out.float() / t, dim=-1),
                teacher_log,
                reduction="sum",
                log_target=True,
            ) * (t * t) / dist_out.numel()
        else:
            distill = F.cross_entropy(
                dist_out.float(),
                hard_targets(teacher.indices),
                label_smoothing=self.teacher_label_smoothing,
            )
        loss = (1.0 - self.alpha) * base + self.alpha * distill
        return {"loss": loss, "base": base.detach(), "distill": distill.detach()}
