"""Training metrics: ``metrics.csv`` (one row per ``log`` call) + TensorBoard + a PNG of curves.

The CSV is appended to, so a resumed run keeps its history; its header is the union of all
keys ever logged (when a new key appears the file is rewritten once with the wider header).
Rows logged after the checkpoint a run resumes from can be dropped with ``resume_step``.
Only rank 0 should log (``enabled=False`` elsewhere makes every call a no-op).
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger", "epoch_line", "plot_curves"]

_FIXED = ["step", "epoch"]


class MetricsLogger:
    """Append-only metrics log.

    Args:
        run_dir: run folder; writes ``metrics.csv`` and ``tb/`` there.
        enabled: False on non-zero ranks.
        resume_step: when resuming, drop existing rows with ``step > resume_step``.
        tensorboard: also write TensorBoard scalars.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        enabled: bool = True,
        resume_step: int | None = None,
        tensorboard: bool = True,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.csv"
        self._tb = None
        self._fields: list[str] = list(_FIXED)
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            rows, fields = _read(self.path)
            self._fields = fields or list(_FIXED)
            if resume_step is not None:
                kept = [r for r in rows if r.get("step") in (None, "") or int(float(r["step"])) <= resume_step]
                if len(kept) != len(rows):
                    _write(self.path, self._fields, kept)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # local: 0.13 s of import, only when writing TB

            self._tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def log(self, step: int, epoch: int | float, **values: Any) -> None:
        """Record one row; non-numeric values go to the CSV only."""
        if not self.enabled:
            return
        row = {"step": step, "epoch": epoch}
        for k, v in values.items():
            row[k] = float(v.item()) if hasattr(v, "item") else v
        new = [k for k in row if k not in self._fields]
        if new:
            rows = _read(self.path)[0] if self.path.exists() else []
            self._fields = self._fields + new
            _write(self.path, self._fields, rows)
        write_header = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._fields)
            if write_header:
                writer.writeheader()
            writer.writerow(row)
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def epoch_line(done: int, total: int, m: dict, seconds: float) -> str:
    """The console line of an epoch (all of it is in metrics.csv), e.g.
    ``epoch 3/6: loss 0.8123, val top-1 61.20 (cls 58.10, dist 60.40), 352 img/s, 21 s``."""
    text = f"epoch {done}/{total}: loss {m['train_loss']:.4f}"
    if "val_top1_fused" in m:
        heads = [f"{h} {m[f'val_top1_{h}']:.2f}" for h in ("cls", "dist") if f"val_top1_{h}" in m and "val_top1_dist" in m]
        text += f", val top-1 {m['val_top1_fused']:.2f}" + (f" ({', '.join(heads)})" if heads else "")
        if "val_ema_top1_fused" in m:
            text += f", EMA {m['val_ema_top1_fused']:.2f}"
    text += f", {m['train_images_per_s']:.0f} img/s"
    if m.get("train_wait_s"):
        text += f" (+{m['train_wait_s']:.1f} s waiting for the cache)"
    return text + f", {seconds:.0f} s"


def _read(path: Path) -> tuple[list[dict], list[str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return rows, list(reader.fieldnames or [])


def _write(path: Path, fields: list[str], rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def plot_curves(csv_path: str | os.PathLike, png_path: str | os.PathLike) -> None:
    """Plot loss columns, ``lr`` and every ``*top1*`` column against ``step`` into a PNG.

    A train column logged per step and per epoch (the epoch mean) is drawn as two lines.
    """
    import matplotlib  # local: 1.5 s of import with pyplot, paid only when curves are drawn

    matplotlib.use("Agg")  # before pyplot loads: no display needed
    import matplotlib.pyplot as plt

    rows, fields = _read(Path(csv_path))
    panels = [
        ("loss", [f for f in fields if "loss" in f]),
        ("lr", [f for f in fields if f == "lr"]),
        ("top-1 (%)", [f for f in fields if "top1" in f]),
    ]
    # Per-step rows carry the lr; epoch rows hold epoch means (and val), drawn as their own lines.
    kinds = (("", [r for r in rows if _number(r.get("lr")) is not None]),
             (" (epoch)", [r for r in rows if _number(r.get("lr")) is None]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (title, cols) in zip(axes, panels):
        for col in cols:
            for suffix, kind in kinds:
                pts = [(float(r["step"]), v) for r in kind if (v := _number(r.get(col))) is not None]
                if pts:
                    xs, ys = zip(*pts)
                    label = col + (suffix if col.startswith("train_") else "")
                    ax.plot(xs, ys, label=label, marker="." if len(pts) < 50 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
