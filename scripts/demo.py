"""The kdcache end-to-end demo on Fashion-MNIST (CPU-sized), DeiT Tables 3 and 4 in miniature.

    bash scripts/demo.sh            # full: ~19 min on 2 CPU cores   (configs/demo/full.yaml)
    bash scripts/demo.sh --quick    # flow check: ~2 min (up to ~5 min on a busy machine)
    python scripts/demo.py --config configs/demo/full.yaml [--out runs/demo] [key=value ...]

Steps (each a CLI of the project, run as a subprocess with its log under OUT/logs/):
 1. ``pipeline.make_shards``: Fashion-MNIST -> train/val WebDataset shards.
 2. ``student.train`` (loss none, no cache) trains the teacher (regnety_002, stride-1 stem, 32 px);
    its weights are exported as ``OUT/teacher/teacher.pt`` = ``{"model": state_dict}``.
 3. ``teacher.cache`` (Ray, embedded) scores E epochs x V views of the DeiT augmentation once;
    ``teacher.audit`` re-scores a sample of rows.
 4. ``student.train`` trains every student of the run list from that one cache (and one
    online-teacher variant for the cost comparison), several seeds each.
 5. Tables (DeiT Table 3: top-1 per method/token; Table 4: disagreement between models),
    curves, cost; written to OUT/results.md, OUT/results.json, OUT/*.png.
"""
from __future__ import annotations

import argparse
import atexit
import csv
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import ConfigBase, check, load_config  # noqa: E402

# Keys of results.json "top1" (means over seeds), in table order.
RESULT_KEYS = ("teacher", "none", "soft", "hard_token", "hard_token_online", "second_arch")


@dataclass
class RunSpec(ConfigBase):
    """One student recipe of the demo (trained once per seed)."""

    method: str = ""                 # table label, e.g. "DeiT-tiny, hard distillation + token"
    supervision: str = "label"       # what supervises it: label | label + teacher (soft/hard)
    seeds: int = 1                   # seeds 0..seeds-1 (run.seed and nothing else changes)
    online: bool = False             # teacher in the loop instead of the cache
    config: str | None = None        # student config file (default: the demo's student_config)
    overrides: list = field(default_factory=list)   # dotted overrides on top of student_config


@dataclass
class DemoConfig(ConfigBase):
    """Everything the demo does; sizes are the speed/accuracy knobs."""

    out: str = "runs/demo"
    fmnist_dir: str = "/usr/share/datasets/fashion-mnist"
    limit_train: int = 10000
    limit_val: int = 5000
    shard_size: int = 1000
    threads: int = 2                 # torch threads per process (OMP/MKL)
    teacher_config: str = "configs/demo/teacher.yaml"
    teacher_overrides: list = field(default_factory=list)
    cache_config: str = "configs/demo/cache.yaml"
    cache_overrides: list = field(default_factory=list)
    audit_samples: int = 200
    student_config: str = "configs/demo/student.yaml"
    student_overrides: list = field(default_factory=list)   # applied to every student
    runs: dict = field(default_factory=dict)                # name -> RunSpec fields

    def __post_init__(self):
        missing = [k for k in RESULT_KEYS[1:] if k not in self.runs]
        check(not missing, "runs", f"needs runs named {missing}")
        self.runs = {k: v if isinstance(v, RunSpec) else RunSpec.from_dict(v, _path=f"runs.{k}")
                     for k, v in self.runs.items()}


# --------------------------------------------------------------------------- subprocess steps

# Lines of a step's output shown on the console (the rest stays in its log): per-epoch lines
# of student.train, the one-line reports of make_shards and the cache job, checkpoint notes.
_SHOW = re.compile(r"^(epoch \d+/\d+|cache .* done|.*\d+ samples? in \d+ shards?|resume:|model\.checkpoint)")
_BAR = re.compile(r"(\d+%)\|[^|]*\|")   # a tqdm bar: shown in place on a terminal, every 20 s otherwise


