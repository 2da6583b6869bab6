"""Audit a teacher cache: re-score replayed images and compare with the stored rows.

    python -m teacher.audit runs/demo/cache.zarr --samples 200 [--tau 1 3] [--checkpoint PATH] [--shards DIR]

The teacher and the plan are rebuilt from the cache attrs (the job config stored there);
``--checkpoint`` / ``--shards`` point at files that moved. For each epoch, ``--samples`` random
(sample_id, view) rows are replayed and scored again. Stored values may be quantized, so we
compare what is comparable: top-1 class agreement, the max |Δp| between the stored top-k
probabilities and the fresh teacher's probabilities of the same classes (the quantity the
storage encoding bounds, ``storage.encoding.max_abs_dp``), and the max |Δ log-prob| (large
only for tiny probabilities, whose codes round to the grid's floor). In fp32 on CPU top-1
agreement should be 100% and |Δp| within the encoding's bound.

Fidelity: for each ``--tau``, the mean total variation and KL(full ‖ rebuilt) between the
fresh teacher's full distribution and the soft target a student rebuilds from the stored row
(top-k, tail mass, learned tail; storage/targets.py). On the same rows this equals what the
caching job recorded (``storage`` ``CacheReader.fidelity``).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from typing import Sequence

import numpy as np
import torch

from pipeline.cli import add_debug_flag, run_cli
from pipeline.replay import ReplayRequest, replay_items
from pipeline.schedule import epoch_cut, shard_pairs
from pipeline.manifest import load_manifest
from pipeline.shards import read_shard
from storage import CacheMismatchError, open_cache
from storage.targets import TeacherTargets
from teacher.device import default_device
from teacher.fidelity import divergences
from teacher.job import CacheJobConfig, make_teacher
from teacher.model import weights_source


def job_config_from_cache(reader, out: str, checkpoint: str | None = None, shards: str | None = None):
    """The CacheJobConfig that made the cache (paths optionally replaced)."""
    job = dict(reader.attrs["job"])
    job["out"] = out
    if shards:
        job["shards"] = shards
    if checkpoint:  # a local file replaces timm pretrained weights too (same file, same sha256)
        job["teacher"] = {**job["teacher"], "checkpoint": checkpoint, "pretrained": False,
                          "pretrained_cfg_overlay": {}}
    return CacheJobConfig.from_dict(job)


def audit(cache: str, samples: int = 100, *, checkpoint: str | None = None, shards: str | None = None,
          seed: int = 0, device: str = "cpu", batch_size: int = 64,
          taus: Sequence[float] = (1.0, 2.0, 3.0, 4.0)) -> dict[int, dict]:
    """Per epoch: ``{"rows", "top1_agree", "max_abs_dp", "max_abs_dlogprob", "invalid", "fidelity"}``.

    ``fidelity`` is ``{"tau": [...], "tv": [...], "kl": [...]}``: mean TV and KL(full ‖ rebuilt)
    per τ in ``taus``. Rows are drawn (seeded by ``seed``) among done items; rows stored as
    invalid (skipped samples) are counted, not compared.
    """
    reader = open_cache(cache)
    cfg = job_config_from_cache(reader, cache, checkpoint, shards)
    manifest = load_manifest(cfg.shards)
    if manifest.sha256 != reader.attrs.get("manifest_sha256"):
        raise CacheMismatchError(f"audit {cache}: field manifest_sha256: the shards at {cfg.shards} have "
                                 f"{manifest.sha256}, the cache was made from {reader.attrs.get('manifest_sha256')} "
                                 "(--shards names the split the cache was made from)")
    teacher = make_teacher(cfg, device)
    if reader.attrs.get("checkpoint_sha256") not in (None, teacher.checkpoint_sha256):
        raise CacheMismatchError(f"audit {cache}: field checkpoint_sha256: the teacher's weights "
                                 f"({weights_source(cfg.teacher)}) have {teacher.checkpoint_sha256}, the cache "
                                 f"was made with {reader.attrs['checkpoint_sha256']} (--checkpoint names the right file)")
    tail = reader.tail_model()
    rng = np.random.default_rng(seed)
    report: dict[int, dict] = {}
    for epoch in range(cfg.epochs):
        done = [s for s in range(len(manifest.shards)) if reader.is_done(epoch, s)]
        if not done:
            continue
        ids_all = np.concatenate([np.arange(manifest.shards[s].first_id,
                                            manifest.shards[s].first_id + manifest.shards[s].count)
                                  for s in done])
        n = min(samples, len(ids_all) * cfg.views)
        flat = rng.choice(len(ids_all) * cfg.views, size=n, replace=False)
        rows = sorted(zip(ids_all[flat // cfg.views].tolist(), (flat % cfg.views).tolist()))
        wanted: dict[tuple[int, int], set[int]] = defaultdict(set)  # (shard, view) -> ids
        for sid, view in rows:
            wanted[(manifest.shard_of(sid).index, view)].add(sid)
        images, ids, views = [], [], []
        shard_cache: dict[int, list] = {}
        cut = epoch_cut(cfg.seed, epoch, cfg.views)
        for (s, view), sids in sorted(wanted.items()):
            shard = manifest.shards[s]
            raw = shard_cache.setdefault(s, read_shard(manifest, shard))
            pairs = [p for p in shard_pairs(cut, view, shard) if p[0] in sids]
            request = ReplayRequest(cfg.aug, cfg.seed, epoch, view, cfg.teacher.input_size, cfg.teacher.num_classes)
            for item in replay_items(request, raw, shard, pairs, skipped=[]):
                if item.sample_id in sids:
                    images.append(item.image)
                    ids.append(item.sample_id)
                    views.append(view)
        ids_np, views_np = np.array(ids, np.int64), np.array(views, np.int64)
        rows = reader.lookup_rows(epoch, ids_np, views_np)
        lp, idx, valid = rows[:3]
        agree, max_err, max_dp, compared = 0, 0.0, 0.0, 0
        tv_sum, kl_sum = np.zeros(len(taus)), np.zeros(len(taus))
        for start in range(0, len(images), batch_size):
            logits = teacher.forward_logits(torch.stack(images[start:start + batch_size]))
            fresh = torch.log_softmax(logits.double(), dim=-1).cpu().numpy()
            sl = slice(start, start + len(logits))
            ok = valid[sl]
            agree += int((fresh.argmax(-1)[ok] == idx[sl][ok, 0]).sum())
            if ok.any():
                picked = np.take_along_axis(fresh[ok], idx[sl][ok], axis=1)
                max_err = max(max_err, float(np.abs(picked - lp[sl][ok]).max()))
                max_dp = max(max_dp, float(np.abs(np.exp(picked) - np.exp(lp[sl][ok])).max()))
                code = None if rows.tail_code is None else torch.from_numpy(rows.tail_code[sl][ok])
                stored = TeacherTargets(torch.from_numpy(lp[sl][ok]), torch.from_numpy(idx[sl][ok]),
                                        torch.from_numpy(rows.log_tail[sl][ok]),
                                        None if code is None else tail.shape(code))
                for j, tau in enumerate(taus):
                    tv, kl = divergences(logits.cpu()[torch.from_numpy(ok)], stored, tau)
                    tv_sum[j] += float(tv.sum())
                    kl_sum[j] += float(kl.sum())
            compared += int(ok.sum())
        report[epoch] = {"rows": compared, "top1_agree": agree / compared if compared else float("nan"),
                         "max_abs_dp": max_dp, "max_abs_dlogprob": max_err, "invalid": int((~valid).sum()),
                         "fidelity": {"tau": [float(t) for t in taus], "tv": (tv_sum / max(compared, 1)).tolist(),
                                      "kl": (kl_sum / max(compared, 1)).tolist()}}
    return report


PROG = "python -m teacher.audit"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cache", help="the cache to audit (e.g. runs/demo/cache.zarr)")
    p.add_argument("--samples", type=int, default=100, help="rows per epoch (default 100)")
    p.add_argument("--checkpoint", default=None, help="teacher weights, if not at the stored path")
    p.add_argument("--shards", default=None, help="split dir, if not at the stored path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tau", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0],
                   help="temperatures of the fidelity report (default 1 2 3 4)")
    p.add_argument("--device", default=default_device())
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--out", default=None, help="also write the report as JSON to this file")
    add_debug_flag(p)
    args = p.parse_args(argv)
    report = audit(args.cache, args.samples, checkpoint=args.checkpoint, shards=args.shards,
                   seed=args.seed, device=args.device, taus=args.tau)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    taus = " ".join(f"τ={t:g}" for t in args.tau)
    print(f"{'epoch':>5} {'rows':>6} {'top1 agree':>10} {'max |dp|':>9} {'max |dlogp|':>12} {'invalid':>7}"
          f"   TV / KL at {taus}")
    for epoch, r in report.items():
        fid = "  ".join(f"{tv:.3f}/{kl:.3g}" for tv, kl in zip(r["fidelity"]["tv"], r["fidelity"]["kl"]))
        print(f"{epoch:>5} {r['rows']:>6} {100 * r['top1_agree']:>9.2f}% {r['max_abs_dp']:>9.2e} "
              f"{r['max_abs_dlogprob']:>12.2e} {r['invalid']:>7}   {fid}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, PROG))
