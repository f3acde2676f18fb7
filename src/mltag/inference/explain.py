"""Where the model looked: occlusion saliency maps, and overlays of them on the photo.

A grey square slides over the image the model sees (``CELLS x CELLS`` cells; the square covers
two cells and moves one cell at a time, so ``(CELLS - 1)^2`` positions); every occluded copy is
scored end to end by the model itself (LiteRT or TF, whatever ``InferenceModel`` runs), and a
pixel's saliency for a label is the mean drop of that label's score over the squares that
covered it. It needs no gradient and no access to the network's layers, so it explains any
model folder the same way: a head on a built-in, a fine-tuned backbone, a TF Hub module.
Its cost is ``(CELLS - 1)^2 + 1`` forward passes per image (26 with the default 6 cells).

For a model that uses its backbone as it is (head mode), the occluded copies' backbone features do not
depend on the head: ``explainer_for`` keeps them (``OcclusionMemo``, float16, keyed by the image's bytes,
the backbone and the size) beside the backbone's LiteRT file, so a head-only experiment, or review after
evaluate, scores the same occlusions with its new head in a matrix product instead of 26 forward passes.
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


def saliency_grid(run, pixels: np.ndarray, cells: int = CELLS) -> tuple[np.ndarray, np.ndarray]:
    """``(scores [L], grid [L,cells,cells])`` of one image: each label's score drop where the grey square covered
    it (clipped at 0: the evidence for the label), averaged over the squares covering each cell. The squares'
    edges are cell edges, so a map is constant on each cell: the grid is the whole map (``expand`` draws it
    at any size).

    ``run``: ``uint8 [B,S,S,3] -> scores [B,L]`` (``InferenceModel._locked_run``)."""
    batch, _ = occlusion_batch(pixels, cells)
    scores = np.asarray(run(batch), np.float32)
    base, occluded = scores[0], scores[1:]
    total = np.zeros((scores.shape[1], cells, cells), np.float32)
    count = np.zeros((cells, cells), np.float32)
    windows = [(i, j) for i in range(cells - 1) for j in range(cells - 1)]
    for drop, (i, j) in zip(np.maximum(base[None] - occluded, 0.0), windows):
        total[:, i:i + 2, j:j + 2] += drop[:, None, None]
        count[i:i + 2, j:j + 2] += 1
    return base, total / np.maximum(count, 1)[None]


def expand(grid: np.ndarray, height: int, width: int | None = None) -> np.ndarray:
    """A cell grid ``[..., C, C]`` drawn at ``height x width`` pixels, each cell over the pixels
    ``occlusion_batch`` gives it at that size (a map of any other shape: its nearest value)."""
    width = width or height
    ch, cw = grid.shape[-2:]
    rows = np.searchsorted(np.linspace(0, height, ch + 1).round()[1:], np.arange(height), side="right")
    cols = np.searchsorted(np.linspace(0, width, cw + 1).round()[1:], np.arange(width), side="right")
    return grid[..., rows[:, None], cols[None, :]]


def saliency_maps(run, pixels: np.ndarray, cells: int = CELLS) -> tuple[np.ndarray, np.ndarray]:
    """``(scores [L], maps [L,S,S])``: ``saliency_grid`` drawn at the image's size."""
    base, grid = saliency_grid(run, pixels, cells)
    return base, expand(grid, pixels.shape[0], pixels.shape[1])


def mass_in(saliency: np.ndarray, rows: slice, cols: slice) -> float:
    """The fraction of a map's saliency mass inside a window (what the tests and the benchmark measure)."""
    total = float(saliency.sum())
    return float(saliency[rows, cols].sum()) / total if total > 0 else 0.0


