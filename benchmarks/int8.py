"""Benchmark: where a fully int8 backbone loses accuracy, on real photos (#56).

For one split of a dataset (``prepare.salt``), the plain view of every image goes through the backbone's fp32
LiteRT model and through a full-int8 conversion of it (weights per channel, activations calibrated on ``--reps``
training images of the dataset itself; float fallback wherever the converter keeps an op in float), and prints:

* forward speed of each (one image per invoke, one interpreter with a thread per core), images/s;
* how far the int8 vectors are from the fp32 ones: relative L2 error and cosine similarity, for the whole vector
  and for each block of it (a two-scale built-in's vector is the final features then its pooled middle stages,
  concatenated: int8 gives a concatenation one scale, so a block with a small range loses the most);
* the test mAP of a logistic head (one per label, scikit-learn) fitted on fp32 training vectors and scored on fp32
  and on int8 test vectors ("served": the head as trained, an int8 backbone at prediction), and fitted and scored on
  int8 vectors ("bottleneck": int8 vectors end to end).

``--calibration skimage`` calibrates on ``--reps`` crops of scikit-image's sample photos instead (what
``backbone.precision: int8`` does: ``mltag.inference.engine.int8_calibration_images``) (real photos that
are nobody's dataset: one int8 model per backbone, whatever the data, as a vector store needs), converted once;
``--salts`` runs several splits in one go (each image's vectors computed once) and prints their paired means.

Prints figures, the last line one JSON object with ``--json``; asserts nothing.

Usage:
    python benchmarks/int8.py --data ../shared/devsets/flowers [--handle builtin:efficientnet_lite2_ms] [--reps 200]
        [--calibration train|skimage] [--salts quality0,quality1,quality2,quality3,quality4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def blocks_of(handle: str, dim: int) -> dict[str, tuple[int, int]]:
    """The vector's blocks: a two-scale built-in's final features and each pooled middle stage; else one block."""
    from mltag.backbones.builtin import LiteNet, base_name, is_multiscale

    name = handle.removeprefix("builtin:")
    if "+" in name or not is_multiscale(name):
        return {"whole": (0, dim)}
    net = LiteNet(base_name(name))
    out, at = {"final": (0, 1280)}, 1280
    for e in net.mid_stages():
        width = int(net.blocks[e]["project"][0].shape[-1])
        out[f"stage ending at block {e}"] = (at, at + width)
        at += width
    return out


def head_map(y_tr, y_te, x_fit, x_score) -> float:
    """Test mAP of a logistic head per label (scikit-learn) fitted on ``x_fit`` and scored on ``x_score``."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from mltag import metrics as M

    scaler = StandardScaler().fit(x_fit)
    s = np.zeros(y_te.shape)
    for j in range(y_tr.shape[1]):
        if 0 < y_tr[:, j].sum() < len(y_tr):
            m = LogisticRegression(C=0.1, max_iter=2000).fit(scaler.transform(x_fit), y_tr[:, j])
            s[:, j] = m.predict_proba(scaler.transform(x_score))[:, 1]
    return round(float(np.nanmean(M.average_precisions(y_te, s))), 4)


