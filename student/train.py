"""Train a student on cached (or online) teacher targets — DeiT recipe.

    python -m student.train --config configs/student/fmnist_hard.yaml [run.epochs=3 loss.mode=soft ...]
    python -m student.train --config ... --resume          # continue from the latest checkpoint in run.out
    python -m student.train --config ... --dry-run [--world-size 8]   # print the schedule, train nothing
    torchrun --nproc_per_node 2 -m student.train --config ...   # DDP (gloo on CPU, nccl on CUDA)

Reads top to bottom: config -> data (+ cache guard) -> teacher targets -> model/loss/optim ->
resume -> epochs (train, eval, log, checkpoint) -> curves. The pieces live in importable modules.
"""
# (argparse shows the first line of this docstring; the epilog lists the config sections.)
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pipeline.cli import add_debug_flag, plural, run_cli
from pipeline.config import load_config
from pipeline.manifest import load_manifest
from storage import wait_for_cache
from student import distributed
from student.checkpoint import (checkpoint_path, latest_checkpoint, load_checkpoint, mark_best, prune_checkpoints,
                                restore, rng_state, save_checkpoint, set_rng_state)
from student.config import TrainConfig, sections_help
from student.data import TrainData, make_val_loader, open_checked_cache, resolve_plan
from student.dryrun import format_report, schedule_report, write_order
from student.evaluate import evaluate
from student.losses import DistillationLoss
from student.loop import LoopParts, LoopState, StepConfig, resolve_precision, train_epoch
from student.metrics import MetricsLogger, epoch_line, plot_curves
from student.models import build_student
from student.optim import build_ema, build_optimizer, build_scheduler, end_epoch, peak_lr
from student.recipe import format_recipe, recipe_inputs, recipe_rows
from student.resume import check_fresh_run_dir, check_resume, run_identity
from student.targets import build_targets_fn
from teacher.device import default_device

PROG = "python -m student.train"


