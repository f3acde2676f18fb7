"""Out-of-fold scores: every train and val image scored by a head that never saw it.

calibrate fits thresholds on them and review ranks likely label errors from them; both
get them from here (calibrate computes them once and hands them on in ``oof_scores.npz``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from mltag.errors import MltagError

log = logging.getLogger(__name__)


def assign_folds(names, k: int) -> np.ndarray:
    """Fold of each item from a hash of its name (an image's path): stable when images are added."""
    return np.array([int(hashlib.sha256(f"calibrate|{n}".encode()).hexdigest()[:8], 16) % k for n in names])


def out_of_fold_scores(bottlenecks: str | os.PathLike, model_dir: str | os.PathLike, k: int,
                       progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Scores of every train and val image from a head that never saw it (k refits, cheap on cached vectors).

    Each refit uses the trained head's own settings and its best epoch count; a training
    image's augmented views stay in its fold. The k heads are fitted side by side
    (``head.fit_fold_heads``) in two fixed groups (``fold_groups``), one group after the other; the scores do not
    depend on the number of cores.

    Returns:
        ``(labels, scores, fold of each image, paths)``: train images first, then val.
    """
    from mltag.data.formats import load_split, load_views, read_model_meta

    meta = read_model_meta(model_dir)
    hp = meta.get("head")
    if hp is None:
        raise MltagError("model.json has no head settings (trained by an older mltag); retrain, or set "
                         "calibrate.cv_folds: 0", Path(model_dir) / "model.json")
    x_tr, y_tr, p_tr = load_split(bottlenecks, "train")
    x_va, y_va, p_va = load_split(bottlenecks, "val")
    views = load_views(bottlenecks, "train")
    x, y = np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va])
    paths = np.concatenate([p_tr, p_va])
    if len(x) < 2 * k:
        raise MltagError(f"calibrate.cv_folds {k} needs at least {2 * k} train+val images, got {len(x)}")
    folds = assign_folds(paths, k)
    from mltag.head.model import Rows

    # Every train and val row, by index (not copied); a training image's views follow it, in its fold.
    rows = Rows(x, views, np.arange(len(x)), np.arange(len(y_tr)))
    row_fold, y_rows = folds, y
    if rows.k:
        row_fold = np.concatenate([folds, np.repeat(folds[: len(y_tr)], rows.k)])
        y_rows = np.concatenate([y, np.repeat(y_tr, rows.k, axis=0)])
    groups = fold_groups(k)
    scores = np.zeros(y.shape, np.float32)
    for group, heads in zip(groups, _map_groups(groups, (rows, y_rows, row_fold, k, hp))):
        for f, head in zip(group, heads):
            scores[folds == f] = head.predict(x[folds == f])
    if progress:
        log.debug("calibrate: %d heads refitted side by side, in %d groups", k, len(groups))
    return y, scores, folds, paths


def fold_groups(k: int) -> list[list[int]]:
    """The refits in two fixed groups (0..ceil(k/2)-1 and the rest), each fitted side by side and seeded
    by its index, as every earlier run grouped them (so the scores are the ones they gave)."""
    half = (k + 1) // 2
    return [g for g in (list(range(half)), list(range(half, k))) if g]


def _fit_group(i: int, group: list[int], data: tuple) -> list:
    from mltag.head.fit import fit_fold_heads
    from mltag.head.model import HeadLoss

    rows, y_rows, row_fold, k, hp = data
    return fit_fold_heads(rows, y_rows, row_fold, k, learning_rate=hp["learning_rate"], epochs=int(hp["best_epoch"]),
                          batch_size=hp["batch_size"], hidden_units=hp["hidden_units"], dropout=hp["dropout"],
                          seed=int(hp["seed"]) + i, loss=HeadLoss.of(hp), folds=group)


def _map_groups(groups: list[list[int]], data: tuple) -> list[list]:
    """Each group's heads, one group after the other. (Last round the second group ran in a forked process: 4.3 s
    less at 10,000 images, well under 5% of a 10,000-image ``dvc repro``; in a thread it saved nothing:
    ``benchmarks/head_fits.py``.) The groups stay, so the heads are the ones every earlier run made."""
    return [_fit_group(i, g, data) for i, g in enumerate(groups)]
