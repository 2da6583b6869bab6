"""Write WebDataset shards + manifest from an ImageFolder tree or the Fashion-MNIST IDX files,
or index WebDataset shards that already exist (written by another tool) without rewriting them.

Examples::

    # ImageNet-style tree: ROOT/train/<class>/*.JPEG and ROOT/val/<class>/*.JPEG
    python -m pipeline.make_shards imagefolder --root /data/imagenet --out /data/imagenet-wds
    # or separate folders, class order from a file (first token per line, e.g. LOC_synset_mapping.txt)
    python -m pipeline.make_shards imagefolder --train-dir T --val-dir V --classes synsets.txt --out OUT

    # Fashion-MNIST (first N images of train / t10k), PNG-encoded, lossless
    python -m pipeline.make_shards fmnist --out /data/fmnist-wds --limit-train 6000 --limit-val 1000

    # shards you already have, anywhere (path, s3://, gs://, https://, pipe:...): a manifest only
    python -m pipeline.make_shards index 's3://bucket/imagenet/train-{000000..001281}.tar' \
        --out /data/imagenet-manifests/train --classes synsets.txt [--skip-bad]

Output: OUT/<split>/<split>-000000.tar ... and OUT/<split>/manifest.json (see pipeline/manifest.py);
OUT may be a local folder or any fsspec URL (s3://bucket/imagenet-wds). ``index`` writes
MANIFEST_DIR/manifest.json only (see pipeline/index.py for the layouts it reads).
Class index = position in sorted class-folder names of the train folder (or in --classes; a
listed class may have no folder, e.g. a 100-class subset labelled in ImageNet's 1000).
The val folder must use class subfolders too (e.g. after ImageNet's valprep.sh).
Sample order (= sample_id) is a seeded global shuffle (--shuffle-seed, default 0), so every
shard holds a class-random mix; --keep-order keeps the source order (sorted class folder, then
sorted relative path), and a warning says when the result is class-sorted.
A corrupt or unreadable image, or one over --max-pixels (default 64 MP, read from its header
before decoding), stops the run with an error naming the file, unless --skip-bad, which records
it (path + error) under "skipped" in the manifest.
Each split is written to a temporary folder and moved into place when complete: a failed or
killed run leaves no half-written split, and re-running the same command finishes the job
(complete splits made by the same command are kept). On an object store (no rename) the
manifest, written last, marks a split complete; a split without one is rewritten by a re-run.
"""
from __future__ import annotations

import argparse
import gzip
import os
import struct
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline import urls
from pipeline.cli import add_debug_flag, plural, run_cli
from pipeline.decode import DEFAULT_MAX_PIXELS
from pipeline.index import __doc__ as index_doc
from pipeline.index import default_workers, index_shards, padding
from pipeline.classmix import class_mix_warning
from pipeline.decode import encode_png
from pipeline.manifest import MANIFEST_NAME, load_manifest
from pipeline.writer import SourceSample, sanitize_key, write_shards

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FMNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


# --------------------------------------------------------------------------- ImageFolder

def read_class_list(path: str | os.PathLike) -> list[str]:
    """Class folder names, one per line; only the first whitespace token counts (synset files)."""
    names = [line.split()[0] for line in urls.read_bytes(os.fspath(path)).decode().splitlines() if line.strip()]
    dup = [n for n, c in Counter(names).items() if c > 1]
    if dup:
        raise ValueError(f"{path}: duplicate class names {dup[:5]}")
    return names


