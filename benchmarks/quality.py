"""Benchmark: model quality on real photos for a small grid of configurations.

Runs prepare -> bottleneck -> train -> evaluate -> calibrate in a temp folder for every
configuration and prints mAP, micro/macro F1 at 0.5 and calibrated, label accuracy and
wall time. Small test splits are noisy, so each configuration runs on ``--repeats``
different splits (``prepare.salt``) and the table shows the mean (and the spread as
+-std for micro F1). Bottleneck vectors are shared through one content-addressed cache,
so a backbone's vectors are computed once for all repeats. Prints figures; asserts nothing.

Usage:
    python benchmarks/quality.py --data ../shared/devsets/flowers [--repeats 5] [--json]
        [--backbones lite0,lite1,lite2,lite0_ms+lite2_ms,lite0&lite2] [--sizes 0,300] [--views 1,4] [--hidden 0] [--calibration none,val,cv]
        [--modes head,fine_tune] [--train "loss=bce;loss=asl;monitor=val_map"] [--tta none,mean]

The first configuration of the grid is the baseline: every other one is also compared with it split by
split (``paired``: the mean difference in mAP and calibrated micro F1, and how many splits went up).

``A@int8`` is ``A`` with ``backbone.precision: int8``. ``A+B`` is the shipped handle ``builtin:efficientnet_A+efficientnet_B`` (one module); ``A&B`` concatenates the two
backbones' bottleneck folders here instead (the experiment that came first; its models have no model.tflite).
``--train`` compares train settings: configurations separated by ``;``, each a ``,``-separated
list of ``key=value`` train keys (``default`` for params.yaml's own; ``groups=none`` trains a model without
prepare's exclusive label groups).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mltag.config import sections

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

CALIBRATIONS = {  # name -> calibrate() keywords
    "none": {"method": "none", "cv_folds": 0},
    "val": {"method": "f1", "cv_folds": 0, "shrink": 0.0, "min_gain": -1.0},  # the old per-label fit on val
    "cv": {"method": "f1", "cv_folds": 5},  # cross-fitted, shrunk, keep-0.5 rule (the default)
}


def run_one(data: Path, work: Path, cache: Path, backbones_dir: Path, backbone: str, views: int, hidden: int,
            calibrations: list[str], salt: str, params, mode: str = "head", variant: str = "default",
            size: int = 0, tta: str = "none") -> list[dict]:
    from mltag.data.formats import image_root_of, label_groups_of
    from mltag.steps import run_step
    from mltag.steps.bottleneck import bottleneck
    from mltag.steps.calibrate import calibrate
    from mltag.steps.evaluate import evaluate
    from mltag.steps.prepare import prepare

    t0 = time.perf_counter()
    prep = work / f"prep-{salt}"
    if not prep.is_dir():
        prepare(prep, **sections("prepare", input=data, salt=salt), progress=False)
    overrides = dict(kv.split("=", 1) for kv in variant.split(",")) if variant != "default" else {}
    # groups=none: a model without prepare's exclusive label groups (thresholds alone decide every label)
    groups = [] if overrides.pop("groups", "auto") == "none" else label_groups_of(prep)
    px = f"-s{size}" if size else ""  # backbone.image_size 0: the built-in's own
    tag = f"{backbone}{px}-v{views}-h{hidden}-{mode}-{salt}-" + "".join(c if c.isalnum() else "_" for c in variant)
    ev_tag = tag + (f"-tta{tta}" if tta != "none" else "")
    bn = work / f"bn-{backbone}{px}-v{views}-{salt}"
    t_bn = time.perf_counter()
    if "&" in backbone:  # "lite0&lite2": both backbones' vectors, concatenated here (an experiment, no model.tflite)
        parts = backbone.split("&")
        for part in parts:
            s = bottleneck(prep, work / f"bn-{part}{px}-v{views}-{salt}", **sections("bottleneck", handle=f"builtin:efficientnet_{part}", cache_dir=cache, backbone_cache_dir=backbones_dir, views=views, image_size=size), progress=False)
        concat_bottlenecks([work / f"bn-{part}{px}-v{views}-{salt}" for part in parts], bn)
        handle = f"builtin:efficientnet_{parts[-1]}"
    else:  # "lite0_ms+lite2_ms" is the shipped handle builtin:efficientnet_lite0_ms+efficientnet_lite2_ms
        name, _, precision = backbone.partition("@")  # "lite2_ms@int8": backbone.precision int8
        handle = "builtin:" + "+".join(part if part == "colour" else f"efficientnet_{part}" for part in name.split("+"))
        s = bottleneck(prep, bn, **sections("bottleneck", handle=handle, cache_dir=cache, backbone_cache_dir=backbones_dir, views=views, image_size=size, precision=precision or "fp32"), progress=False)
    bn_seconds = time.perf_counter() - t_bn
    p = params.replace("train", hidden_units=hidden, mode=mode, **overrides).replace(
        "backbone", cache_dir=str(backbones_dir), handle=handle, image_size=size)
    if not (work / f"model-{tag}").is_dir():  # the same model for every --tta value
        run_step("train", p, bottlenecks=bn, out=work / f"model-{tag}", progress=False, images=image_root_of(prep),
                 exclusive_groups=groups)
    with contextlib.redirect_stdout(io.StringIO()):  # evaluate prints its own table
        evaluate(work / f"model-{tag}", bn, work / f"ev-{ev_tag}", work / f"ev-{ev_tag}.json", image_root_of(prep),
                 **sections("evaluate", bootstrap=100, tta=tta, saliency=False))
    base_seconds = time.perf_counter() - t0
    rows = []
    for cal in calibrations:
        t1 = time.perf_counter()
        r = calibrate(work / f"ev-{ev_tag}", work / f"model-{tag}", work / f"th-{ev_tag}-{cal}.json", work / f"cal-{ev_tag}-{cal}.json", **sections("calibrate", **CALIBRATIONS[cal]), bottlenecks=bn, progress=False)
        a05, acal = r["test_at_0.5"], r["test_at_thresholds"]
        rows.append({
            "backbone": backbone, "image_size": size, "views": views, "hidden": hidden, "mode": mode, "train": variant, "calibration": cal,
            "tta": tta,
            "salt": salt,
            "map": acal["map"], "micro_f1@0.5": a05["micro_f1"], "macro_f1@0.5": a05["macro_f1"],
            "micro_f1_cal": acal["micro_f1"], "macro_f1_cal": acal["macro_f1"],
            "label_accuracy_cal": acal["label_accuracy"], "expected_gain": r["expected_micro_f1_gain"],
            "vectors_computed": s["computed"], "bottleneck_s": round(bn_seconds, 1),
            "seconds": round(base_seconds + time.perf_counter() - t1, 1),
        })
    return rows


def concat_bottlenecks(parts: list[Path], out: Path) -> None:
    """One bottleneck folder whose vectors are the parts' side by side (the same images, in the same
    order; a view of an image is the same crop in each part). It names the last part's backbone, so
    train accepts it; its model folder has no model.tflite (the head takes both backbones' features):
    an experiment on cached vectors, not a servable model."""
    import numpy as np

    from mltag.data.formats import load_split, load_views, read_bottleneck_meta, write_bottleneck_meta, write_split

    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        loaded = [load_split(p, split) for p in parts]
        paths = loaded[0][2]
        if any(list(x[2]) != list(paths) for x in loaded):
            raise SystemExit(f"the parts list different {split} images")
        views = [load_views(p, split) for p in parts]
        write_split(out, split, np.concatenate([x[0] for x in loaded], axis=1), loaded[0][1], list(paths),
                    np.concatenate(views, axis=2) if views[0] is not None else None)
    meta = read_bottleneck_meta(parts[-1])
    meta["feature_dim"] = int(load_split(out, "test")[0].shape[1])
    write_bottleneck_meta(out, meta)
    (out / "labels.txt").write_bytes((parts[-1] / "labels.txt").read_bytes())


KEY = ("backbone", "image_size", "views", "hidden", "mode", "train", "tta", "calibration")


def paired(rows: list[dict]) -> list[dict]:
    """Each configuration against the first (the baseline), split by split: mean differences and splits up."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in KEY), {})[r["salt"]] = r
    base_key, *others = list(groups)
    out = []
    for key in others:
        common = [s for s in groups[key] if s in groups[base_key]]
        if not common:
            continue
        d_map = [groups[key][s]["map"] - groups[base_key][s]["map"] for s in common]
        d_f1 = [groups[key][s]["micro_f1_cal"] - groups[base_key][s]["micro_f1_cal"] for s in common]
        out.append({**dict(zip(KEY, key)), "splits": len(common), "d_map": round(statistics.fmean(d_map), 4),
                    "d_micro_f1_cal": round(statistics.fmean(d_f1), 4), "map_up": sum(d > 0 for d in d_map),
                    "f1_up": sum(d > 0 for d in d_f1), "f1_down": sum(d < 0 for d in d_f1)})
    return out


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in KEY), []).append(r)
    out = []
    for (b, size, v, h, mode, variant, tta, c), rs in groups.items():
        def mean(k, rs=rs):
            return statistics.fmean(r[k] for r in rs)

        out.append({"backbone": b, "image_size": size, "views": v, "hidden": h, "mode": mode, "train": variant, "tta": tta,
                    "calibration": c,
                    "splits": len(rs),
                    **{k: round(mean(k), 4) for k in ("map", "micro_f1@0.5", "micro_f1_cal", "macro_f1@0.5",
                                                      "macro_f1_cal", "label_accuracy_cal", "expected_gain")},
                    "micro_f1_cal_std": round(statistics.pstdev(r["micro_f1_cal"] for r in rs), 4),
                    "seconds_first_split": rs[0]["seconds"],
                    "seconds_per_split": round(mean("seconds"), 1)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a dataset prepare can read (e.g. ../shared/devsets/flowers)")
    ap.add_argument("--backbones", default="lite0,lite1,lite2")
    ap.add_argument("--views", default="1,4")
    ap.add_argument("--sizes", default="0", help="backbone.image_size values (0: the built-in's own size)")
    ap.add_argument("--hidden", default="0")
    ap.add_argument("--calibration", default="none,val,cv")
    ap.add_argument("--modes", default="head", help="train.mode values: head, fine_tune or both")
    ap.add_argument("--train", default="default", help="train settings to compare: 'k=v,k=v;k=v' ('default': "
                                                        "params.yaml's)")
    ap.add_argument("--tta", default="none", help="evaluate.tta values: none, mean, max")
    ap.add_argument("--repeats", type=int, default=5, help="splits (prepare salts) per configuration")
    ap.add_argument("--work", default=None, help="keep the work folder here (default: a temp folder)")
    ap.add_argument("--backbone-cache", default=".mltag-cache/backbones")
    ap.add_argument("--json", action="store_true", help="also print one JSON object as the last line")
    args = ap.parse_args()

    from mltag.config import load_params

    logging.disable(logging.WARNING)
    params = load_params(None)
    data = Path(args.data).resolve()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
        for backbone, size in ((b, int(z)) for b in args.backbones.split(",") for z in args.sizes.split(",")):
            for views in (int(v) for v in args.views.split(",")):
                for hidden in (int(h) for h in args.hidden.split(",")):
                    for mode in args.modes.split(","):
                        for variant in args.train.split(";"):
                            for tta in args.tta.split(","):
                                for i in range(args.repeats):
                                    rows += run_one(data, work, work / "cache", Path(args.backbone_cache).resolve(),
                                                    backbone, views, hidden, args.calibration.split(","), f"quality{i}",
                                                    params, mode, variant, size, tta)
                                    print(f"  done {backbone} size={size} views={views} hidden={hidden} {mode} {variant} "
                                          f"tta={tta} split {i}", file=sys.stderr, flush=True)
    table = summarise(rows)
    cols = [("backbone", 12, "s"), ("image_size", 6, "d"), ("views", 6, "d"), ("hidden", 7, "d"), ("mode", 10, "s"), ("train", 34, "s"),
            ("tta", 5, "s"),
            ("calibration", 12, "s"),
            ("map", 7, ".3f"), ("micro_f1@0.5", 13, ".3f"), ("micro_f1_cal", 13, ".3f"), ("micro_f1_cal_std", 9, ".3f"),
            ("macro_f1@0.5", 13, ".3f"), ("macro_f1_cal", 13, ".3f"), ("label_accuracy_cal", 10, ".3f"),
            ("seconds_first_split", 9, ".0f")]
    heads = {"image_size": "size", "micro_f1_cal_std": "+-std", "label_accuracy_cal": "label_acc", "seconds_first_split": "wall_s"}
    print(f"\nquality on {data.name} (mean over {args.repeats} splits; wall_s: first split, vectors cached or not)")
    print("".join(f"{heads.get(c, c):>{w}}" for c, w, _ in cols))
    for r in table:
        print("".join(f"{r[c]:>{w}{f}}" for c, w, f in cols))
    pairs = paired(rows)
    if pairs:
        print("\nagainst the first configuration, split by split (d_: mean difference; up: splits that gained)")
        for r in pairs:
            print(f"  {r['backbone']} views={r['views']} {r['mode']} {r['train']} tta={r['tta']} {r['calibration']}: "
                  f"mAP {r['d_map']:+.4f} ({r['map_up']}/{r['splits']} up), micro F1 cal. {r['d_micro_f1_cal']:+.4f} "
                  f"({r['f1_up']} up, {r['f1_down']} down)")
    if args.json:
        print(json.dumps({"data": str(data), "repeats": args.repeats, "table": table, "paired": pairs, "runs": rows}))


if __name__ == "__main__":
    main()