def train(cfg: TrainConfig, force_resume: bool = False) -> dict:
    """Run (or resume) the training described by ``cfg``; returns the last epoch's metrics.

    Args:
        cfg: the run.
        force_resume: with ``cfg.run.resume``, continue even if the config changes the run's
            meaning (student/resume.py lists what may change).
    """
    device = _device(cfg.run.device)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    dist = distributed.init(device.type)
    log = print if dist.is_main else (lambda *a, **k: None)
    run_dir = Path(cfg.run.out)
    if not cfg.run.resume:
        check_fresh_run_dir(run_dir)

    # Data: the cache guard runs before anything is built, naming the mismatching field.
    manifest = load_manifest(cfg.data.train)
    if cfg.cache.path and cfg.cache.wait:  # started together with the caching job
        wait_for_cache(cfg.cache.path, cfg.cache.timeout_s, cfg.cache.poll_s, log)
    reader, plan = open_checked_cache(cfg, manifest) if cfg.cache.path else (None, resolve_plan(cfg, None))
    identity = run_identity(manifest.sha256, reader.attrs if reader is not None else None)
    targets_fn, joins_cache = build_targets_fn(cfg, plan, reader, manifest.num_classes, device, log)
    teacher_size = getattr(targets_fn, "input_size", None)
    extra_size = teacher_size if teacher_size not in (None, cfg.data.img_size) else None
    if extra_size:
        log(f"online teacher at {extra_size} px, student at {cfg.data.img_size} px: the plan is replayed "
            f"at both sizes (the teacher scores what the caching job would)")
    data = TrainData(cfg, manifest, plan, reader if joins_cache else None, dist.rank, dist.world_size, log,
                     extra_size=extra_size)
    num_batches = data.num_batches()
    updates_per_epoch = math.ceil(num_batches / cfg.optim.accum_steps)

    # Model, loss, optimisation (DeiT recipe). Re-seeded: an online teacher's init must not shift it.
    torch.manual_seed(cfg.run.seed)
    model = build_student(cfg.model.name, manifest.num_classes, cfg.data.img_size, cfg.model.drop_path_rate,
                          cfg.model.model_kwargs, cfg.model.checkpoint, log=log, pretrained=cfg.model.pretrained,
                          pretrained_cfg_overlay=cfg.model.pretrained_cfg_overlay).to(device)
    loss_fn = DistillationLoss(cfg.loss.mode, manifest.num_classes, cfg.loss.alpha, cfg.loss.tau,
                               cfg.loss.label_smoothing, cfg.loss.teacher_label_smoothing)
    o = cfg.optim
    lr = peak_lr(o, cfg.data.batch_size)
    optimizer = build_optimizer(model, o.opt, lr, o.weight_decay, eps=o.opt_eps,
                                **({"momentum": o.momentum} if o.opt in ("sgd", "momentum") else {}))
    scheduler = build_scheduler(optimizer, cfg.run.epochs, updates_per_epoch, o.warmup_epochs, o.min_lr, o.warmup_lr,
                                o.sched, o.lr_step)
    ema = build_ema(model, o.ema_decay) if o.ema else None
    precision = resolve_precision(cfg.run.amp, device)

    # Resume from the latest checkpoint at an epoch boundary.
    state, best = LoopState(), None
    if cfg.run.resume:
        state, best = _resume(run_dir, cfg, identity, force_resume, model, optimizer, scheduler, ema,
                              precision.scaler, log)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.yaml")
    # Rows after the checkpoint we start from belong to no checkpoint (all of them on a fresh run).
    logger = MetricsLogger(run_dir, enabled=dist.is_main, resume_step=state.step)
    end = min(cfg.run.epochs, cfg.run.stop_epoch or cfg.run.epochs)
    log(f"student {cfg.model.name}: loss={cfg.loss.mode} teacher={cfg.teacher.mode if cfg.loss.mode != 'none' else 'unused'} lr={lr:.3g} "
        f"{plural(num_batches, 'batch', 'batches')} x {data.batch_size} x {plural(dist.world_size, 'rank')} per epoch, "
        f"epochs {state.epoch + 1}..{end} of {cfg.run.epochs} -> {run_dir}")
    if state.epoch >= end:
        log(f"{run_dir}: {state.epoch}/{cfg.run.epochs} epochs done"
            + (f" (run.stop_epoch={cfg.run.stop_epoch})" if end < cfg.run.epochs else "") + ", nothing to run")

    net = DistributedDataParallel(model) if dist.world_size > 1 else model
    on_step = None
    if cfg.run.log_every:
        def on_step(m: dict) -> None:
            if m["step"] % cfg.run.log_every == 0:
                logger.log(m.pop("step"), m.pop("epoch"), **{f"train_{k}" if k != "lr" else k: v for k, v in m.items()})

    parts = LoopParts(net, loss_fn, targets_fn, optimizer, precision, device, scheduler, ema, on_step=on_step,
                      wait_clock=(lambda: reader.waited_s) if joins_cache else None)
    steps = StepConfig(o.accum_steps, o.clip_grad, num_batches)
    metrics: dict = {}
    try:
        for epoch in range(state.epoch, end):
            state.epoch = epoch
            started = time.perf_counter()
            bar = _progress(cfg, dist.is_main, num_batches, epoch)
            batches = data.batches(epoch)
            if cfg.run.rank_audit:
                batches = _audit_rows(batches, run_dir, dist.rank, epoch)
            metrics = train_epoch(parts, steps, batches, state, progress=bar)
            if bar is not None:
                bar.close()
            end_epoch(scheduler, epoch, o.lr_step)
            state.epoch = epoch + 1
            metrics = {f"train_{k}": v for k, v in metrics.items()}
            if metrics["train_dropped"]:
                log(f"epoch {state.epoch}/{cfg.run.epochs}: dropped {plural(int(metrics['train_dropped']), 'row')} "
                    "marked invalid in the cache or not decodable")
            last = state.epoch == cfg.run.epochs
            if cfg.data.val and ((cfg.run.eval_every and state.epoch % cfg.run.eval_every == 0) or last):
                metrics.update(_evaluate(cfg, model, ema, plan.aug, device, precision, dist))
            logger.log(state.step, state.epoch, **metrics)
            log(epoch_line(state.epoch, cfg.run.epochs, metrics, time.perf_counter() - started))
            if dist.is_main and (state.epoch % cfg.run.save_every == 0 or last):
                value = metrics.get(cfg.run.best_metric) if cfg.run.best_metric else None
                improved = value is not None and (best is None or value > best["value"])
                if improved:
                    best = {"metric": cfg.run.best_metric, "value": value, "epoch": state.epoch}
                path = save_checkpoint(
                    checkpoint_path(run_dir, state.epoch), model=model, optimizer=optimizer, scheduler=scheduler,
                    scaler=precision.scaler, ema=ema, epoch=state.epoch, step=state.step, update=state.update,
                    data={"plan_epoch_next": data.plan_epoch(state.epoch)}, rng=rng_state(),
                    config=cfg.to_dict(), identity=identity, best=best)
                if improved:
                    mark_best(path)
                prune_checkpoints(run_dir, cfg.run.keep_last)
            distributed.barrier()
    finally:
        logger.close()
    if cfg.run.rank_audit:
        _audit_weights(model, run_dir, dist.rank, dist.world_size)
    if dist.is_main and cfg.run.plot and (run_dir / "metrics.csv").exists():
        plot_curves(run_dir / "metrics.csv", run_dir / "curves.png")
    distributed.shutdown()
    return metrics