def scan_imagefolder(root: str | os.PathLike, classes: Sequence[str] | None = None
                     ) -> tuple[list[str], list[tuple[Path, int]]]:
    """List (file, label) pairs of an ImageFolder tree, in deterministic order.

    Files with a non-image extension are ignored (their count is reported on stderr).
    A class subfolder absent from ``classes`` is an error naming it.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if classes is None:
        classes = folders
    index = {c: i for i, c in enumerate(classes)}
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise ValueError(f"{root}: class folders not in the class list: {unknown[:5]}"
                         f"{' ...' if len(unknown) > 5 else ''}")
    files: list[tuple[Path, int]] = []
    ignored = 0
    for folder in folders:
        for p in sorted((root / folder).rglob("*")):
            if not p.is_file():
                continue
            if p.suffix.lower() in IMG_EXTENSIONS:
                files.append((p, index[folder]))
            else:
                ignored += 1
    if ignored:
        print(f"{root}: ignored {ignored} files without an image extension {IMG_EXTENSIONS}", file=sys.stderr)
    return list(classes), files


def imagefolder_samples(root: Path, files: list[tuple[Path, int]]) -> list[SourceSample]:
    """SourceSamples with keys = file stem (ImageNet style) or ``<class>_<stem>`` if stems collide."""
    stems = [sanitize_key(p.stem) for p, _ in files]
    if len(set(stems)) != len(stems):
        stems = [sanitize_key(str(p.relative_to(root).with_suffix(""))) for p, _ in files]
        if len(set(stems)) != len(stems):
            dup = [k for k, c in Counter(stems).items() if c > 1]
            raise ValueError(f"{root}: file names give duplicate sample keys {dup[:5]}")
    return [SourceSample(key=k, label=label, path=str(p)) for k, (p, label) in zip(stems, files)]


# --------------------------------------------------------------------------- Fashion-MNIST

def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a (gzipped) IDX file into a uint8 numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fmnist(split: str, root: str | os.PathLike = FMNIST_DIR, limit: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(images [N,28,28] uint8, labels [N] uint8) of split 'train' or 'val' (= t10k), first ``limit``."""
    img_name, lab_name = FMNIST_FILES[split]
    images, labels = read_idx(Path(root) / img_name), read_idx(Path(root) / lab_name)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {img_name} has {len(images)} images, {lab_name} {len(labels)} labels")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def fmnist_samples(split: str, images: np.ndarray, labels: np.ndarray) -> Iterator[SourceSample]:
    """Grayscale PNG samples keyed ``fmnist_<split>_<index in the IDX file>``."""
    for i, (img, label) in enumerate(zip(images, labels)):
        key = f"fmnist_{split}_{i:06d}"
        yield SourceSample(key=key, label=int(label), path=f"{FMNIST_FILES[split][0]}[{i}]",
                           data=encode_png(Image.fromarray(img)))


# --------------------------------------------------------------------------- CLI

def _bar(desc: str, total: int, unit: str = "img"):
    return lambda it: tqdm(it, total=total, desc=desc, unit=unit, dynamic_ncols=True)


def _print_summary(m) -> None:
    bad = m.bad_samples()
    print(f"{m.path}: {plural(m.num_samples, 'sample')} in {plural(len(m.shards), 'shard')} of up to "
          f"{m.shard_size:,}, {plural(m.num_classes, 'class', 'classes')}, "
          f"{len(m.skipped) + len(bad):,} skipped")
    for s in m.skipped:
        print(f"  skipped {s['path']}: {s['error']}", file=sys.stderr)
    for b in bad:
        print(f"  listed as bad (keeps sample_id {b['sample_id']}, cached as a missing row): {b['error']}",
              file=sys.stderr)
    if padding(m) > 0.1:
        counts = [s.count for s in m.shards]
        print(f"note: shard sizes vary ({min(counts):,}..{max(counts):,} samples): the cache gives every shard "
              f"a slot of {max(counts):,} rows, {100 * padding(m):.0f}% of them padding", file=sys.stderr)
    warning = class_mix_warning(m)
    if warning:
        print(warning, file=sys.stderr)


def _write_split(samples, out: str, split: str, classes, args, source: dict, total: int) -> None:
    """Write one split, or keep it when a complete one from the same command is already there."""
    split_dir = urls.join(out, split)
    order = {"shuffle_seed": None if args.keep_order else args.shuffle_seed}
    if urls.exists(urls.join(split_dir, MANIFEST_NAME)) and not args.overwrite:
        m = load_manifest(split_dir)
        if m.source == source and m.shard_size == args.shard_size and m.order == order:
            print(f"{split_dir}: complete from an earlier run of this command, kept")
            return
    m = write_shards(samples, out, split, classes, args.shard_size, shuffle_seed=order["shuffle_seed"],
                     skip_bad=args.skip_bad, overwrite=args.overwrite, source=source,
                     progress=_bar(split, total), max_pixels=args.max_pixels)
    _print_summary(m)


def _index(args) -> None:
    """The ``index`` subcommand: keep a manifest this command wrote before, else write it."""
    classes = read_class_list(args.classes) if args.classes else None
    source = {"type": "index", "shards": args.shards, "label_key": args.label_key, "skip_bad": args.skip_bad}
    if urls.exists(urls.join(args.out, MANIFEST_NAME)) and not args.overwrite:
        m = load_manifest(args.out)
        if m.source != source or (classes is not None and m.classes != classes):
            raise FileExistsError(f"{args.out} already holds a manifest of other shards or settings "
                                  f"(use --overwrite)")
        print(f"{args.out}: complete from an earlier run of this command, kept")
        return
    m = index_shards(args.shards, args.out, classes=classes, label_key=args.label_key, skip_bad=args.skip_bad,
                     split=args.split, workers=args.workers, progress=_bar("index", len(urls.expand(args.shards)),
                                                                           "shard"), max_pixels=args.max_pixels)
    _print_summary(m)


