"""Device decisions (CUDA or CPU) as small pure functions, so their logic is tested on CPU.

Every place that behaves differently on a GPU asks here: the teacher (autocast dtype,
channels_last input), the caching job (pinned batches, ``non_blocking`` copies, one GPU per
actor), the student's DDP backend. The functions take the device (or a Ray resource dict)
and return the decision; nothing here touches CUDA.
"""
from __future__ import annotations

import torch

AMP_MODES = ("auto", "bf16", "fp16", "none")


def default_device() -> str:
    """Where a run goes when told ``auto``: the GPU if there is one, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _type(device: str | torch.device) -> str:
    return torch.device(device).type


def autocast_dtype(amp: str, device: str | torch.device) -> torch.dtype | None:
    """The teacher's autocast dtype: bf16 (``auto``/``bf16``) or fp16 on CUDA; None = fp32.

    On CPU the teacher always runs fp32: CPU autocast is slower than fp32 for convnets and
    would change the logits a CPU audit compares with.
    """
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, found {amp!r}")
    if _type(device) != "cuda" or amp == "none":
        return None
    return torch.float16 if amp == "fp16" else torch.bfloat16


def channels_last(requested: bool, images: torch.Tensor) -> bool:
    """Convert a batch to channels_last when asked and it is a 4-d image batch."""
    return requested and images.dim() == 4


def pin_memory(device: str | torch.device) -> bool:
    """Stage host batches in pinned memory: only for a CUDA consumer (page-locked = DMA-able)."""
    return _type(device) == "cuda"


def non_blocking(device: str | torch.device) -> bool:
    """Copy host -> device asynchronously: only to CUDA (from pinned memory it overlaps compute)."""
    return _type(device) == "cuda"


def ddp_backend(device: str | torch.device) -> str:
    """torch.distributed backend: nccl between GPUs, gloo on CPU."""
    return "nccl" if _type(device) == "cuda" else "gloo"


def actor_plan(resources: dict, actors: int, num_workers: int, replay: str = "local") -> tuple[int, dict]:
    """How many teacher actors to start and the Ray options of each.

    Args:
        resources: ``ray.cluster_resources()``.
        actors: the configured count (0 = automatic).
        num_workers: replay workers per actor; replay: ``local`` | ``ray``.

    Returns:
        ``(count, options)``: with GPUs, one actor per GPU (``num_gpus=1``); on CPUs only,
        CPUs // (1 + num_workers) actors with local replay (each actor's workers need cores),
        CPUs // 2 with Ray replay (half the cores left to replay tasks).
    """
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return (actors or gpus), {"num_gpus": 1, "num_cpus": 1}
    cpus = int(resources.get("CPU", 1))
    per_actor = 2 if replay == "ray" else 1 + num_workers
    return (actors or max(1, cpus // per_actor)), {"num_cpus": 1}