def overlay_png(pixels: np.ndarray, saliency: np.ndarray, size: int = 160, fmt: str = "PNG") -> bytes:
    """The photo (as the model saw it) shrunk to fit ``size`` with the map over it: transparent where nothing
    mattered, a heat colour (matplotlib's ``inferno``) where the score dropped most. The map (a cell grid or a
    map of the image's size) is scaled to its own maximum and drawn at the thumbnail's size. ``fmt`` ``JPEG``
    (quality 85) for the reports: 80 times faster to encode than an optimised PNG and a sixth of its size,
    for a photo with a heat map over it."""
    from PIL import Image

    im = Image.fromarray(pixels)
    im.thumbnail((size, size))
    small = np.asarray(im, np.float32)
    h, w = small.shape[:2]
    if saliency.shape[-2:] == pixels.shape[:2]:  # a full-size map: its value at each thumbnail pixel's centre
        rows = ((np.arange(h) + 0.5) * pixels.shape[0] / h).astype(int)
        cols = ((np.arange(w) + 0.5) * pixels.shape[1] / w).astype(int)
        saliency = saliency[rows[:, None], cols[None, :]]
    else:
        saliency = expand(saliency, h, w)
    peak = float(saliency.max())
    m = saliency / peak if peak > 0 else np.zeros_like(saliency)
    heat = _inferno()[np.clip((m * 255).round().astype(int), 0, 255)]
    alpha = 0.65 * m[..., None]
    mixed = small * (1 - alpha) + heat * alpha
    out = Image.fromarray(np.clip(mixed, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    if fmt == "JPEG":
        out.save(buf, "JPEG", quality=85)
    else:
        out.save(buf, "PNG", optimize=True)
    return buf.getvalue()


_LUT: list[np.ndarray] = []


def _inferno() -> np.ndarray:
    """matplotlib's ``inferno`` as 256 RGB rows (0-255), made once per process."""
    if not _LUT:
        from matplotlib import colormaps

        _LUT.append(colormaps["inferno"](np.linspace(0, 1, 256))[:, :3].astype(np.float32) * 255.0)
    return _LUT[0]


class OcclusionMemo:
    """The backbone features of an image's occluded copies, computed once per (image bytes, backbone, size,
    cells) and kept as ``<folder>/<sha256>.npy`` (float16). Each file is written whole by a rename, so two
    steps or projects sharing the folder never see half a file; a damaged file is computed again."""

    def __init__(self, folder: Path, backbone_file: Path):
        self.folder, self.backbone_file, self._engine = Path(folder), Path(backbone_file), None

    def features(self, image, batch: np.ndarray) -> np.ndarray:
        from mltag.files import sha256_file, write_bytes_atomic

        f = self.folder / f"{sha256_file(image)}.npy"
        try:
            v = np.load(f)
            if v.shape[0] == len(batch) and np.isfinite(v).all():
                return v.astype(np.float32)
        except (OSError, ValueError):  # missing or damaged: computed again
            pass
        if self._engine is None:
            from mltag.inference.engine import LiteRTEngine

            self._engine = LiteRTEngine(self.backbone_file)
        v = np.asarray(self._engine(batch), np.float32)
        if np.isfinite(v).all():
            buf = io.BytesIO()
            np.save(buf, v.astype(np.float16))
            try:
                write_bytes_atomic(f, buf.getvalue())
            except OSError:  # a full or read-only cache costs only the recomputation next time
                pass
        return v


def explainer_for(model_dir: str | os.PathLike, model, cells: int = CELLS) -> Explainer:
    """An ``Explainer`` of ``model`` (the folder's ``InferenceModel``) that keeps the occluded copies'
    backbone features (``OcclusionMemo``) when the model is a head on its backbone as it is and that
    backbone's LiteRT file is in the backbone cache already (the bottleneck step made it); else a plain one."""
    from mltag.data.formats import read_model_meta
    from mltag.head.saved import load_head
    from mltag.inference.export import BACKBONE_DIR

    meta = read_model_meta(model_dir, verify=False)
    if meta.get("mode", "head") != "head" or not (Path(model_dir) / BACKBONE_DIR).is_dir():
        return Explainer(model, cells)
    from mltag.inference.engine import tflite_path
    from mltag.inference.quantized import folder_backbone

    lite = tflite_path(folder_backbone(Path(model_dir), meta), int(meta["image_size"]), "")
    head = load_head(model_dir, meta["labels"])
    if not lite.is_file() or head is None:
        return Explainer(model, cells)
    memo = OcclusionMemo(lite.with_name(f"{lite.name}.occlusions-{cells}"), lite)
    return Explainer(model, cells, memo=memo, head=head)


class Explainer:
    """Occlusion maps for images of one model (an ``InferenceModel``), label by label. With ``memo`` and
    ``head`` (``explainer_for``), the head scores the memo's backbone features of the occluded copies."""

    KEEP = 8  # images whose maps are kept: a photo in two labels' galleries is occluded once

    def __init__(self, model, cells: int = CELLS, memo: OcclusionMemo | None = None, head=None):
        self.model, self.cells = model, cells
        self.memo, self.head = memo, head
        self._kept: dict[str, tuple] = {}

    def maps(self, image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(pixels [S,S,3], scores [L], maps [L,cells,cells])`` of one image (a path or encoded bytes); every
        label's map comes from the same forward passes, so a path asked again is not scored again."""
        key = str(image) if isinstance(image, (str, os.PathLike)) else None
        if key is not None and key in self._kept:
            return self._kept[key]
        px = self.model.pixels([image])[0]
        run = self.model._locked_run
        if self.memo is not None and key is not None:
            def run(batch):
                return self.head.predict(self.memo.features(image, batch))
        scores, maps = saliency_grid(run, px, self.cells)
        if key is not None:
            if len(self._kept) >= self.KEEP:
                self._kept.pop(next(iter(self._kept)))
            self._kept[key] = (px, scores, maps)
        return px, scores, maps

    def overlay(self, image, label: int, size: int = 160) -> bytes | None:
        """One label's overlay as a JPEG (for a report's page), or None when the image cannot be read (the
        report shows the row without it, as it shows a missing thumbnail)."""
        from mltag.data.images import BadImage

        try:
            px, _, maps = self.maps(image)
        except (OSError, ValueError, BadImage):
            return None
        return overlay_png(px, maps[label], size, fmt="JPEG")

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
