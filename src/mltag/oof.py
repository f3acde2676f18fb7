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
                       progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores of every train and val image from a head that never saw it (k refits, cheap on cached vectors).

    Each refit uses the trained head's own settings and its best epoch count; a training
    image's augmented views stay in its fold.

    Returns:
        ``(labels, scores, fold of each image, paths)``: train images first, then val.
    """
    from mltag.formats import load_split, load_views, read_model_meta

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
    scores = np.zeros(y.shape, np.float32)
    global _FOLD_DATA
    _FOLD_DATA = (x, views, y, y_tr, folds, hp)
    try:
        for f, fold_scores in _map_folds(k):
            scores[folds == f] = fold_scores
            if progress:
                log.debug("calibrate: fold %d/%d refitted", f + 1, k)
    finally:
        _FOLD_DATA = None
    return y, scores, folds, paths


_FOLD_DATA = None  # what the refits read: set before the worker processes fork, so nothing is pickled


def _refit(f: int) -> tuple[int, np.ndarray]:
    """Fold ``f``'s scores from a head fitted on the other folds (the trained head's settings and epochs)."""
    from mltag.head import HeadLoss, Rows, fit_head, predict_head

    x, views, y, y_tr, folds, hp = _FOLD_DATA
    fit = np.where(folds != f)[0]
    fit_tr = fit[fit < len(y_tr)]
    # The fold's rows by index, not copied: only training images have views, and a view stays
    # in its image's fold.
    xf, yf = Rows(x, views, fit, fit_tr), y[fit]
    if xf.k:
        yf = np.concatenate([yf, np.repeat(y_tr[fit_tr], xf.k, axis=0)])
    model, _, _ = fit_head(xf, yf, None, None, learning_rate=hp["learning_rate"], epochs=int(hp["best_epoch"]),
                           batch_size=hp["batch_size"], hidden_units=hp["hidden_units"], dropout=hp["dropout"],
                           patience=0, monitor="val_loss", seed=int(hp["seed"]) + f,  # no validation: all epochs
                           loss=HeadLoss.of(hp))
    return f, predict_head(model, x[folds == f])


def _map_folds(k: int):
    """The k refits, one process per core where the platform forks (each refit is independent and
    seeded, so the scores are the same as one after the other); else one after the other."""
    import multiprocessing as mp

    from mltag.workers import cpu_threads

    workers = min(k, cpu_threads())
    if workers < 2 or "fork" not in mp.get_all_start_methods():
        yield from map(_refit, range(k))
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
        yield from pool.map(_refit, range(k))
