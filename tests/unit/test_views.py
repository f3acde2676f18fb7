"""Augmented views: deterministic, and bit-identical to the plain expressions on real photos."""

from __future__ import annotations

import numpy as np


def _reference_view(path, size: int, seed: int, min_area: float = 0.5) -> np.ndarray:
    """augmented_view as first written, one plain numpy expression per step: the pixels cached views hold."""
    from PIL import Image

    from mltag.data.images import DEFAULT_MAX_PIXELS, _open, to_rgb

    rng = np.random.default_rng(seed)
    img = to_rgb(_open(path, DEFAULT_MAX_PIXELS, draft=int(np.ceil(size / np.sqrt(min_area)))))
    w, h = img.size
    area = w * h * rng.uniform(min_area, 1.0)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw, ch = int(round(min(w, np.sqrt(area * aspect)))), int(round(min(h, np.sqrt(area / aspect))))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = img.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    a = np.asarray(img, dtype=np.float32)
    b, c, s = rng.uniform(0.85, 1.15, 3)
    grey = a @ np.array([0.299, 0.587, 0.114], np.float32)
    a = grey[..., None] + s * (a - grey[..., None])
    a = a.mean() + c * (a - a.mean())
    a = a * b
    return np.clip(a + 0.5, 0, 255).astype(np.uint8)


def test_views_are_deterministic_augmentations(tmp_path):
    from mltag.data.images import augmented_view, load_image

    img = tmp_path / "x.jpg"
    rng = np.random.default_rng(0)
    from PIL import Image

    Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(img, quality=95)
    a, b, c = augmented_view(img, 64, 1), augmented_view(img, 64, 1), augmented_view(img, 64, 2)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.array_equal(a, load_image(img, 64))


def test_augmented_views_are_bit_identical_to_the_plain_expressions_on_real_photos(tmp_path):
    """The in-place colour jitter must not change a single pixel: cached views are keyed without it."""
    from PIL import Image
    from skimage import data

    from mltag.data.images import augmented_view

    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        path = tmp_path / f"{name}.jpg"
        Image.fromarray(getattr(data, name)()).convert("RGB").save(path, quality=90)
        for size in (224, 260):
            for seed in range(4):
                assert np.array_equal(augmented_view(path, size, seed), _reference_view(path, size, seed)), \
                    (name, size, seed)