class _Echo:
    """Console view of one step's output, fed piece by piece (split at ``\\r`` and ``\\n``)."""

    def __init__(self, name: str):
        self.name, self.tty, self.inline, self.last_bar = name, sys.stdout.isatty(), False, 0.0

    def __call__(self, line: str) -> None:
        line = line.strip()
        if _BAR.search(line):
            now, bar = time.monotonic(), _BAR.sub(r"\1", line)
            if self.tty:
                print(f"\r[demo]   {self.name}: {bar}\x1b[K", end="", flush=True)
                self.inline = True
            elif now - self.last_bar >= 20.0:
                self.last_bar = now
                print(f"[demo]   {self.name}: {bar}", flush=True)
        elif _SHOW.match(line):
            self.close()
            print(f"[demo]   {self.name}: {line}", flush=True)

    def close(self) -> None:
        if self.inline:
            print(flush=True)
            self.inline = False


def _pieces(stream) -> Iterator[bytes]:
    """Chunks of ``stream`` ending at ``\\n`` or ``\\r`` (tqdm redraws with ``\\r``), as they arrive."""
    pending = b""
    while chunk := stream.read1(65536):
        pending += chunk
        *done, pending = re.split(rb"(?<=[\r\n])", pending)
        yield from (d for d in done if d)
    if pending:
        yield pending