def _resume(run_dir: Path, cfg: TrainConfig, identity: dict, force: bool, model, optimizer, scheduler, ema,
            scaler, log) -> tuple[LoopState, dict | None]:
    """Restore the latest checkpoint of ``run_dir`` (refusing a config that changes the run)."""
    path = latest_checkpoint(run_dir)
    if path is None:
        log(f"resume: no checkpoint in {run_dir}, starting from scratch")
        return LoopState(), None
    ckpt = load_checkpoint(path)
    check_resume(ckpt, path, cfg.to_dict(), identity, force, log)
    restore(ckpt, path, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema, scaler=scaler)
    if "rng" in ckpt:
        set_rng_state(ckpt["rng"])  # drop path draws from the global RNG of its device
    log(f"resume: {path} (epoch {ckpt['epoch']}, step {ckpt['step']})")
    return LoopState(epoch=int(ckpt["epoch"]), step=int(ckpt["step"]), update=int(ckpt["update"])), ckpt.get("best")


def _audit_rows(batches, run_dir: Path, rank: int, epoch: int):
    """Pass ``batches`` through, appending every row to ``rank-<rank>.csv``
    (epoch, step, position, cache_epoch, sample_id, view): what this rank trained on."""
    path = run_dir / f"rank-{rank}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        if f.tell() == 0:
            f.write("epoch,step,position,cache_epoch,sample_id,view\n")
        for step, batch in enumerate(batches):
            f.writelines(f"{epoch},{step},{p},{e},{a},{v}\n" for p, (e, a, v) in enumerate(zip(
                batch["epoch"].tolist(), batch["sample_id"].tolist(), batch["view"].tolist())))
            yield batch


def _audit_weights(model, run_dir: Path, rank: int, world_size: int) -> None:
    """``rank-<rank>.json``: the world size this rank ran in and the sha256 of its final weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    (run_dir / f"rank-{rank}.json").write_text(json.dumps(
        {"rank": rank, "world_size": world_size, "weights_sha256": digest.hexdigest()}))


def _evaluate(cfg, model, ema, aug, device, precision, dist) -> dict:
    """Top-1/top-5 of every head (cls, dist, fused) on the val shards, split over ranks."""
    out = {}
    for prefix, net in (("val", model), ("val_ema", ema.module if ema is not None else None)):
        if net is None:
            continue
        loader = make_val_loader(cfg, aug, dist.rank, dist.world_size)
        res = evaluate(net, loader, device, amp_dtype=precision.dtype)
        out.update({f"{prefix}_{k}": v for k, v in res.items() if k != "num_samples"})
    return out


def _device(name: str) -> torch.device:
    if name == "auto":
        name = default_device()
    return torch.device(name)


def _progress(cfg, is_main: bool, total: int, epoch: int):
    if not (cfg.run.progress and is_main):
        return None
    return tqdm(total=total, desc=f"epoch {epoch}", unit="batch", dynamic_ncols=True, leave=False)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0], epilog=sections_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (configs/student/*.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in run.out")
    parser.add_argument("--force-resume", action="store_true",
                        help="--resume even if the config changes what the run means (model, loss, data, schedule)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the schedule (images, steps, cache epochs per student epoch, warmup/cosine) "
                             "from the manifest and cache attrs; build no model, read no image")
    parser.add_argument("--world-size", type=int, default=None,
                        help="ranks for --dry-run (default: WORLD_SIZE from torchrun, else 1)")
    parser.add_argument("--order-out", metavar="FILE.csv", default=None,
                        help="with --dry-run: write epoch,step,rank,position,sample_id,view of every row")
    parser.add_argument("--order-epochs", type=int, default=1, help="student epochs --order-out writes (default 1)")
    add_debug_flag(parser)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. loss.mode=soft run.epochs=3")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + (["run.resume=true"] if args.resume or args.force_resume else [])
    if args.order_out and not args.dry_run:
        parser.error("--order-out needs --dry-run")
    cfg = load_config(TrainConfig, args.config, overrides)
    if args.dry_run:
        world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
        report = schedule_report(cfg, world)
        if args.order_out:
            report.update(write_order(cfg, args.order_out, world, args.order_epochs))
        print(format_report(report, args.config or ""))
        _print_recipe(cfg)
        return report
    return train(cfg, force_resume=args.force_resume)


def _print_recipe(cfg: TrainConfig) -> None:
    """--dry-run's second block: DeiT's recipe beside this config's (student/recipe.py)."""
    aug, views, where = recipe_inputs(cfg)
    print(format_recipe(recipe_rows(cfg, aug, views), where))


HINTS = {
    "ConfigError": f"{PROG} --help lists the config sections and keys (documented in student/config.py)",
    "CacheNotReady": "cache.wait=true waits for the caching job to write what is missing",
}

if __name__ == "__main__":
    sys.exit(run_cli(main, PROG, hints=HINTS))
