"""``python -m student.train --config ... --dry-run``: the run's schedule, without training.

Reads the manifest and the cache attrs only (no model is built, no image is read, no GPU is
needed) and prints what the run will do: images per student epoch, steps and updates per epoch,
total images, which cache epoch and part (or view) each student epoch reads, and the warmup and
cosine schedule in optimizer updates. It also checks that over the run every cached row is read
exactly once per pass over the cache.
"""
from __future__ import annotations

import math
from collections import Counter

import torch

from pipeline.manifest import load_manifest
from student.config import TrainConfig
from pipeline.plan import AugConfig
from student.data import ReplayPlan, make_schedule, open_checked_cache, resolve_plan, steps_per_epoch
from student.optim import build_optimizer, build_scheduler, lr_of_update, peak_lr


def schedule_report(cfg: TrainConfig, world_size: int = 1) -> dict:
    """The schedule of ``cfg`` on ``world_size`` ranks as a dict (see :func:`format_report`).

    Without a cache at ``cache.path`` yet (the caching job has not started), the plan comes from
    the config (``data.views``, ``data.seed``) and the manifest alone.
    """
    manifest = load_manifest(cfg.data.train)
    plan, cache_note = _plan(cfg, manifest)
    schedule = make_schedule(cfg, manifest, plan)
    if cfg.data.batch_size % world_size:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} is not divisible by {world_size} ranks")
    per_rank = cfg.data.batch_size // world_size
    epochs = cfg.run.epochs
    sources = [schedule.source(t) for t in range(epochs)]
    rows = [schedule.rows(t) for t in range(epochs)]
    steps = steps_per_epoch(cfg, schedule, per_rank, world_size)
    o = cfg.optim
    updates = math.ceil(steps / o.accum_steps)
    lr = peak_lr(o, cfg.data.batch_size)
    lrs = _lr_points(cfg, lr, updates)
    # Each (cache epoch, part|view) slot holds a disjoint set of rows (the cut partitions every
    # cache epoch), so "every row once per pass" = every slot once per cycle of E x V epochs.
    slots = Counter((s.cycle, s.cache_epoch, s.part if s.part is not None else s.view) for s in sources)
    per_cycle = schedule.cached_epochs * schedule.views
    complete = epochs // per_cycle
    return {
        "images_per_epoch": rows[0], "rows_per_epoch": rows, "num_samples": manifest.num_samples,
        "num_shards": len(manifest.shards), "num_classes": manifest.num_classes,
        "cached_epochs": plan.cached_epochs, "views": plan.views, "sampler": schedule.sampler,
        "world_size": world_size, "batch_per_rank": per_rank, "global_batch": cfg.data.batch_size,
        "steps_per_epoch": steps, "updates_per_epoch": updates, "epochs": epochs,
        "total_steps": steps * epochs, "total_updates": updates * epochs, "total_images": sum(rows),
        "lr": lr, "warmup_updates": o.warmup_epochs * updates, "lr_points": lrs,
        "sources": [(s.epoch, s.cache_epoch, s.part, s.view, s.cycle) for s in sources],
        "each_row_once_per_pass": all(c == 1 for c in slots.values())
        and all(rows[t] == manifest.num_samples for t in range(epochs)),
        "complete_passes": complete, "epochs_per_pass": per_cycle, "cache_note": cache_note,
    }


def _plan(cfg: TrainConfig, manifest):
    """The run's plan from the cache, or from the config while the cache does not exist (with a note)."""
    if cfg.cache.path:
        try:
            return open_checked_cache(cfg, manifest)[1], None
        except FileNotFoundError:
            d = cfg.data   # the order needs no pixels: DeiT's plan stands in for an unset data.aug
            plan = ReplayPlan(d.seed or 0, d.views or 1, d.aug or AugConfig(), "", None, cfg.teacher.k)
            return plan, (f"no cache at {cfg.cache.path} yet: views ({plan.views}) and seed ({plan.seed}) "
                          f"from the config (data.views, data.seed)")
    return resolve_plan(cfg, None), None