def several(args, salts: list[str]) -> int:
    """Several splits: each image decoded and run through fp32 once, through int8 once per int8 model (one for
    ``skimage`` calibration, one per split for ``train``), then per split the three heads; paired means at the end."""
    import numpy as np

    from mltag.backbones import builtin as bb
    from mltag.config import sections
    from mltag.data.formats import image_root_of, load_prepared
    from mltag.data.images import load_image
    from mltag.inference.engine import LiteRTEngine, convert_backbone, int8_calibration_images, litert_backbone
    from mltag.steps.prepare import prepare
    from mltag.tools.doctor import cpu_info

    c = cpu_info()
    size = bb.default_image_size(args.handle)
    resolved = bb.resolve(args.handle, args.backbone_cache)
    fp32 = LiteRTEngine(litert_backbone(resolved, size, args.backbone_cache))
    pixels: dict = {}
    cache = {"fp32": {}}
    rows = []

    def vectors(engine, memo: dict, examples) -> np.ndarray:
        todo = [ex.path for ex in examples if ex.path not in memo]
        for i in range(0, len(todo), 16):
            for p, v in zip(todo[i: i + 16], engine(np.stack([pixels[p] for p in todo[i: i + 16]]))):
                memo[p] = np.asarray(v, np.float32)
        return np.stack([memo[ex.path] for ex in examples])

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shared = None
        if args.calibration == "skimage":
            shared = LiteRTEngine(convert_backbone(resolved.location, size, tmp / "int8.tflite",
                                                   representative=int8_calibration_images(size, args.reps)))
        for salt in salts:
            prepare(tmp / salt, **sections("prepare", input=str(Path(args.data).resolve()), salt=salt), progress=False)
            root = image_root_of(tmp / salt)
            _, train = load_prepared(tmp / salt, "train")
            _, test = load_prepared(tmp / salt, "test")
            for ex in train + test:
                if ex.path not in pixels:
                    pixels[ex.path] = load_image(root / ex.path, size)
            if shared is None:
                idx = np.random.default_rng(0).choice(len(train), min(args.reps, len(train)), replace=False)
                engine = LiteRTEngine(convert_backbone(resolved.location, size, tmp / f"int8-{salt}.tflite",
                                                       representative=[pixels[train[i].path] for i in idx]))
                memo = {}
            else:
                engine, memo = shared, cache.setdefault("int8", {})
            f_tr, f_te = vectors(fp32, cache["fp32"], train), vectors(fp32, cache["fp32"], test)
            q_tr, q_te = vectors(engine, memo, train), vectors(engine, memo, test)
            y_tr = np.array([ex.flags for ex in train], np.int64)
            y_te = np.array([ex.flags for ex in test], np.int64)
            rel = np.linalg.norm(f_te - q_te, axis=1) / np.maximum(np.linalg.norm(f_te, axis=1), 1e-12)
            row = {"salt": salt, "relative_l2": round(float(rel.mean()), 4),
                   "map_fp32": head_map(y_tr, y_te, f_tr, f_te), "map_served_int8": head_map(y_tr, y_te, f_tr, q_te),
                   "map_bottleneck_int8": head_map(y_tr, y_te, q_tr, q_te)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = {"cpu": f"{c['model']}, {c['cores']} cores, AVX2 {c['avx2']}, AVX-512 {c['avx512']}", "handle": args.handle,
           "data": args.data, "calibration": args.calibration, "calibration_images": args.reps, "splits": rows}
    for kind in ("bottleneck", "served"):
        d = [r[f"map_{kind}_int8"] - r["map_fp32"] for r in rows]
        out[f"{kind}_int8_paired"] = {"mean": round(float(np.mean(d)), 4), "up": sum(x > 0 for x in d),
                                      "down": sum(x < 0 for x in d), "each": [round(x, 4) for x in d]}
    out["map_fp32_mean"] = round(float(np.mean([r["map_fp32"] for r in rows])), 4)
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--handle", default="builtin:efficientnet_lite2_ms")
    ap.add_argument("--salt", default="quality0")
    ap.add_argument("--reps", type=int, default=200, help="training images that calibrate the int8 activations")
    ap.add_argument("--backbone-cache", default="")
    ap.add_argument("--calibration", choices=["train", "skimage"], default="train",
                    help="train: each split's own training photos; skimage: crops of scikit-image's sample photos")
    ap.add_argument("--salts", default="", help="comma-separated split salts (default: --salt alone)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    salts = [x for x in args.salts.split(",") if x] or [args.salt]
    if len(salts) > 1:
        return several(args, salts)

    from mltag.backbones import builtin as bb
    from mltag.config import sections
    from mltag.data.formats import image_root_of, load_prepared
    from mltag.data.images import load_image
    from mltag.inference.engine import LiteRTEngine, convert_backbone, int8_calibration_images, litert_backbone
    from mltag.steps.prepare import prepare
    from mltag.tools.doctor import cpu_info

    c = cpu_info()
    cpu = f"{c['model']}, {c['cores']} cores, AVX2 {c['avx2']}, AVX-512 {c['avx512']}"
    size = bb.default_image_size(args.handle)
    resolved = bb.resolve(args.handle, args.backbone_cache)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prepare(tmp / "prep", **sections("prepare", input=str(Path(args.data).resolve()), salt=args.salt),
                progress=False)
        root = image_root_of(tmp / "prep")
        labels, train = load_prepared(tmp / "prep", "train")
        _, test = load_prepared(tmp / "prep", "test")
        t0 = time.perf_counter()
        px_train = np.stack([load_image(root / ex.path, size) for ex in train])
        px_test = np.stack([load_image(root / ex.path, size) for ex in test])
        decode_s = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        reps = int8_calibration_images(size, args.reps) if args.calibration == "skimage" else \
            [px_train[i] for i in rng.choice(len(px_train), min(args.reps, len(px_train)), replace=False)]
        fp32_file = litert_backbone(resolved, size, args.backbone_cache)
        t0 = time.perf_counter()
        int8_file = convert_backbone(resolved.location, size, tmp / "int8.tflite", representative=reps)
        convert_s = time.perf_counter() - t0
        out = {"cpu": cpu, "handle": args.handle, "calibration": args.calibration, "image_size": size, "salt": args.salt, "train": len(train),
               "test": len(test), "calibration_images": len(reps), "convert_seconds": round(convert_s, 1),
               "decode_seconds": round(decode_s, 1), "fp32_mb": round(fp32_file.stat().st_size / 1e6, 1),
               "int8_mb": round((tmp / "int8.tflite").stat().st_size / 1e6, 1)}
        vec = {}
        for kind, f in (("fp32", fp32_file), ("int8", int8_file)):
            engine = LiteRTEngine(f)
            engine(px_test[:2])  # allocate
            t0 = time.perf_counter()
            te = np.concatenate([engine(px_test[i: i + 16]) for i in range(0, len(px_test), 16)])
            out[f"{kind}_forward_ips"] = round(len(px_test) / (time.perf_counter() - t0), 1)
            tr = np.concatenate([engine(px_train[i: i + 16]) for i in range(0, len(px_train), 16)])
            vec[kind] = (tr.astype(np.float32), te.astype(np.float32))
    y_tr = np.array([ex.flags for ex in train], np.int64)
    y_te = np.array([ex.flags for ex in test], np.int64)
    a, b = vec["fp32"][1], vec["int8"][1]
    errs = {}
    for name, (lo, hi) in blocks_of(args.handle, a.shape[1]).items():
        x, z = a[:, lo:hi], b[:, lo:hi]
        rel = np.linalg.norm(x - z, axis=1) / np.maximum(np.linalg.norm(x, axis=1), 1e-12)
        cos = (x * z).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(z, axis=1), 1e-12)
        errs[name] = {"dims": hi - lo, "relative_l2": round(float(rel.mean()), 4), "cosine": round(float(cos.mean()), 4),
                      "fp32_range": round(float(x.max() - x.min()), 3)}
    out["error_by_block"] = errs

    out["map_fp32"] = head_map(y_tr, y_te, vec["fp32"][0], vec["fp32"][1])
    out["map_served_int8"] = head_map(y_tr, y_te, vec["fp32"][0], vec["int8"][1])
    out["map_bottleneck_int8"] = head_map(y_tr, y_te, vec["int8"][0], vec["int8"][1])
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
