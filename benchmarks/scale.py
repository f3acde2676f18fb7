"""Benchmark: the steps after bottleneck at scale, on synthetic vectors: seconds and peak memory per step.

For each size, a bottleneck folder of synthetic vectors is written in the real format
(dimension 1280 like Lite0/Lite2, 5 labels, splits 70/15/15, 4 views per training image:
the plain one and 3 augmented, float16 as the store keeps them): each label a direction,
each image the sum of its labels' directions plus noise. Then train, evaluate, calibrate
(with the out-of-fold scores review needs) and review run as the CLI runs them, each in
its own process, and each process's wall time and peak RSS (``os.wait4``) are recorded.
The backbone is a small SavedModel that maps pixels to 1280 numbers, so that train can
export its end-to-end model as it always does.

The last line is one JSON object: ``{"cpu": ..., "steps": {STEP: {"SIZE": {"seconds": s, "peak_rss_mb": m}}}}``.

Usage:
    python benchmarks/scale.py --sizes 10000,100000,300000 [--epochs 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

DIM, LABELS, VIEWS = 1280, ["a", "b", "c", "d", "e"], 4


def projection_backbone(path: Path) -> Path:
    """A SavedModel: float images [B,H,W,3] in [0,1] -> [B,1280] (mean colour through a fixed projection)."""
    import tensorflow as tf

    w = tf.constant(np.random.default_rng(0).normal(size=(3, DIM)).astype(np.float32))

    class Projection(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        def __call__(self, images):
            return tf.matmul(tf.reduce_mean(images, axis=[1, 2]), w)

    tf.saved_model.save(Projection(), str(path))
    return path


def write_bottlenecks(out: Path, n: int, backbone: Path, seed: int = 0) -> None:
    from mltag.backbones.builtin import resolve
    from mltag.data.images import PREPROCESSING_VERSION

    rng = np.random.default_rng(seed)
    dirs = rng.normal(size=(len(LABELS), DIM)).astype(np.float32)
    out.mkdir(parents=True)
    sizes = {"train": int(n * 0.7), "val": int(n * 0.15)}
    sizes["test"] = n - sizes["train"] - sizes["val"]
    for split, m in sizes.items():
        y = (rng.random((m, len(LABELS))) < 0.3).astype(np.uint8)
        y[np.arange(m), rng.integers(0, len(LABELS), m)] = 1  # at least one label each

        def vectors(shape_extra=(), m=m, y=y):
            base = np.zeros((m, *shape_extra, DIM), np.float16)
            for i in range(0, m, 20000):  # in chunks: float32 noise for 300k x 3 views would take 4.6 GB
                sl = slice(i, min(m, i + 20000))
                mean = y[sl].astype(np.float32) @ dirs
                noise = rng.normal(scale=6.0, size=(sl.stop - sl.start, *shape_extra, DIM)).astype(np.float32)
                base[sl] = (mean.reshape(len(mean), *([1] * len(shape_extra)), DIM) + noise).astype(np.float16)
            return base

        arrays = {"features": vectors(), "labels": y, "paths": np.array([f"img/{split}{i:07d}.jpg" for i in range(m)])}
        if split == "train":
            arrays["views"] = vectors((VIEWS - 1,))
        np.savez(out / f"{split}.npz", **arrays)
        del arrays
    (out / "labels.txt").write_text("\n".join(LABELS) + "\n")
    b = resolve(str(backbone))
    (out / "bottleneck.json").write_text(json.dumps({
        "backbone_handle": str(backbone), "backbone_id": b.backbone_id, "image_size": 64,
        "preprocessing": PREPROCESSING_VERSION, "views": VIEWS, "images": n, "shard": [0, 1], "config": {}}))


# The step's own peak (VmHWM of its memory map), written when it exits. Not ru_maxrss: Linux carries
# that across fork and exec, so every step would report at least this benchmark's own peak.
_MEASURED = ("import atexit, os, runpy, sys\n"
             "def _peak():\n"
             "    kb = [ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM:')]\n"
             "    open(os.environ['MLTAG_PEAK_FILE'], 'w').write(kb[0] if kb else '0')\n"
             "atexit.register(_peak)\n"
             "sys.argv = ['mltag'] + sys.argv[1:]\n"
             "runpy.run_module('mltag.cli', run_name='__main__')\n")


def run_measured(args: list[str], cwd: Path, env: dict) -> dict:
    peak = cwd / "peak.txt"
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _MEASURED, "-q", *args], cwd=cwd, env={**env, "MLTAG_PEAK_FILE": str(peak)},
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"mltag {' '.join(args)} failed:\n{p.stderr[-2000:]}")
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(int(peak.read_text()) / 1024, 0)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,300000")
    ap.add_argument("--epochs", type=int, default=20, help="train.epochs (early stopping may end sooner)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from mltag.tools.doctor import cpu_info

    c = cpu_info()
    result = {"cpu": f"{c['model']}, {c['cores']} cores, AVX2 {c['avx2']}, AVX-512 {c['avx512']}",
              "epochs": args.epochs, "dim": DIM, "views": VIEWS, "steps": {}}
    with tempfile.TemporaryDirectory(prefix="mltag-scale-") as tmp:
        tmp = Path(tmp)
        backbone = projection_backbone(tmp / "backbone")
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}"}
        (tmp / "params.yaml").write_text(f"train:\n  epochs: {args.epochs}\nevaluate:\n  bootstrap: 200\n")
        for n in [int(s) for s in args.sizes.split(",")]:
            work = tmp / f"n{n}"
            write_bottlenecks(work / "bn", n, backbone)
            steps = {
                "train": ["train", "--bottlenecks", str(work / "bn"), "--out", str(work / "model")],
                "evaluate": ["evaluate", "--model", str(work / "model"), "--bottlenecks", str(work / "bn"),
                             "--out", str(work / "eval"), "--metrics", str(work / "ev.json")],
                "calibrate": ["calibrate", "--evaluation", str(work / "eval"), "--model", str(work / "model"),
                              "--bottlenecks", str(work / "bn"), "--out", str(work / "th.json"), "--metrics",
                              str(work / "ca.json"), "--oof", str(work / "oof.npz")],
                "review": ["review", "--oof", str(work / "oof.npz"), "--model", str(work / "model"), "--out",
                           str(work / "review"), "--metrics", str(work / "rv.json"), "--images", str(work),
                           "--thumbnails", "0"],
            }
            for step, cmd in steps.items():
                r = run_measured(cmd, tmp, env)
                result["steps"].setdefault(step, {})[str(n)] = r
                print(f"scale: {n} images, {step}: {r['seconds']} s, peak {r['peak_rss_mb']:.0f} MB", file=sys.stderr,
                      flush=True)
            ev = json.loads((work / "ev.json").read_text())
            result.setdefault("test_map", {})[str(n)] = round(ev["map"], 4)
            import shutil

            shutil.rmtree(work)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
