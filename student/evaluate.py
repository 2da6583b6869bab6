"""Top-1 / top-5 evaluation of every student head (cls, dist, late-fused).

Under DDP (``torch.distributed`` initialised) the counts are summed over ranks; the loader
must then give each rank a disjoint part of the validation set. ``predictions`` (per-sample
argmax of each head) stay local to the rank — they feed the DeiT Table-4-style analysis of
how often the heads agree with each other and with the teacher.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from student import distributed
from student.loop import Precision
from student.models import eval_heads

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[dict],
    device: str | torch.device,
    amp_dtype: torch.dtype | None = None,
    return_predictions: bool = False,
) -> dict:
    """Evaluate ``model`` on batches ``{"image", "label", "sample_id", ...}``.

    Returns:
        ``{"num_samples", "loss" (CE of the fused head), "top1_<head>", "top5_<head>" (percent)}``
        for heads ``cls``, ``fused`` and, for distilled models, ``dist``; with
        ``return_predictions`` also ``"predictions": {"sample_id": [N], "<head>": [N] argmax}``.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    counts: dict[str, Tensor] = {}
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    num = torch.zeros((), dtype=torch.float64, device=device)
    preds: dict[str, list[Tensor]] = {"sample_id": []}
    precision = Precision(device.type, amp_dtype)
    try:
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True).long()
            with precision.autocast():
                heads = eval_heads(model, images)
            heads = {k: v.float() for k, v in heads.items()}
            loss_sum += F.cross_entropy(heads["fused"], labels, reduction="sum").double()
            num += labels.numel()
            for name, logits in heads.items():
                k = min(5, logits.shape[-1])
                top = logits.topk(k, dim=-1).indices
                hit = top == labels[:, None]
                for key, value in (
                    (f"top1_{name}", hit[:, 0].sum()),
                    (f"top5_{name}", hit.any(dim=-1).sum()),
                ):
                    counts[key] = counts.get(key, torch.zeros((), dtype=torch.float64, device=device)) + value
                if return_predictions:
                    preds.setdefault(name, []).append(top[:, 0].cpu())
            if return_predictions:
                preds["sample_id"].append(torch.as_tensor(batch["sample_id"]).cpu())
    finally:
        model.train(was_training)

    keys = sorted(counts)
    totals = distributed.all_reduce_sum(torch.stack([loss_sum, num] + [counts[k] for k in keys]).tolist())
    total_n = totals[1]
    if total_n == 0:
        raise ValueError("evaluate: the loader yielded no samples")
    result: dict = {"num_samples": int(total_n), "loss": totals[0] / total_n}
    for key, value in zip(keys, totals[2:]):
        result[key] = 100.0 * value / total_n
    if return_predictions:
        result["predictions"] = {k: torch.cat(v) for k, v in preds.items()}
    return result
