"""Benchmark: does review find label errors? Inject known flips, run the pipeline through review, score its ranking.

A copy of the dataset gets a fraction of its (image, label) pairs flipped (a label added
where it was 0, dropped where it was 1; seeded). prepare -> bottleneck -> train -> evaluate
-> calibrate -> review then run on the copy in a temp folder, and review's ranked
``label_issues.csv`` is scored against the flips it could see (those in train and val:
review ranks the images calibrate has out-of-fold scores for). K is that number of flips:

* precision@K and recall@K of review's top K rows (when review flags fewer than K, the
  missing rows count as misses, so recall@K is the one to read);
* precision and recall of everything review flags;
* the same top-K figures for a random ranking of the same pairs (seeded), the baseline.

The dataset's own errors, if it has any, count against review here. Prints figures; asserts nothing.

Usage:
    python benchmarks/label_noise.py --data ../shared/devsets/flowers --flip 0.05 [--seed 0] [--json]
        [--backbone builtin:efficientnet_lite2] [--views 4]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# benchmarks/bottleneck.py would shadow the PyPI package of that name, which pandas probes for
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def noisy_copy(data: Path, dest: Path, flip: float, seed: int) -> tuple[set[tuple[str, str]], int]:
    """Write the dataset with flips as ``dest/all.lst`` + labels.txt (images linked or copied); return
    the flipped (path, label) pairs and the number of pairs."""
    from mltag.data.datasets import read_dataset

    ds = read_dataset(data, "auto")
    rng = np.random.default_rng(seed)
    y = np.array([ex.flags for ex in ds.examples], dtype=int)
    mask = rng.random(y.shape) < flip
    noisy = np.where(mask, 1 - y, y)
    rows = []
    for i, ex in enumerate(ds.examples):
        target = dest / ex.path
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(ds.image_root / ex.path, target)
        except OSError:
            shutil.copy2(ds.image_root / ex.path, target)
        rows.append("\t".join([str(i), *map(str, noisy[i]), ex.path]))
    (dest / "all.lst").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (dest / "labels.txt").write_text("\n".join(ds.labels) + "\n", encoding="utf-8")
    flips = {(ds.examples[i].path, ds.labels[j]) for i, j in zip(*np.nonzero(mask))}
    return flips, int(y.size)


def score(ranked: list[tuple[str, str]], flips: set, k: int) -> dict:
    top = ranked[:k]
    hits = sum(p in flips for p in top)
    return {"precision_at_k": hits / len(top) if top else 0.0, "recall_at_k": hits / k if k else 0.0, "hits": hits}


def run(data: Path, flip: float, seed: int, backbone: str, views: int, work: Path) -> dict:
    from mltag.config import Params
    from mltag.data.formats import image_root_of, load_oof
    from mltag.steps import run_step

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    flips, pairs = noisy_copy(data, work / "noisy", flip, seed)
    p = Params().replace("backbone", handle=backbone).replace("bottleneck", views=views,
                                                              cache_dir=str(work / "store"))
    times = {}

    def step(name, **kw):
        import inspect

        from mltag.steps import step_function

        if "progress" in inspect.signature(step_function(name)).parameters:
            kw["progress"] = False
        t0 = time.perf_counter()
        out = run_step(name, p, **kw)
        times[name] = round(time.perf_counter() - t0, 2)
        return out

    step("prepare", input=work / "noisy", out=work / "prepared")
    step("bottleneck", prepared=work / "prepared", out=work / "bn")
    step("train", bottlenecks=work / "bn", out=work / "model", images=image_root_of(work / "prepared"))
    step("evaluate", model_dir=work / "model", bottlenecks=work / "bn", out=work / "eval",
         metrics_file=work / "ev.json", images=image_root_of(work / "prepared"))
    step("calibrate", evaluation=work / "eval", model_dir=work / "model", out=work / "th.json",
         metrics_file=work / "ca.json", bottlenecks=work / "bn", oof_out=work / "oof.npz")
    r = step("review", oof=work / "oof.npz", prepared=work / "prepared", out=work / "review",
             metrics_file=work / "rv.json", model_dir=work / "model")
    seen = {str(x) for x in load_oof(work / "oof.npz")["paths"]}
    visible = {f for f in flips if f[0] in seen}  # flips review can see: train and val images
    with open(work / "review" / "label_issues.csv", newline="", encoding="utf-8") as fh:
        ranked = [(row["path"], row["label"]) for row in csv.DictReader(fh)]
    k = len(visible)
    labels = r["per_label"]
    universe = [(path, lb) for path in sorted(seen) for lb in labels]
    rng = np.random.default_rng(seed + 1)
    random_rank = [universe[i] for i in rng.permutation(len(universe))]
    flagged_hits = sum(x in visible for x in ranked)
    # every flagging rule on the same out-of-fold scores (the ranking is theirs; only what is flagged differs)
    from mltag.steps.review import FILTERS, find_issues

    oof = load_oof(work / "oof.npz")
    by_filter = {}
    for fb in FILTERS:
        mask, conf, _ = find_issues(oof["labels"], oof["scores"], fb)
        pairs_ = [(str(oof["paths"][i]), oof["label_names"][j]) for i, j in zip(*np.nonzero(mask))]
        order = np.argsort([-conf[i, j] for i, j in zip(*np.nonzero(mask))], kind="stable")
        ranked_fb = [pairs_[i] for i in order]
        hits = sum(x in visible for x in ranked_fb)
        by_filter[fb] = {**score(ranked_fb, visible, k), "flagged": len(ranked_fb),
                         "flagged_precision": hits / len(ranked_fb) if ranked_fb else 0.0,
                         "flagged_recall": hits / k if k else 0.0}
    return {
        "data": str(data), "flip": flip, "seed": seed, "backbone": backbone, "views": views,
        "pairs": pairs, "flips": len(flips), "flips_in_train_val": k, "pairs_in_train_val": len(universe),
        "review": score(ranked, visible, k), "random": score(random_rank, visible, k),
        "flagged": len(ranked), "flagged_precision": flagged_hits / len(ranked) if ranked else 0.0,
        "flagged_recall": flagged_hits / k if k else 0.0,
        "seconds": times, "review_share_of_pipeline": round(times["review"] / sum(times.values()), 3),
        "issues_reported": r["issues"], "by_filter": by_filter,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--flip", type=float, default=0.05, help="fraction of (image, label) pairs flipped")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--backbone", default="builtin:efficientnet_lite2")
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    logging.getLogger("mltag").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="mltag-noise-") as tmp:
        r = run(Path(args.data), args.flip, args.seed, args.backbone, args.views, Path(tmp))
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['data']}: {r['flips']} flips of {r['pairs']} pairs ({r['flips_in_train_val']} in train+val); "
              f"review top-K precision {r['review']['precision_at_k']:.3f}, recall {r['review']['recall_at_k']:.3f} "
              f"(random {r['random']['precision_at_k']:.3f}); flagged {r['flagged']}: precision "
              f"{r['flagged_precision']:.3f}, recall {r['flagged_recall']:.3f}; review {r['seconds']['review']} s of "
              f"{sum(r['seconds'].values()):.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
