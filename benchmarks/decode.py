"""Benchmark: decoding real photos at several sizes, as the bottleneck step does (#56 item 4).

Takes ``--n`` JPEG photos of a dataset folder, saves each again at its own size and with its long side at each of
``--sides`` (Pillow, quality 90, as a camera or a phone would hand them over), and prints the CPU milliseconds per
image on one thread of ``mltag.data.images.load_image`` at the backbone's input size (the JPEG decoded at a
reduced scale first, ``Image.draft``), against the same decode at full scale then the same resize. Prints figures,
the last line one JSON object with ``--json``; asserts nothing.

Usage:
    python benchmarks/decode.py --data ../shared/devsets/flowers [--size 325] [--sides 1000 2000 4000]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def full_scale(data: bytes, size: int) -> np.ndarray:
    """What decoding cost before draft mode: every pixel decoded, then the same bilinear resize."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    return np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def cpu_ms(fn, items: list[bytes], size: int) -> float:
    fn(items[0], size)  # first-call set-up is not per image
    t = time.process_time()
    for data in items:
        fn(data, size)
    return (time.process_time() - t) / len(items) * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a folder with JPEG photos (searched recursively)")
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--size", type=int, default=325, help="the backbone's input size (the default Lite2 two-scale)")
    ap.add_argument("--sides", type=int, nargs="+", default=[1000, 2000, 4000])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from mltag.data.images import load_image
    from mltag.tools.doctor import cpu_info

    files = sorted(p for p in Path(args.data).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[: args.n]
    if not files:
        raise SystemExit(f"no JPEG under {args.data}")
    originals = [Image.open(f).convert("RGB") for f in files]
    c = cpu_info()
    out = {"cpu": f"{c['model']}, {c['cores']} cores, AVX2 {c['avx2']}, AVX-512 {c['avx512']}", "images": len(files),
           "size": args.size, "rows": []}
    for side in [None, *args.sides]:
        items = []
        for im in originals:
            if side:
                scale = side / max(im.size)
                im = im.resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=90)
            items.append(buf.getvalue())
        mp = float(np.mean([Image.open(io.BytesIO(d)).size[0] * Image.open(io.BytesIO(d)).size[1] for d in items])) / 1e6
        draft, full = cpu_ms(load_image, items, args.size), cpu_ms(full_scale, items, args.size)
        out["rows"].append({"long_side": side or "as given", "megapixels": round(mp, 3), "draft_ms": round(draft, 2),
                            "full_ms": round(full, 2), "speedup": round(full / draft, 2)})
    print(f"decode + resize to {args.size} px, {len(files)} photos from {args.data}, one thread ({out['cpu']})")
    print(f"  {'long side':>10} {'MP':>6} {'draft (mltag)':>14} {'full decode':>12}")
    for r in out["rows"]:
        print(f"  {r['long_side']!s:>10} {r['megapixels']:6.3f} {r['draft_ms']:11.2f} ms {r['full_ms']:9.2f} ms "
              f"({r['speedup']:.1f}x)")
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
