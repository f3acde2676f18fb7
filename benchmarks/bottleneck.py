"""Benchmark: bottleneck throughput (images/s) and peak memory of the built-in backbone.

Prints figures; asserts nothing. Usage:
    python benchmarks/bottleneck.py [--images 256] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--handle", default="builtin:efficientnet_lite0")
    args = ap.parse_args()

    from mltag.backbone import resolve
    from mltag.bottleneck import _feature_model, bottleneck
    from mltag.demo import make_demo_data
    from mltag.prepare import prepare

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_demo_data(tmp / "demo", args.images)
        prepare(tmp / "demo", tmp / "prep", progress=False)
        bb = resolve(args.handle, tmp / "backbones")

        run = _feature_model(bb.location)
        x = np.random.default_rng(0).integers(0, 255, (args.batch_size, 224, 224, 3), dtype=np.uint8)
        run(x)  # trace
        t = time.perf_counter()
        reps = max(1, args.images // args.batch_size)
        for _ in range(reps):
            run(x).numpy()
        model_only = reps * args.batch_size / (time.perf_counter() - t)

        t = time.perf_counter()
        s = bottleneck(tmp / "prep", tmp / "bn", args.handle, tmp / "cache", tmp / "backbones",
                       batch_size=args.batch_size, progress=False)
        cold = time.perf_counter() - t
        t = time.perf_counter()
        bottleneck(tmp / "prep", tmp / "bn", args.handle, tmp / "cache", tmp / "backbones",
                   batch_size=args.batch_size, progress=False)
        warm = time.perf_counter() - t
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"backbone only (batch {args.batch_size}):   {model_only:8.1f} images/s")
    print(f"bottleneck step, cold cache:  {s['computed'] / cold:8.1f} images/s ({s['computed']} images, {cold:.1f} s)")
    print(f"bottleneck step, warm cache:  {warm:8.2f} s for {s['images']} images (all cached)")
    print(f"peak resident memory:         {peak_mb:8.0f} MB")


if __name__ == "__main__":
    main()
