"""Benchmark: train's fit and refit, and calibrate's fold heads, at the sizes users have.

Synthetic cached vectors shaped like the default backbone's (1,608 float16 values, 4 vectors per training image:
the plain one and 3 views), N images split 70/15/15, 10 labels, the default head settings. Prints the wall seconds
of ``fit_and_refit`` (the first fit with early stopping, then the refit on train+val) and of calibrate's
``_map_groups`` (5 fold heads in two groups), and the CPU flags; asserts nothing. Run it against another checkout
(``PYTHONPATH=../other/src``) to compare: the figures of the forked and threaded variants are in
benchmarks/README.md.

Usage:
    python benchmarks/head_fits.py [--images 10000] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def data(n: int, dim: int = 1608, labels: int = 10, views: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(dim, labels)).astype(np.float32)
    x = rng.normal(size=(n, dim)).astype(np.float16)
    y = ((x.astype(np.float32) @ w + rng.normal(scale=8.0, size=(n, labels))) > 10).astype(np.float32)
    n_tr, n_va = int(n * 0.7), int(n * 0.15)
    extra = (x[:n_tr, None, :] + rng.normal(scale=0.1, size=(n_tr, views - 1, dim))).astype(np.float16)
    return x, y, n_tr, n_va, extra


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from mltag.head import folds
    from mltag.head.fit import fit_and_refit
    from mltag.head.model import HeadLoss, Rows, with_views
    from mltag.tools.doctor import cpu_info

    x, y, n_tr, n_va, extra = data(args.images)
    x_fit, y_fit = with_views(x[:n_tr], y[:n_tr], extra)
    n_all = n_tr + n_va
    rows_all = Rows(x[:n_all], extra, np.arange(n_all), np.arange(n_tr))
    y_all = np.concatenate([y[:n_all], np.repeat(y[:n_tr], extra.shape[1], axis=0)])
    settings = dict(learning_rate=0.001, batch_size=32, hidden_units=0, dropout=0.2, seed=42, loss=HeadLoss.of({}))
    k = 5
    fold = np.arange(n_all) % k
    row_fold = np.concatenate([fold, np.repeat(fold[:n_tr], extra.shape[1])])
    hp = {**settings, "best_epoch": 20, "loss": "bce"}
    result = {"images": args.images, "cpu": cpu_info()}
    t0 = time.perf_counter()
    _, history, _, _ = fit_and_refit(x_fit, y_fit, x[n_tr:n_all], y[n_tr:n_all], rows_all, y_all, epochs=200,
                                     patience=15, monitor="val_loss", **settings)
    result["fit_and_refit_s"], result["epochs"] = round(time.perf_counter() - t0, 1), len(history["loss"])
    t0 = time.perf_counter()
    folds._map_groups(folds.fold_groups(k), (rows_all, y_all, row_fold, k, hp))
    result["fold_heads_s"] = round(time.perf_counter() - t0, 1)
    print(f"{args.images} images: fit+refit {result['fit_and_refit_s']} s ({result['epochs']} epochs), "
          f"{k} fold heads {result['fold_heads_s']} s", flush=True)
    c = result["cpu"]
    print(f"CPU: {c['model']}, {c['cores']} cores, AVX2 {c['avx2']}, AVX-512 {c['avx512']}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