def write_order(cfg: TrainConfig, path: str, world_size: int = 1, epochs: int = 1) -> dict:
    """Write ``epoch,step,rank,position,sample_id,view`` for every row of the first ``epochs``
    student epochs on ``world_size`` ranks (``data.batch_size`` split over them) to ``path``;
    return how often a sample's views share an optimizer step (samples with all views there)."""
    manifest = load_manifest(cfg.data.train)
    plan = _plan(cfg, manifest)[0]
    schedule = make_schedule(cfg, manifest, plan)
    per_rank = cfg.data.batch_size // world_size
    lanes = max(1, cfg.data.num_workers)
    steps_of: dict[tuple[int, int], set] = {}
    rows_of: Counter = Counter()
    with open(path, "w") as f:
        f.write("epoch,step,rank,position,sample_id,view\n")
        for t in range(epochs):
            for rank in range(world_size):
                order = schedule.order(t, rank, world_size, per_rank, lanes=lanes, interleave=cfg.data.interleave)
                for step, ix in enumerate(order.steps):
                    sids, views = order.rows.sample[ix].tolist(), order.rows.view[ix].tolist()
                    f.writelines(f"{t},{step},{rank},{p},{a},{v}\n" for p, (a, v) in enumerate(zip(sids, views)))
                    for a in sids:
                        steps_of.setdefault((t, a), set()).add(step)
                        rows_of[t, a] += 1
    whole = [k for k, n in rows_of.items() if n == plan.views]
    shared = sum(len(steps_of[k]) == 1 for k in whole)
    return {"order_out": path, "order_epochs": epochs, "samples_all_views": len(whole),
            "views_share_a_step": shared / len(whole) if whole else None}


def _lr_points(cfg: TrainConfig, lr: float, updates_per_epoch: int) -> list[tuple[int, float]]:
    """(update, lr) at the schedule's landmarks, from the real timm scheduler on a dummy parameter."""
    o = cfg.optim
    opt = build_optimizer(torch.nn.Linear(1, 1), o.opt, lr, o.weight_decay)
    sched = build_scheduler(opt, cfg.run.epochs, updates_per_epoch, o.warmup_epochs, o.min_lr, o.warmup_lr, o.sched,
                            o.lr_step)
    total = cfg.run.epochs * updates_per_epoch
    marks = sorted({0, o.warmup_epochs * updates_per_epoch, total // 2, total - 1})
    return [(t, lr_of_update(sched, opt, t, updates_per_epoch, o.lr_step)) for t in marks]


def format_report(r: dict, config_name: str = "") -> str:
    """Human-readable lines of :func:`schedule_report`."""
    n = r["num_samples"]
    per_view = f"N/{r['views']} samples x {r['views']} views" if r["sampler"] == "ra" else "one view of every sample"
    lines = [
        f"schedule{' of ' + config_name if config_name else ''} (dry run: no model built, no image read)",
        *([f"  {r['cache_note']}"] if r.get("cache_note") else []),
        f"  data: {n:,} images in {r['num_shards']:,} shards, {r['num_classes']} classes",
        f"  cache: {r['cached_epochs']} epochs x {r['views']} views" if r["cached_epochs"] else
        f"  no cache: plan epochs follow student epochs ({r['views']} view(s))",
        f"  sampler {r['sampler']}: a student epoch = {r['images_per_epoch']:,} rows ({per_view}); "
        f"{r['views']} student epochs per cache epoch",
        f"  ranks: {r['world_size']} x {r['batch_per_rank']} rows per batch (global {r['global_batch']}): "
        f"{r['steps_per_epoch']:,} steps, {r['updates_per_epoch']:,} optimizer updates per epoch",
        f"  run: {r['epochs']} epochs = {r['total_steps']:,} steps = {r['total_images']:,} images "
        f"({r['epochs']} x {r['images_per_epoch']:,})",
        f"  lr: peak {r['lr']:.3g}; warmup {r['warmup_updates']:,} updates; "
        + ", ".join(f"update {t:,}: {v:.3g}" for t, v in r["lr_points"]),
        f"  rows: {'every cached row read exactly once per pass' if r['each_row_once_per_pass'] else 'NOT every row once'}"
        f" ({r['epochs_per_pass']} student epochs per pass; {r['complete_passes']} complete pass(es) in this run)",
    ]
    if r["sampler"] == "ra":
        lines.append("  repeated augmentation: the views of a sample share an optimizer step (on neighbouring "
                     "ranks at one batch position, as DeiT's RASampler; --order-out writes the order)")
    if r.get("order_out"):
        share = r["views_share_a_step"]
        lines.append(f"  order of {r['order_epochs']} epoch(s) written to {r['order_out']}"
                     + (f"; views sharing a step: {share:.4%} of {r['samples_all_views']:,} samples" if share else ""))
    src = r["sources"]
    shown = src if len(src) <= 9 else src[:6] + [None] + src[-3:]
    for s in shown:
        if s is None:
            lines.append("  ...")
            continue
        epoch, cache_epoch, part, view, cycle = s
        what = f"part {part} (all views)" if part is not None else f"view {view}"
        lines.append(f"  epoch {epoch}: cache epoch {cache_epoch} {what}" + (f" (pass {cycle + 1})" if cycle else ""))
    return "\n".join(lines)
