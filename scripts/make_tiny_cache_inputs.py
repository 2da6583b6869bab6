"""Make inputs for a tiny caching run: Fashion-MNIST shards, a random regnety_002 teacher, a config.

    python scripts/make_tiny_cache_inputs.py OUT_DIR [--samples 64] [--shard-size 32]

Writes OUT_DIR/fmnist/train/*.tar + manifest.json, OUT_DIR/teacher.pt (random weights, 10 classes,
32 px, stem stride 1) and OUT_DIR/tiny.yaml (2 epochs x 2 views, k=5) with absolute paths, so
``python -m teacher.cache --config OUT_DIR/tiny.yaml`` (or ``ray submit``) runs it. ~5 s.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import yaml  # noqa: E402

from pipeline.make_shards import FMNIST_CLASSES, fmnist_samples, load_fmnist  # noqa: E402
from pipeline.writer import write_shards  # noqa: E402
from teacher.model import TeacherConfig, create_model  # noqa: E402

TINY_TEACHER = {"name": "regnety_002", "num_classes": 10, "input_size": 32, "stem_stride": 1,
                "amp": "none", "channels_last": False}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=32)
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    images, labels = load_fmnist("train", limit=args.samples)
    write_shards(fmnist_samples("train", images, labels), f"{out}/fmnist", "train", FMNIST_CLASSES,
                 args.shard_size, overwrite=True)
    torch.manual_seed(0)  # fixed random weights; never touched by the plan
    ckpt = f"{out}/teacher.pt"
    torch.save(create_model(TeacherConfig(**TINY_TEACHER)).state_dict(), ckpt)
    cfg = {"shards": f"{out}/fmnist/train", "out": f"{out}/cache.zarr", "epochs": 2, "views": 2, "k": 5,
           "seed": 0, "batch_size": 32, "num_workers": 0, "actors": 1, "max_retries": 2,
           "teacher": {**TINY_TEACHER, "checkpoint": ckpt}}
    with open(f"{out}/tiny.yaml", "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    print(f"{out}/tiny.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
