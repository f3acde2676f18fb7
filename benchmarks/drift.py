"""Benchmark: how often `mltag drift`'s vector test cries wolf, and what it finds.

On a folder of real photos (vectors from a built-in backbone through a temporary vector store):

1. false alarms: the photos split at random into two halves, 20 times; the share of splits flagged at
   ``--alpha`` (it should be about alpha);
2. shifts: the photos against darkened (brightness x0.5) and blurred (Gaussian, radius 2) copies of
   themselves, and against a second folder (``--other``, e.g. the mosaics of benchmarks/mosaics.py);
3. sensitivity: half the photos against the other half with a fraction of it darkened: the smallest
   fraction flagged.

Prints a table and the CPU flags; the last line is one JSON object with ``--json``. Asserts nothing.

Usage:
    python benchmarks/drift.py --data PHOTOS [--other OTHER] [--backbone builtin:efficientnet_lite0] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def vectors(files: list[Path], handle: str, store: Path) -> np.ndarray:
    from mltag.backbones import builtin as bb
    from mltag.inference.vectors import vectors_for

    b = bb.resolve(handle)
    meta = {"backbone_handle": handle, "backbone_id": b.backbone_id, "image_size": bb.default_image_size(handle)}
    return vectors_for(files, meta, str(store), progress=False)[0]


def altered(files: list[Path], out: Path, how: str) -> list[Path]:
    from PIL import Image, ImageEnhance, ImageFilter

    out.mkdir(parents=True, exist_ok=True)
    made = []
    for i, f in enumerate(files):
        with Image.open(f) as im:
            im = im.convert("RGB")
            im = ImageEnhance.Brightness(im).enhance(0.5) if how == "dark" else im.filter(ImageFilter.GaussianBlur(2))
            target = out / f"{i:05d}.jpg"
            im.save(target, quality=90)
            made.append(target)
    return made


def main() -> int:
    from mltag.data.listing import expand_images
    from mltag.tools.doctor import cpu_info
    from mltag.tools.drift import mmd_test

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a folder of photos")
    ap.add_argument("--other", default=None, help="a second folder: is it told apart from --data?")
    ap.add_argument("--backbone", default="builtin:efficientnet_lite0")
    ap.add_argument("--alpha", type=float, default=0.01)
    ap.add_argument("--permutations", type=int, default=500)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    c = cpu_info()
    result = {"cpu": f"{c['model']}, {c['cores']} cores, AVX2 {c['avx2']}, AVX-512 {c['avx512']}",
              "data": args.data, "backbone": args.backbone, "alpha": args.alpha}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="mltag-drift-bench-") as tmp:
        tmp = Path(tmp)
        files = [Path(p) for p in expand_images([args.data])[0]]
        t0 = time.perf_counter()
        v = vectors(files, args.backbone, tmp / "store")
        result["images"], result["vector_seconds"] = len(files), round(time.perf_counter() - t0, 1)

        def test(a, b, seed=0):
            t = time.perf_counter()
            r = mmd_test(a, b, permutations=args.permutations, seed=seed)
            return {"p_value": r["p_value"], "auc": round(r["auc"], 3), "seconds": round(time.perf_counter() - t, 2)}

        splits = []
        for seed in range(20):
            half = rng.permutation(len(v))
            splits.append(test(v[half[: len(v) // 2]], v[half[len(v) // 2:]], seed)["p_value"])
        result["false_alarm_rate"] = float(np.mean(np.array(splits) < args.alpha))
        result["false_alarm_p_values"] = [round(p, 4) for p in splits]
        for how in ("dark", "blur"):
            result[how] = test(v, vectors(altered(files, tmp / how, how), args.backbone, tmp / "store"))
        if args.other:
            other = [Path(p) for p in expand_images([args.other])[0]]
            result["other"] = test(v, vectors(other, args.backbone, tmp / "store"))
        dark = vectors(altered(files, tmp / "dark", "dark"), args.backbone, tmp / "store")
        half = rng.permutation(len(v))
        a, b = half[: len(v) // 2], half[len(v) // 2:]
        result["fractions"] = {}
        for frac in (0.05, 0.1, 0.2, 0.3, 0.5):
            k = int(round(frac * len(b)))
            mixed = np.concatenate([v[b[k:]], dark[b[:k]]])
            result["fractions"][str(frac)] = test(v[a], mixed)["p_value"]
        found = [float(f) for f, p in result["fractions"].items() if p < args.alpha]
        result["smallest_fraction_found"] = min(found) if found else None
    print(f"CPU: {result['cpu']}; {result['images']} photos, {args.backbone}, alpha {args.alpha}")
    print(f"false alarms over 20 random half-splits: {result['false_alarm_rate']:.0%}")
    for how in ("dark", "blur", "other"):
        if how in result:
            print(f"{how:>6}: p={result[how]['p_value']:.4f}, domain AUC {result[how]['auc']:.3f} "
                  f"({result[how]['seconds']} s)")
    print("darkened fraction -> p: " + ", ".join(f"{f}: {p:.4f}" for f, p in result["fractions"].items())
          + f"; smallest found: {result['smallest_fraction_found']}")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
