"""A multi-label dev proxy from single-label photos: 2x2 and 1x2 mosaics labelled with their sources' labels.

Each source photo goes into at most one mosaic, so no photo can reach two splits however
prepare splits the mosaics. Seeded: the same input and seed give the same files.

Usage:
    python benchmarks/mosaics.py --data ../shared/devsets/flowers --out /tmp/mosaics [--seed 0] [--tile 160]

Writes ``OUT/images/*.jpg``, ``OUT/all.lst`` and ``OUT/labels.txt`` (the canonical .lst
format, so ``mltag prepare --input OUT`` reads it) and prints one line of counts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def build(data: Path, out: Path, seed: int = 0, tile: int = 160, p_square: float = 0.5) -> dict:
    from PIL import Image, ImageOps

    from mltag.data.datasets import read_dataset

    ds = read_dataset(data, "auto")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ds.examples))
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows, i, n, used = [], 0, 0, 0
    while i < len(order):
        k = 4 if rng.random() < p_square else 2
        group = [ds.examples[j] for j in order[i: i + k]]
        i += k
        if len(group) < 2:
            break
        if len(group) == 3:
            group = group[:2]
        used += len(group)
        cols, rws = (2, 2) if len(group) == 4 else (2, 1)
        canvas = Image.new("RGB", (cols * tile, rws * tile))
        for t, ex in enumerate(group):
            with Image.open(ds.image_root / ex.path) as im:
                im = ImageOps.fit(ImageOps.exif_transpose(im).convert("RGB"), (tile, tile))
            canvas.paste(im, ((t % cols) * tile, (t // cols) * tile))
        flags = np.max([ex.flags for ex in group], axis=0)
        rel = f"images/mosaic{n:04d}.jpg"
        canvas.save(out / rel, "JPEG", quality=90)
        rows.append("\t".join([str(n), *map(str, flags), rel]))
        n += 1
    (out / "all.lst").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (out / "labels.txt").write_text("\n".join(ds.labels) + "\n", encoding="utf-8")
    cardinality = float(np.mean([sum(int(f) for f in r.split("\t")[1:-1]) for r in rows]))
    return {"mosaics": n, "sources_used": used, "labels": ds.labels,
            "label_cardinality": round(cardinality, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a single-label (or multi-label) dataset prepare can read")
    ap.add_argument("--out", required=True, help="an empty or new folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tile", type=int, default=160, help="pixels per tile side")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"mosaics: {out} is not empty", file=sys.stderr)
        return 2
    print(json.dumps(build(Path(args.data), out, args.seed, args.tile)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
