"""Image decoding shared by prepare, bottleneck and inference, so training and serving match.

One function turns a file (or bytes) into the pixels the backbone sees: EXIF
orientation applied; grayscale, palette, alpha, CMYK and 16-bit converted to RGB;
resized to a square with Pillow's antialiased bilinear filter; uint8. Large JPEGs are
decoded at a reduced scale first (``Image.draft``). Pillow releases the GIL while it
decodes and resizes, so a thread pool over this function uses every core.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Bumped whenever the pixels produced here change: it is part of the bottleneck cache key.
PREPROCESSING_VERSION = "pil-draft-bilinear-squash-v2"
DEFAULT_MAX_PIXELS = 40_000_000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
# The only decoders Pillow may use, whatever a file's name says (JPEG also opens the
# multi-picture MPO files phones write). Everything else (EPS would reach Ghostscript) is refused.
ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP")


class BadImage(Exception):
    """The file is not a usable image; the message says why."""


def _read(src: str | os.PathLike | bytes) -> bytes:
    """The encoded bytes of ``src`` (a path, or the bytes themselves)."""
    if isinstance(src, (bytes, bytearray)):
        return src
    p = Path(src)
    if not p.is_file():
        raise BadImage("file not found")
    if p.stat().st_size == 0:
        raise BadImage("zero-byte file")
    return p.read_bytes()


def _open(src: str | os.PathLike | bytes, max_pixels: int, draft: int | None = None) -> Image.Image:
    data = _read(src)
    if not data:
        raise BadImage("empty image bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            w, h = img.size
            if w * h > max_pixels:
                raise BadImage(f"{w}x{h} = {w * h} pixels exceeds the cap of {max_pixels} (decompression bomb?)")
            if draft and img.format == "JPEG":
                # DCT-domain downscale while decoding (1/2, 1/4, 1/8), never below ``draft`` on either
                # side: a large JPEG decodes several times faster, and the resize after it still
                # only shrinks.
                img.draft("RGB" if img.mode in ("RGB", "YCbCr") else None, (draft, draft))
            img.load()
        except BadImage:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadImage(f"decompression bomb: {e}") from None
        except UnidentifiedImageError:
            raise BadImage("not an image in a supported format (JPEG, PNG, BMP, GIF, WebP)") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise BadImage(f"corrupt or truncated image: {e}") from None
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert any mode to 8-bit RGB (alpha over white)."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block should not reject the pixels
        pass
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def load_image(src: str | os.PathLike | bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``src`` into uint8 pixels ``[size, size, 3]``.

    Raises:
        BadImage: the file is missing, empty, truncated, not an image or too large.
    """
    img = to_rgb(_open(src, max_pixels, draft=size))
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def inspect_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Check a file fully decodes; return its content hash, perceptual hash, size and mode.

    Raises:
        BadImage: as ``load_image``.
    """
    data = _read(path)  # read once: decoded and hashed from the same bytes
    img = _open(data, max_pixels)
    info = {"width": img.size[0], "height": img.size[1], "mode": img.mode}
    info["phash"] = perceptual_hash(to_rgb(img))
    info["sha256"] = hashlib.sha256(data).hexdigest()
    info["bytes"] = len(data)
    return info


def perceptual_hash(img: Image.Image) -> str:
    """A 256-bit difference hash (16x16 horizontal gradients), hex, for near-duplicate reports."""
    a = np.asarray(img.convert("L").resize((17, 16), Image.BILINEAR), dtype=np.int16)
    bits = (a[:, 1:] > a[:, :-1]).flatten()
    return np.packbits(bits).tobytes().hex()


def augmented_view(src: str | os.PathLike | bytes, size: int, seed: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                   min_area: float = 0.5) -> np.ndarray:
    """One deterministic augmented view ``[size, size, 3]`` uint8 of an image, for cached training views.

    A random resized crop (``min_area``-1 of the area, aspect 3/4-4/3), a horizontal flip
    with probability 1/2 and mild colour jitter (brightness, contrast, saturation within
    +-15%), all drawn from ``seed`` so the same image and seed always give the same pixels.
    """
    rng = np.random.default_rng(seed)
    # Decode big enough that the smallest crop still has ``size`` pixels across.
    img = to_rgb(_open(src, max_pixels, draft=int(np.ceil(size / np.sqrt(min_area)))))
    w, h = img.size
    area = w * h * rng.uniform(min_area, 1.0)
    aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw = int(round(min(w, np.sqrt(area * aspect))))
    ch = int(round(min(h, np.sqrt(area / aspect))))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    img = img.resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    a = np.asarray(img, dtype=np.float32)
    b, c, s = rng.uniform(0.85, 1.15, 3)
    # In place on one float64 array: the same operations on the same values as
    # ``grey + s * (a - grey)``, ``mean + c * (x - mean)``, ``x * b`` (float32 differences, then
    # float64 through the float64 factors), so the pixels are bit-identical to the plain
    # expressions (tests/integration/test_steps.py checks it) at a sixth of their time.
    grey = (a @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    x = (a - grey).astype(np.float64)
    x *= s  # saturation
    x += grey
    mean = x.mean()
    x -= mean  # contrast
    x *= c
    x += mean
    x *= b  # brightness
    x += 0.5
    np.clip(x, 0, 255, out=x)
    return x.astype(np.uint8)