def add_max_pixels(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"an image with more pixels (width x height, read from its header) is a bad sample, "
                             f"refused before decoding (default {DEFAULT_MAX_PIXELS:,}; pipeline/decode.py)")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.make_shards",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="source", required=True)

    def common(sp, shard_size):
        sp.add_argument("--out", required=True, help="dataset root; writes OUT/<split>/ shards + manifest.json")
        sp.add_argument("--shard-size", type=int, default=shard_size,
                        help=f"samples per shard (all shards but the last are exactly this size; default {shard_size})")
        sp.add_argument("--skip-bad", action="store_true",
                        help="record unreadable/corrupt images in manifest 'skipped' instead of failing")
        sp.add_argument("--overwrite", action="store_true", help="replace existing shards of the split(s)")
        add_max_pixels(sp)
        sp.add_argument("--shuffle-seed", type=int, default=0,
                        help="seed of the global sample order written (default 0); see --keep-order")
        sp.add_argument("--keep-order", action="store_true",
                        help="write samples in source order (an ImageFolder's is class-sorted: not for training)")
        add_debug_flag(sp)

    f = sub.add_parser("imagefolder", help="ImageNet-style tree: class subfolders of images",
                       description="Shard an ImageFolder tree (class subfolders). Keeps JPEG/PNG bytes as they are.")
    f.add_argument("--root", help="folder with train/ and/or val/ subfolders")
    f.add_argument("--train-dir", help="train folder (overrides ROOT/train)")
    f.add_argument("--val-dir", help="val folder (overrides ROOT/val)")
    f.add_argument("--classes", help="file listing class folder names in label order (first token per line); "
                                     "default: sorted train folder names")
    common(f, 1000)

    m = sub.add_parser("fmnist", help="Fashion-MNIST IDX files -> PNG shards",
                       description="Shard Fashion-MNIST (train -> train, t10k -> val) as lossless PNG.")
    m.add_argument("--dir", default=FMNIST_DIR, help=f"folder with the *-ubyte.gz files (default {FMNIST_DIR})")
    m.add_argument("--limit-train", type=int, default=None, help="take the first N train images (default all)")
    m.add_argument("--limit-val", type=int, default=None, help="take the first N t10k images (default all)")
    common(m, 1000)

    x = sub.add_parser("index", help="existing WebDataset shards (any URL) -> a manifest, shards untouched",
                       description=index_doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    x.add_argument("shards", nargs="+", help="shard URLs in sample order: paths, fsspec URLs (s3://, gs://, "
                                             "https://, ...) or pipe: commands; {000000..001281} is expanded")
    x.add_argument("--out", required=True, help="manifest folder (path or URL); writes OUT/manifest.json")
    x.add_argument("--classes", help="file listing class names in label order (first token per line); needed "
                                     "when labels are names; default: classes 0..max label")
    x.add_argument("--label-key", default=None, help="read the label from this .json field only "
                                                     "(default: .cls, else .json 'label', else .txt)")
    x.add_argument("--skip-bad", action="store_true",
                   help="list unusable samples in the manifest (they keep their ids; cached as missing rows) "
                        "instead of failing")
    x.add_argument("--split", default=None, help="split name (default: the last component of --out)")
    x.add_argument("--workers", type=int, default=default_workers(), help="shards read in parallel")
    x.add_argument("--overwrite", action="store_true", help="replace an existing manifest")
    add_max_pixels(x)
    add_debug_flag(x)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.source == "index":
        _index(args)
        return 0
    if args.source == "fmnist":
        for split, limit in (("train", args.limit_train), ("val", args.limit_val)):
            images, labels = load_fmnist(split, args.dir, limit)
            source = {"type": "fmnist", "dir": str(args.dir), "files": list(FMNIST_FILES[split]), "limit": limit}
            _write_split(fmnist_samples(split, images, labels), args.out, split, FMNIST_CLASSES, args, source,
                         len(images))
        return 0

    dirs = {"train": args.train_dir or (args.root and os.path.join(args.root, "train")),
            "val": args.val_dir or (args.root and os.path.join(args.root, "val"))}
    dirs = {k: v for k, v in dirs.items() if v and (os.path.isdir(v) or k == "train" and args.train_dir
                                                     or k == "val" and args.val_dir)}
    if not dirs:
        raise SystemExit("imagefolder: give --root (with train/ or val/) or --train-dir/--val-dir")
    classes = read_class_list(args.classes) if args.classes else None
    if classes is None and "train" not in dirs:
        raise SystemExit("imagefolder: without a train folder, give --classes to fix the label order")
    for split in ("train", "val"):
        if split not in dirs:
            continue
        classes, files = scan_imagefolder(dirs[split], classes)
        samples = imagefolder_samples(Path(dirs[split]), files)
        source = {"type": "imagefolder", "dir": os.path.abspath(dirs[split]), "files": len(files)}
        _write_split(samples, args.out, split, classes, args, source, len(samples))
    return 0


if __name__ == "__main__":
    # ValueError here is about the input files (duplicate names, not an IDX file, bad labels)
    sys.exit(run_cli(main, "python -m pipeline.make_shards", extra=(ValueError,)))