def run_step(name: str, cmd: list[str], cfg: DemoConfig, stdout: Path | None = None) -> float:
    """Run ``cmd`` from the repo root, log to OUT/logs/<name>.log, show its progress; return wall seconds.

    ``stdout``: keep the command's stdout in this file instead of the log (machine-readable output).
    """
    log_path = Path(cfg.out) / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads), MKL_NUM_THREADS=str(cfg.threads), PYTHONUNBUFFERED="1")
    print(f"[demo] {name}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    echo = _Echo(name)
    with open(log_path, "wb") as log, open(stdout or os.devnull, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out if stdout else subprocess.PIPE,
                                stderr=log if stdout else subprocess.STDOUT)
        if proc.stdout is not None:
            for piece in _pieces(proc.stdout):
                log.write(piece)
                echo(piece.decode(errors="replace"))
        proc.wait()
    echo.close()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"demo step {name} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    print(f"[demo] {name}: done in {seconds:.0f} s (log {log_path})", flush=True)
    return seconds


def make_shards(cfg: DemoConfig, data: Path) -> float:
    return run_step("shards", [sys.executable, "-m", "pipeline.make_shards", "fmnist", "--out", str(data),
                               "--dir", cfg.fmnist_dir, "--limit-train", str(cfg.limit_train),
                               "--limit-val", str(cfg.limit_val), "--shard-size", str(cfg.shard_size),
                               "--overwrite"], cfg)


def train(name: str, config: str, overrides: list[str], cfg: DemoConfig) -> float:
    return run_step(name, [sys.executable, "-m", "student.train", "--config", config, *overrides], cfg)


def export_teacher(run_dir: Path) -> Path:
    """The trained teacher's weights alone as ``{"model": state_dict}``.

    teacher/model.py also loads the full training checkpoint, but a weights-only file is the
    teacher artifact the cache's ``checkpoint_sha256`` should name (no optimizer/RNG state).
    """
    import torch

    from student.checkpoint import latest_checkpoint, load_checkpoint

    ckpt = load_checkpoint(latest_checkpoint(run_dir))
    path = run_dir / "teacher.pt"
    torch.save({"model": ckpt["model"]}, path)
    return path


def read_cache_summary(cache: Path) -> dict:
    path = cache / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def audit(cache: Path, cfg: DemoConfig) -> dict:
    """``teacher.audit --json``: per epoch, top-1 agreement, max |Δp| and |Δ log-prob| of re-scored rows."""
    report = Path(cfg.out) / "audit.json"
    run_step("audit", [sys.executable, "-m", "teacher.audit", str(cache), "--samples", str(cfg.audit_samples),
                       "--device", "cpu", "--json"], cfg, stdout=report)
    return json.loads(report.read_text())


# --------------------------------------------------------------------------- reading runs

def final_metrics(run_dir: Path) -> dict:
    """Last epoch row with val metrics, plus the mean train images/s over epochs."""
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    epoch_rows = [r for r in rows if r.get("train_images_per_s")]
    val = [r for r in epoch_rows if r.get("val_top1_fused")]
    if not val:
        raise RuntimeError(f"{run_dir}/metrics.csv has no val_top1_fused row (was data.val set?)")
    out = {k: float(v) for k, v in val[-1].items() if k.startswith("val_top1") and v}
    out["images_per_s"] = statistics.mean(float(r["train_images_per_s"]) for r in epoch_rows)
    return out


def val_loader(data: Path, img_size: int, teacher_yaml: str):
    """Eval batches of the val split with the plan's normalization (from the teacher config)."""
    from student.config import TrainConfig
    from student.data import make_val_loader

    tcfg = load_config(TrainConfig, REPO / teacher_yaml, [f"data.train={data / 'train'}", f"data.val={data / 'val'}",
                                                         f"data.img_size={img_size}", "data.num_workers=0"])
    return make_val_loader(tcfg, tcfg.data.aug)


def student_predictions(run_dir: Path, loader) -> dict:
    """Per-sample argmax of every head of a trained student (sorted by sample_id)."""
    from student.checkpoint import latest_checkpoint, load_checkpoint
    from student.config import TrainConfig
    from student.evaluate import evaluate
    from student.models import build_student

    tcfg = load_config(TrainConfig, run_dir / "config.yaml")
    m = tcfg.model
    model = build_student(m.name, 10, tcfg.data.img_size, 0.0, m.model_kwargs)
    model.load_state_dict(load_checkpoint(latest_checkpoint(run_dir))["model"])
    preds = evaluate(model, loader, "cpu", return_predictions=True)["predictions"]
    order = preds["sample_id"].argsort()
    return {k: v[order] for k, v in preds.items()}


def teacher_predictions(cache: Path, loader) -> dict:
    """Labels and teacher argmax on val, the teacher built by teacher/model.py from the cache's job config."""
    import torch

    from storage import open_cache
    from teacher.model import TeacherConfig, build_teacher

    tcfg = TeacherConfig.from_dict(open_cache(str(cache)).attrs["job"]["teacher"])
    teacher = build_teacher(tcfg, "cpu")
    ids, labels, preds = [], [], []
    for batch in loader:
        ids.append(batch["sample_id"])
        labels.append(batch["label"])
        preds.append(teacher.forward_logits(batch["image"]).argmax(-1))
    ids = torch.cat(ids)
    order = ids.argsort()
    return {"sample_id": ids[order], "label": torch.cat(labels)[order], "teacher": torch.cat(preds)[order]}


# --------------------------------------------------------------------------- the demo

def students(cfg: DemoConfig, data: Path, cache: Path, results: dict) -> None:
    """Train every run x seed; fill results["runs"][name]."""
    for name, spec in cfg.runs.items():
        rec = results["runs"].setdefault(name, {"method": spec.method, "supervision": spec.supervision,
                                                "online": spec.online, "seeds": []})
        for seed in range(spec.seeds):
            run_dir = Path(cfg.out) / "students" / f"{name}-s{seed}"
            overrides = [f"data.train={data / 'train'}", f"data.val={data / 'val'}", f"cache.path={cache}",
                         f"run.out={run_dir}", f"run.seed={seed}", *cfg.student_overrides, *spec.overrides]
            if spec.online:
                overrides.append("teacher.mode=online")
            seconds = train(f"student-{name}-s{seed}", spec.config or cfg.student_config, overrides, cfg)
            m = final_metrics(run_dir)
            rec["seeds"].append({"seed": seed, "seconds": seconds, "run_dir": str(run_dir), **m})
            print(f"[demo]   {name} seed {seed}: top-1 fused {m['val_top1_fused']:.2f}%  "
                  f"({m['images_per_s']:.0f} img/s)", flush=True)


def summarize_run(rec: dict) -> dict:
    """Means/spreads over seeds of every head's top-1, wall time and images/s."""
    seeds = rec["seeds"]
    out = {}
    for key in sorted({k for s in seeds for k in s if k.startswith("val_top1")}):
        vals = [s[key] for s in seeds if key in s]
        out[key] = {"per_seed": vals, "mean": statistics.mean(vals),
                    "spread": (max(vals) - min(vals)) / 2 if len(vals) > 1 else 0.0}
    out["seconds_mean"] = statistics.mean(s["seconds"] for s in seeds)
    out["images_per_s_mean"] = statistics.mean(s["images_per_s"] for s in seeds)
    return out


def disagreement(preds: dict[str, "object"]) -> dict:
    """DeiT Table 4: % of val samples on which each pair of classifiers disagrees."""
    names = list(preds)
    return {a: {b: round(100.0 * float((preds[a] != preds[b]).float().mean()), 2) for b in names} for a in names}


def cost(results: dict, cache_seconds: float) -> dict:
    """Caching once + N cached students vs N online students (online time per student x N)."""
    runs = results["runs"]
    cached = runs["hard_token"]["summary"]["seconds_mean"]
    online = runs["hard_token_online"]["summary"]["seconds_mean"]
    n = sum(len(r["seeds"]) for r in runs.values() if r["supervision"] != "label" and not r["online"])
    extra = online - cached
    return {"students": n, "cache_seconds": cache_seconds, "cached_student_seconds": cached,
            "online_student_seconds": online,
            "total_cached": cache_seconds + n * cached, "total_online": n * online,
            "break_even_students": (cache_seconds / extra) if extra > 0 else None}


def table4(cfg: DemoConfig, data: Path, cache: Path, results: dict) -> dict:
    """Predictions of GT, teacher, the scratch and the distilled (token) student (seed 0) -> disagreement."""
    from student.config import TrainConfig

    img_size = load_config(TrainConfig, REPO / cfg.student_config,
                           [f"data.train={data / 'train'}", f"cache.path={cache}"]).data.img_size
    loader = val_loader(data, img_size, cfg.teacher_config)
    ref = teacher_predictions(cache, loader)
    results["teacher_eval_top1"] = 100.0 * float((ref["teacher"] == ref["label"]).float().mean())
    scratch = student_predictions(Path(results["runs"]["none"]["seeds"][0]["run_dir"]), loader)
    dist = student_predictions(Path(results["runs"]["hard_token"]["seeds"][0]["run_dir"]), loader)
    for p in (scratch, dist):
        if not bool((p["sample_id"] == ref["sample_id"]).all()):
            raise RuntimeError("table4: student and teacher predictions cover different val samples")
    preds = {"ground truth": ref["label"], "teacher": ref["teacher"], "no distillation": scratch["fused"],
             "distilled: class token": dist["cls"], "distilled: dist token": dist["dist"],
             "distilled: class+dist": dist["fused"]}
    return disagreement(preds)


def top1_means(results: dict) -> dict:
    """results.json "top1": teacher + each run's mean top-1 of its reported head (fused)."""
    top1 = {"teacher": results["teacher_train"]["val_top1_fused"]}
    for name, rec in results["runs"].items():
        top1[name] = rec["summary"]["val_top1_fused"]["mean"]
    return top1


def fresh(out: Path) -> None:
    """Remove what an earlier demo wrote in ``out`` (only the demo's own sub-paths)."""
    for sub in ("data", "teacher", "cache.zarr", "students", "logs"):
        shutil.rmtree(out / sub, ignore_errors=True)
    for f in ("results.md", "results.json", "comparison.png", "demo_config.yaml", "audit.json"):
        (out / f).unlink(missing_ok=True)


# --------------------------------------------------------------------------- report

def _fmt_seeds(entry: dict | None) -> tuple[str, str]:
    """("per seed", "mean ± half-range"); one seed has no spread to show."""
    if entry is None:
        return "-", "-"
    per = " / ".join(f"{v:.2f}" for v in entry["per_seed"])
    if len(entry["per_seed"]) == 1:
        return per, f"{entry['mean']:.2f} (1 seed)"
    return per, f"{entry['mean']:.2f} ± {entry['spread']:.2f}"


def run_counts(cfg: DemoConfig) -> str:
    """How many student runs the config trains, as the README says it: "8 student runs (5 recipes, ...)"."""
    runs = sum(spec.seeds for spec in cfg.runs.values())
    multi = {spec.seeds for spec in cfg.runs.values() if spec.seeds > 1}
    seeded = sum(spec.seeds > 1 for spec in cfg.runs.values())
    text = f"{runs} student runs ({len(cfg.runs)} recipes"
    if seeded:
        text += f", {seeded} of them with {' or '.join(map(str, sorted(multi)))} seeds"
    return text + ")"


def table3_rows(results: dict) -> list[list[str]]:
    """DeiT Table 3 style: one row per (method, test tokens)."""
    t = results["teacher_train"]
    rows = [["teacher: regnety_002 (stride-1 stem, 32 px)", "label", "-",
             *_fmt_seeds({"per_seed": [t["val_top1_fused"]], "mean": t["val_top1_fused"]}),
             f"{results['timings']['teacher_train']:.0f}", f"{t['images_per_s']:.0f}"]]
    for name, rec in results["runs"].items():
        s = rec["summary"]
        heads = [("cls", "val_top1_cls"), ("dist", "val_top1_dist"), ("cls+dist", "val_top1_fused")]
        heads = [h for h in heads if h[1] in s] if "val_top1_dist" in s else [("cls", "val_top1_fused")]
        for token, key in heads:
            per, mean = _fmt_seeds(s.get(key))
            rows.append([f"({name}) {rec['method']}", rec["supervision"], token, per, mean,
                         f"{s['seconds_mean']:.0f}", f"{s['images_per_s_mean']:.0f}"])
    return rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(results: dict) -> str:
    """results.md: Table 3, Table 4, cache/audit, cost, timings."""
    from storage import encoding

    cfg = results["config"]
    demo = DemoConfig.from_dict(cfg)
    parts = [f"# kdcache demo: Fashion-MNIST, {cfg['limit_train']} train / {cfg['limit_val']} val images, 32 px, CPU",
             "", f"Config {results['config_file']}: teacher, one cache, {run_counts(demo)}. "
             f"Machine: {results['machine']}. Whole demo {results['demo_seconds']:.0f} s "
             f"({results['demo_seconds'] / 60:.1f} min).",
             "", "## DeiT Table 3 style: top-1 (%) on val", "",
             _md_table(["method", "supervision", "test tokens", "top-1 per seed", "mean ± half-range (≥ 2 seeds)",
                        "wall s / run", "train img/s"], table3_rows(results))]
    t4 = results["table4"]
    names = list(t4)
    parts += ["", "## DeiT Table 4 style: % of val samples classified differently", "",
              _md_table([""] + names, [[a] + [f"{t4[a][b]:.2f}" for b in names] for a in names])]
    c, a = results.get("cache", {}), results["audit"]
    agree = [100 * r["top1_agree"] for r in a.values()]
    parts += ["", "## Cache", "",
              f"- rows {c.get('rows', '?')}, {c.get('bytes_per_row', '?')} bytes/row, "
              f"{c.get('images_per_s', '?')} img/s scored, job wall {results['timings']['cache']:.0f} s",
              f"- audit: top-1 agreement {min(agree):.2f}% (min over epochs), max |Δp| "
              f"{max(r['max_abs_dp'] for r in a.values()):.2e} (encoding bound {encoding.max_abs_dp():.2e}), "
              f"max |Δ log-prob| {max(r['max_abs_dlogprob'] for r in a.values()):.2e} "
              f"(bound {encoding.max_abs_dlogprob():.2e}, reached only where p is tiny)",
              f"- teacher re-evaluated through teacher/model.py: {results['teacher_eval_top1']:.2f}%"]
    k = results["cost"]
    be = k["break_even_students"]
    parts += ["", "## Cost: cache once vs online teacher", "",
              f"- {k['students']} distilled students from the cache: cache {k['cache_seconds']:.0f} s + "
              f"{k['students']} x {k['cached_student_seconds']:.0f} s = **{k['total_cached']:.0f} s**",
              f"- the same students with the teacher online: {k['students']} x {k['online_student_seconds']:.0f} s "
              f"= **{k['total_online']:.0f} s**",
              f"- break-even at {be:.1f} students" if be else "- online students were not slower here: no break-even",
              "", "## Timings (s)", "",
              ", ".join(f"{n} {v:.0f}" for n, v in results["timings"].items()) +
              f"; whole demo {results['demo_seconds']:.0f}"]
    return "\n".join(parts) + "\n"


SEED_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))


