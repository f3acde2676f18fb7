"""prepare's checks: every image decoded once, symlinks kept inside the root, enough good images per label."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mltag.data.datasets import Dataset
from mltag.data.formats import Example
from mltag.data.images import DEFAULT_MAX_PIXELS, BadImage, inspect_image
from mltag.errors import MltagError

log = logging.getLogger(__name__)


def outside_root(root: Path, rel: str) -> str | None:
    """Why ``root / rel`` is not inside ``root`` once symlinks are resolved, or None when it is."""
    real_root = root.resolve()
    real = (root / rel).resolve()
    if real == real_root or real_root in real.parents:
        return None
    return (f"a symlink to {real}, outside the image root {real_root} "
            "(set prepare.follow_symlinks: true to allow)")


def check_images(ds: Dataset, max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = 8,
                 progress: bool = True, follow_symlinks: bool = False) -> tuple[list[Example], dict[str, dict]]:
    """Decode every image; return the good examples and per-path info (hash, size, ahash).

    Unless ``follow_symlinks``, an image whose real path lies outside the image root (a
    symlink to a file or through a linked folder) is rejected: data outside the dataset is
    never read into training or reports.
    """
    from tqdm import tqdm

    def one(ex: Example):
        if not follow_symlinks and (why := outside_root(ds.image_root, ex.path)):
            return ex, None, why
        try:
            return ex, inspect_image(ds.image_root / ex.path, max_pixels), None
        except BadImage as e:
            return ex, None, str(e)

    good, infos = [], {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        it = pool.map(one, ds.examples)
        for ex, info, err in tqdm(it, total=len(ds.examples), desc="prepare: checking images", unit="img",
                                  disable=not progress, mininterval=1.0):
            if err:
                ds.rejected.append({"path": ex.path, "source": ex.source, "reason": err})
            else:
                good.append(ex)
                infos[ex.path] = info
    return good, infos


def reject_unlabelled(ds: Dataset) -> None:
    """``prepare.no_label: reject``: move images with no label at all to ``ds.rejected``."""
    kept = []
    for ex in ds.examples:
        if sum(ex.flags) == 0:
            ds.rejected.append({"path": ex.path, "source": ex.source, "reason": "no labels (prepare.no_label=reject)"})
        else:
            kept.append(ex)
    ds.examples = kept


def check_bad_fraction(ds: Dataset, total: int, max_bad_fraction: float, input) -> list[dict]:
    """Stop when more than ``max_bad_fraction`` of the listed images are unusable; log each one skipped.

    Returns:
        The unusable images' rejection records (unlabelled images not counted).
    """
    bad = [r for r in ds.rejected if not r["reason"].startswith("no labels")]
    if total and len(bad) / total > max_bad_fraction:
        listing = "\n".join(f"  {r['source']}: {r['path']}: {r['reason']}" for r in bad[:20])
        raise MltagError(
            f"{len(bad)} of {total} images are unusable ({len(bad) / total:.1%} > prepare.max_bad_fraction="
            f"{max_bad_fraction:.1%}):\n{listing}", input)
    for r in bad:
        log.warning("prepare: skipping %s: %s: %s", r["source"], r["path"], r["reason"])
    return bad


def check_label_counts(ds: Dataset, good: list[Example], bad: list[dict], n_splits: int, input) -> None:
    """Every label needs one usable example per split; say why one does not (rejections, a CSV typo)."""
    y = np.array([ex.flags for ex in good], dtype=np.int64).reshape(len(good), len(ds.labels))
    flags_of = {ex.path: ex.flags for ex in ds.examples}
    for j, name in enumerate(ds.labels):
        count = int(y[:, j].sum())
        if count >= n_splits:
            continue
        lost = sum(1 for r in bad if flags_of.get(r["path"], (0,) * len(ds.labels))[j])
        extra = f" ({lost} of its images were rejected as unusable)" if lost else ""
        first = next((ex.source for ex in ds.examples if ex.flags[j]), None)
        if first and not lost:
            hint = "; a typo? a labels.txt beside the CSV makes unknown names an error" if ds.fmt == "csv" else ""
            extra += f" (first at {first}{hint})"
        raise MltagError(
            f"label {name!r} has {count} usable example(s){extra}; at least {n_splits} are needed so every "
            "split has one. Add examples or remove the label.", input)
