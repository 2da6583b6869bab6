"""Atomic checkpoints for the student run.

``save_checkpoint(path, model=m, optimizer=o, scheduler=s, scaler=sc, ema=e, epoch=3, step=120,
data={...})`` stores ``obj.state_dict()`` for every value that has one and the value itself
otherwise. Written to a temporary file then ``os.replace``-d, so a crash never leaves a
half-written checkpoint under the final name. Only tensors, numbers, strings and containers
are stored, and :func:`load_checkpoint` reads nothing else (``weights_only=True``): a checkpoint
someone hands you cannot run code when it loads. Augmentation and data order need no RNG state
(they are counter-based: seed, epoch, sample_id, view); the trainer adds :func:`rng_state`
under ``rng`` itself, because stochastic depth draws from the global RNG of the device it runs on
(CPU and every CUDA device), and restores it with :func:`set_rng_state`.

Files in a run folder are named ``checkpoint-<N>.pt`` (N = epoch or step, the caller's choice;
``latest_checkpoint`` picks the largest N) and optionally ``last.pt``. ``prune_checkpoints`` keeps
the last few; ``mark_best`` makes ``best.pt`` name the best one (a hard link: no extra space
while the numbered file is kept, and the weights stay when it is pruned).
"""
from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "checkpoint_path",
    "restore",
    "rng_state",
    "set_rng_state",
    "prune_checkpoints",
    "mark_best",
    "BEST_NAME",
]

_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")
BEST_NAME = "best.pt"
# What torch.load(weights_only=True) reads besides containers; anything else would need unpickling.
_PLAIN = (torch.Tensor, bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or incomplete (message names the file)."""


def checkpoint_path(run_dir: str | os.PathLike, n: int) -> Path:
    """``<run_dir>/checkpoint-<n:06d>.pt``."""
    return Path(run_dir) / f"checkpoint-{n:06d}.pt"


def save_checkpoint(path: str | os.PathLike, **state: Any) -> Path:
    """Atomically write ``state`` (objects with ``state_dict()`` are stored as their state dict)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        k: (v.state_dict() if hasattr(v, "state_dict") and callable(v.state_dict) else v)
        for k, v in state.items()
    }
    _check_allowlisted(payload, "state", path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with ``torch.load(weights_only=True)`` only: tensors, numbers, strings
    and containers, so a downloaded file cannot run code while it loads (unpickling runs whatever
    code the file names). Our own checkpoints hold nothing else (:func:`save_checkpoint` checks
    that when it writes). There is no opt-in: a trusted file in another form is converted once
    by hand (the error says how).

    Raises CheckpointError naming the file when it is absent, unreadable, or not allowlisted.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))  # torch names the first global it refused
        found = f"it names {found.group(1)}" if found else "a non-allowlisted object"
        raise CheckpointError(
            f"checkpoint {path}: refused, it holds more than tensors, numbers, strings and containers ({found}) "
            f"and loading it would run code from the file; only if you trust its origin, convert it once: "
            f"torch.save(torch.load('{path}', weights_only=False)['model'], 'weights.pt')") from None
    except Exception as e:  # truncated / not a torch file
        raise CheckpointError(f"checkpoint {path}: cannot read ({type(e).__name__}: {e})") from e


def _check_allowlisted(value: Any, where: str, path: Path) -> None:
    """Raise CheckpointError unless ``value`` loads under ``weights_only=True`` (key path named)."""
    if isinstance(value, _PLAIN) or value is None:
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, _PLAIN):
                raise CheckpointError(f"checkpoint {path}: key {where}[{k!r}] is a {type(k).__name__}")
            _check_allowlisted(v, f"{where}[{k!r}]", path)
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_allowlisted(v, f"{where}[{i}]", path)
        return
    raise CheckpointError(f"checkpoint {path}: {where} is a {type(value).__module__}.{type(value).__qualname__}; "
                          "checkpoints hold only tensors, numbers, strings and containers (load_checkpoint "
                          "would refuse it)")


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """Highest-numbered ``checkpoint-<N>.pt`` in ``run_dir``, else ``last.pt``, else None."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    numbered = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name))]
    if numbered:
        return max(numbered)[1]
    last = run_dir / "last.pt"
    return last if last.is_file() else None


def restore(state: dict, path: str | os.PathLike = "<checkpoint>", **objects: Any) -> None:
    """``objects[k].load_state_dict(state[k])`` for each given object (None objects skipped).

    Raises CheckpointError naming the file and key when a requested key is absent.
    """
    for key, obj in objects.items():
        if obj is None:
            continue
        if key not in state:
            raise CheckpointError(f"checkpoint {path}: missing key {key!r} (has {sorted(state)})")
        obj.load_state_dict(state[key])


def rng_state() -> dict:
    """The torch RNG state of every device in use: ``{"cpu": ..., "cuda": [per device]}``.

    CUDA states are taken only once CUDA is initialized in this process (a CPU run on a GPU
    machine does not touch the devices).
    """
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict | torch.Tensor) -> None:
    """Restore :func:`rng_state` (a bare tensor, from older checkpoints, is the CPU state).

    Raises CheckpointError when the checkpoint holds CUDA states for more devices than exist here.
    """
    if isinstance(state, torch.Tensor):
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["cpu"])
    cuda = state.get("cuda")
    if cuda:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if len(cuda) > available:
            raise CheckpointError(f"checkpoint holds RNG states of {len(cuda)} CUDA devices, "
                                  f"this process sees {available}")
        torch.cuda.set_rng_state_all(cuda)


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete numbered checkpoints but the ``keep_last`` highest; returns the deleted paths.

    ``best.pt`` and ``last.pt`` are not numbered and never deleted here.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 (resume needs the latest), found {keep_last}")
    run_dir = Path(run_dir)
    numbered = sorted((int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name)))
    doomed = [p for _, p in numbered[:-keep_last]]
    for p in doomed:
        p.unlink()
    return doomed


def mark_best(path: str | os.PathLike) -> Path:
    """Make ``<run_dir>/best.pt`` the checkpoint ``path`` (hard link, else a copy), atomically."""
    path = Path(path)
    best = path.with_name(BEST_NAME)
    tmp = path.with_name(f".{BEST_NAME}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:  # file systems without hard links
        shutil.copyfile(path, tmp)
    os.replace(tmp, best)
    return best