def plot_comparison(results: dict, png: Path) -> None:
    """Train loss and val top-1 vs epoch of every student run (+ the per-run curve PNGs).

    One colour per method, one line style + marker per seed. The online-teacher runs are
    drawn thin with hollow markers on top of the thick cached ones, so they stay visible
    where the two are identical (hard distillation: they are, seed by seed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from student.metrics import plot_curves

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(14, 5))
    colors = plt.get_cmap("tab10").colors
    for i, (name, rec) in enumerate(results["runs"].items()):
        for s in rec["seeds"]:
            run_dir = Path(s["run_dir"])
            plot_curves(run_dir / "metrics.csv", run_dir / "curves.png")
            with open(run_dir / "metrics.csv", newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("train_images_per_s")]
            line, marker = SEED_STYLES[s["seed"] % len(SEED_STYLES)]
            style = dict(color=colors[i % len(colors)], linestyle=line, label=f"{name} s{s['seed']}")
            if rec["online"]:
                style.update(linewidth=1.5, marker=marker, markerfacecolor="none", markersize=9, zorder=4)
            else:
                style.update(linewidth=3.0, alpha=0.6, marker=marker, markersize=5, zorder=2)
            ax_loss.plot([float(r["epoch"]) for r in rows], [float(r["train_base"]) for r in rows], **style)
            val = [(float(r["epoch"]), float(r["val_top1_fused"])) for r in rows if r.get("val_top1_fused")]
            if val:
                ax_acc.plot(*zip(*val), **style)
    ax_acc.axhline(results["top1"]["teacher"], color="k", linestyle="--", linewidth=1, label="teacher")
    ax_loss.set(title="train loss vs labels (base term)", xlabel="epoch")
    ax_acc.set(title="val top-1 (%), fused head; thin hollow = teacher online", xlabel="epoch")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_acc.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def next_steps(out: Path) -> list[str]:
    """Commands to try next on this run's outputs: the README's Usage ones (they read runs/demo/)."""
    moved = [] if out == REPO / "runs" / "demo" else [
        f"data.train={out / 'data' / 'train'}", f"data.val={out / 'data' / 'val'}", f"cache.path={out / 'cache.zarr'}"]
    train_cmd = "python -m student.train --config configs/student/fmnist_hard.yaml"
    return [" ".join([train_cmd, *moved]),
            " ".join([train_cmd, "loss.mode=soft loss.tau=3.0 run.out=runs/student/fmnist_soft_tau3", *moved]),
            " ".join([train_cmd, "--resume", *moved]) + "   # continues it after an interruption",
            f"python -m teacher.audit {out / 'cache.zarr'} --samples 200"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/demo/full.yaml")
    p.add_argument("--out", default=None, help="output folder (default: the config's out)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the demo config, e.g. limit_train=2000")
    args = p.parse_args(argv)
    cfg = load_config(DemoConfig, REPO / args.config if not Path(args.config).is_absolute() else args.config,
                      args.overrides + ([f"out={args.out}"] if args.out else []))
    import torch

    from teacher.ray_env import private_ray_env

    # The demo's Ray: a fresh local instance with token auth and a token of its own (not ~/.ray)
    ray_dir = tempfile.mkdtemp(prefix="kdcache_demo_ray_")
    atexit.register(shutil.rmtree, ray_dir, True)
    os.environ.update(private_ray_env(ray_dir))
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out).resolve()
    cfg.out = str(out)
    fresh(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "demo_config.yaml")
    t0 = time.perf_counter()
    data, teacher_dir, cache = out / "data", out / "teacher", out / "cache.zarr"
    results: dict = {"config": cfg.to_dict(), "config_file": args.config, "runs": {}, "timings": {},
                     "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, {cfg.threads} torch threads per step"}
    timings = results["timings"]

    timings["shards"] = make_shards(cfg, data)
    timings["teacher_train"] = train("teacher", cfg.teacher_config, [
        f"data.train={data / 'train'}", f"data.val={data / 'val'}", f"run.out={teacher_dir}", *cfg.teacher_overrides], cfg)
    teacher_pt = export_teacher(teacher_dir)
    results["teacher_train"] = final_metrics(teacher_dir)

    timings["cache"] = run_step("cache", [sys.executable, "-m", "teacher.cache", "--config", cfg.cache_config,
                                          "--ray-address", "local", f"shards={data / 'train'}", f"out={cache}",
                                          f"teacher.checkpoint={teacher_pt}", *cfg.cache_overrides], cfg)
    results["cache"] = read_cache_summary(cache)
    t = time.perf_counter()
    results["audit"] = audit(cache, cfg)
    timings["audit"] = time.perf_counter() - t

    students(cfg, data, cache, results)
    for rec in results["runs"].values():
        rec["summary"] = summarize_run(rec)

    t = time.perf_counter()
    results["table4"] = table4(cfg, data, cache, results)
    timings["table4_eval"] = time.perf_counter() - t
    results["cost"] = cost(results, timings["cache"])
    results["top1"] = top1_means(results)
    results["demo_seconds"] = time.perf_counter() - t0

    plot_comparison(results, out / "comparison.png")
    md = render_markdown(results)
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float))
    print(md)
    print(f"[demo] wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'comparison.png'}")
    print("[demo] next steps (README \"Usage\"; run from the repository root):")
    for line in next_steps(out):
        print(f"  {line}")
    return results


if __name__ == "__main__":
    main()
