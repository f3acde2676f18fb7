"""Built-in demo data: deterministic multi-label landscape scenes drawn with Pillow.

Labels desert, mountains, sea, sunset and trees are drawn independently, so each
image carries 1-3 labels. Image ``i`` depends only on ``(seed, i)``: asking for more
images adds new files and leaves existing ones byte-identical.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mltag import config
from mltag.data.formats import Example, write_labels, write_lst
from mltag.files import process_token

DEMO_LABELS = ["desert", "mountains", "sea", "sunset", "trees"]


def _labels_for(rng: np.random.Generator) -> tuple[int, ...]:
    while True:
        flags = tuple(int(x) for x in rng.random(len(DEMO_LABELS)) < 0.4)
        if 1 <= sum(flags) <= 3:
            return flags


def _jitter(rng, color, amount=25):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in color)


def draw_scene(flags: tuple[int, ...], rng: np.random.Generator) -> Image.Image:
    """Draw one scene with the given label flags (order of ``DEMO_LABELS``)."""
    desert, mountains, sea, sunset, trees = flags
    w, h = int(rng.integers(160, 381)), int(rng.integers(140, 321))
    img = Image.new("RGB", (w, h))
    d = ImageDraw.Draw(img)
    horizon = int(h * rng.uniform(0.5, 0.68))

    top, bottom = ((70, 30, 110), (250, 130, 40)) if sunset else ((60, 120, 220), (170, 210, 245))
    top, bottom = _jitter(rng, top), _jitter(rng, bottom)
    for y in range(horizon):
        t = y / max(horizon - 1, 1)
        d.line([(0, y), (w, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))
    if sunset:
        r = int(h * rng.uniform(0.08, 0.14))
        cx = int(w * rng.uniform(0.2, 0.8))
        d.ellipse([cx - r, horizon - r, cx + r, horizon + r], fill=_jitter(rng, (255, 200, 60), 10))
    else:
        for _ in range(int(rng.integers(0, 4))):
            cx, cy = int(rng.uniform(0, w)), int(rng.uniform(0, horizon * 0.6))
            rw, rh = int(w * rng.uniform(0.06, 0.14)), int(h * rng.uniform(0.03, 0.06))
            d.ellipse([cx - rw, cy - rh, cx + rw, cy + rh], fill=_jitter(rng, (245, 245, 250), 8))

    if mountains:
        x = -int(w * 0.1)
        while x < w:
            base = int(w * rng.uniform(0.25, 0.5))
            peak = horizon - int(h * rng.uniform(0.2, 0.4))
            px = x + base // 2
            gray = _jitter(rng, (110, 105, 115), 20)
            d.polygon([(x, horizon), (px, peak), (x + base, horizon)], fill=gray)
            cap = (horizon - peak) // 4
            d.polygon(
                [(px - base * cap // (2 * (horizon - peak)), peak + cap), (px, peak),
                 (px + base * cap // (2 * (horizon - peak)), peak + cap)],
                fill=(240, 240, 245),
            )
            x += int(base * rng.uniform(0.5, 0.9))

    ground = [("sea", sea), ("desert", desert)]
    kinds = [k for k, on in ground if on] or ["grass"]
    split = int(w * rng.uniform(0.35, 0.65)) if len(kinds) == 2 else w
    if rng.random() < 0.5:
        kinds = kinds[::-1]
    for i, kind in enumerate(kinds):
        x0, x1 = (0, split) if i == 0 else (split, w)
        if kind == "sea":
            d.rectangle([x0, horizon, x1, h], fill=_jitter(rng, (20, 70, 150), 15))
            for y in range(horizon + 4, h, int(rng.integers(6, 11))):
                off = int(rng.integers(0, 12))
                for xx in range(x0 + off, x1, 24):
                    d.arc([xx, y, xx + 12, y + 6], 200, 340, fill=(200, 225, 250))
        elif kind == "desert":
            d.rectangle([x0, horizon, x1, h], fill=_jitter(rng, (225, 190, 120), 15))
            for _ in range(3):
                cy = int(rng.uniform(horizon, h))
                d.arc([x0 - 20, cy - 15, x1 + 20, cy + 25], 190, 350, fill=_jitter(rng, (190, 150, 90), 10), width=3)
        else:
            d.rectangle([x0, horizon, x1, h], fill=_jitter(rng, (110, 140, 80), 20))

    if trees:
        for _ in range(int(rng.integers(2, 7))):
            tx = int(rng.uniform(0, w))
            ty = int(rng.uniform(horizon, h * 0.95))
            th = int(h * rng.uniform(0.15, 0.32))
            tw = int(th * rng.uniform(0.35, 0.55))
            d.rectangle([tx - tw // 8, ty - th // 4, tx + tw // 8, ty], fill=(90, 60, 30))
            green = _jitter(rng, (30, 110, 40), 20)
            if rng.random() < 0.5:
                d.polygon([(tx - tw // 2, ty - th // 4), (tx, ty - th), (tx + tw // 2, ty - th // 4)], fill=green)
            else:
                d.ellipse([tx - tw // 2, ty - th, tx + tw // 2, ty - th // 4], fill=green)

    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    return img


DRAW_VERSION = 1  # bump when draw_scene changes what it draws


def make_demo_data(out: str | os.PathLike, *, demo: config.Demo) -> Path:
    """Write ``demo.n_images`` scenes plus ``labels.txt`` and ``all.lst`` under ``out``.

    Image ``i`` depends only on ``(seed, i)``: a folder that ``.demo.json`` says was drawn with the same
    seed keeps its images and only the new ones are drawn; otherwise files whose bytes would not change
    are left untouched. Either way DVC and the bottleneck cache see only the new ones when
    ``n_images`` grows. Each image is written to a temp name and renamed: no lock per file.
    """
    import json

    n_images, seed = demo.n_images, demo.seed
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    manifest = out / ".demo.json"
    try:
        before = json.loads(manifest.read_text()) if manifest.is_file() else {}
    except ValueError:
        before = {}
    same = before.get("seed") == seed and before.get("draw") == DRAW_VERSION
    manifest.unlink(missing_ok=True)  # rewritten once every image is there
    examples = []
    for i in range(n_images):
        rng = np.random.default_rng([seed, i])
        flags = _labels_for(rng)
        rel = f"images/{i:05d}.jpg"
        target = out / rel
        examples.append(Example(rel, flags))
        if same and i < before.get("n_images", 0) and target.is_file():
            continue
        buf = io.BytesIO()
        draw_scene(flags, rng).save(buf, "JPEG", quality=int(rng.integers(55, 96)))
        if not target.is_file() or target.read_bytes() != buf.getvalue():
            tmp = target.with_name(f".{target.name}.{process_token()}.tmp")
            tmp.write_bytes(buf.getvalue())
            os.replace(tmp, target)
    write_labels(out / "labels.txt", DEMO_LABELS)
    write_lst(out / "all.lst", examples)
    manifest.write_text(json.dumps({"seed": seed, "n_images": n_images, "draw": DRAW_VERSION}) + "\n")
    return out
