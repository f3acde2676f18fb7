"""Where the model looked: occlusion saliency maps, and overlays of them on the photo.

A grey square slides over the image the model sees (``CELLS x CELLS`` cells; the square covers
two cells and moves one cell at a time, so ``(CELLS - 1)^2`` positions); every occluded copy is
scored end to end by the model itself (LiteRT or TF, whatever ``InferenceModel`` runs), and a
pixel's saliency for a label is the mean drop of that label's score over the squares that
covered it. It needs no gradient and no access to the network's layers, so it explains any
model folder the same way: a head on a built-in, a fine-tuned backbone, a TF Hub module.
Its cost is ``(CELLS - 1)^2 + 1`` forward passes per image (26 with the default 6 cells).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

CELLS = 6
GREY = 127


def occlusion_batch(pixels: np.ndarray, cells: int = CELLS) -> tuple[np.ndarray, list[tuple[slice, slice]]]:
    """The occluded copies of one image ``[S,S,3]`` (the original first) and the window of each copy."""
    s = pixels.shape[0]
    edges = np.linspace(0, s, cells + 1).round().astype(int)
    windows = [(slice(edges[i], edges[i + 2]), slice(edges[j], edges[j + 2]))
               for i in range(cells - 1) for j in range(cells - 1)]
    out = np.repeat(pixels[None], len(windows) + 1, axis=0)
    for k, (rows, cols) in enumerate(windows, 1):
        out[k, rows, cols] = GREY
    return out, windows


def saliency_maps(run, pixels: np.ndarray, cells: int = CELLS) -> tuple[np.ndarray, np.ndarray]:
    """``(scores [L], maps [L,S,S])`` of one image: each label's score drop where the grey square covered it
    (clipped at 0: the evidence for the label), averaged over the squares covering each pixel.

    ``run``: ``uint8 [B,S,S,3] -> scores [B,L]`` (``InferenceModel._locked_run``)."""
    batch, windows = occlusion_batch(pixels, cells)
    scores = np.asarray(run(batch), np.float32)
    base, occluded = scores[0], scores[1:]
    s = pixels.shape[0]
    total = np.zeros((scores.shape[1], s, s), np.float32)
    count = np.zeros((s, s), np.float32)
    for drop, (rows, cols) in zip(np.maximum(base[None] - occluded, 0.0), windows):
        total[:, rows, cols] += drop[:, None, None]
        count[rows, cols] += 1
    return base, total / np.maximum(count, 1)[None]


def mass_in(saliency: np.ndarray, rows: slice, cols: slice) -> float:
    """The fraction of a map's saliency mass inside a window (what the tests and the benchmark measure)."""
    total = float(saliency.sum())
    return float(saliency[rows, cols].sum()) / total if total > 0 else 0.0


def overlay_png(pixels: np.ndarray, saliency: np.ndarray, size: int = 160) -> bytes:
    """The photo (as the model saw it) with the map over it: transparent where nothing mattered, a heat
    colour (matplotlib's ``inferno``) where the score dropped most. The map is scaled to its own maximum."""
    from matplotlib import colormaps
    from PIL import Image

    peak = float(saliency.max())
    m = saliency / peak if peak > 0 else np.zeros_like(saliency)
    heat = colormaps["inferno"](m)[..., :3] * 255.0
    alpha = 0.65 * m[..., None]
    mixed = pixels.astype(np.float32) * (1 - alpha) + heat * alpha
    im = Image.fromarray(np.clip(mixed, 0, 255).astype(np.uint8))
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, "PNG", optimize=True)
    return buf.getvalue()


class Explainer:
    """Occlusion maps for images of one model (an ``InferenceModel``), label by label."""

    KEEP = 8  # images whose maps are kept: a photo in two labels' galleries is occluded once

    def __init__(self, model, cells: int = CELLS):
        self.model, self.cells = model, cells
        self._kept: dict[str, tuple] = {}

    def maps(self, image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(pixels [S,S,3], scores [L], maps [L,S,S])`` of one image (a path or encoded bytes); every
        label's map comes from the same forward passes, so a path asked again is not scored again."""
        key = str(image) if isinstance(image, (str, os.PathLike)) else None
        if key is not None and key in self._kept:
            return self._kept[key]
        px = self.model.pixels([image])[0]
        scores, maps = saliency_maps(self.model._locked_run, px, self.cells)
        if key is not None:
            if len(self._kept) >= self.KEEP:
                self._kept.pop(next(iter(self._kept)))
            self._kept[key] = (px, scores, maps)
        return px, scores, maps

    def overlay(self, image, label: int, size: int = 160) -> bytes | None:
        """One label's overlay PNG, or None when the image cannot be read."""
        try:
            px, _, maps = self.maps(image)
        except (OSError, ValueError):
            return None
        return overlay_png(px, maps[label], size)

    def write_overlays(self, image, labels: list[int], out_dir: str | os.PathLike, stem: str) -> list[Path]:
        """``out_dir/<stem>.<label>.png`` for each of ``labels``: one forward batch per image, whatever the count."""
        from mltag.files import write_bytes_atomic

        px, _, maps = self.maps(image)
        written = []
        for j in labels:
            path = Path(out_dir) / f"{stem}.{self.model.labels[j]}.png"
            write_bytes_atomic(path, overlay_png(px, maps[j], max(px.shape[:2])))
            written.append(path)
        return written
